"""Smoke runs of the benchmark scripts on the tiny teacher (CPU), so they do not rot. Nothing here is timed."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_throughput_script_writes_its_record(tmp_path):
    subprocess.run([sys.executable, "benchmarks/throughput.py", "--model", "tiny", "--micro-batch", "1",
                    "--rounds", "2",
                    "--iters", "1", "--warmup", "1", "--ema", "0", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   capture_output=True)
    record = json.loads((tmp_path / "throughput_tiny_cpu.json").read_text())
    assert {"name", "device", "gpus", "git_sha", "command", "versions", "date", "metrics", "config"} <= record.keys()
    m = record["metrics"]
    assert m["images_per_s_per_gpu"] > 0 and m["iterations_timed"] == 1
    assert abs(sum(m["phase_split"].values()) - 1) < 0.01
