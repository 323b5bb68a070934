"""One process per GPU: a stage asked for N GPUs runs as N `sidflow` processes under `torchrun --standalone`."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def gpu_count(gpus: str) -> int:
    """Return the process count for a `gpus` value: a positive count, or 'all' (every visible GPU, at least 1)."""
    if gpus == "all":
        import torch

        return max(torch.cuda.device_count(), 1)
    try:
        n = int(gpus)
    except ValueError:
        raise ValueError(f"gpus={gpus!r} must be a count or 'all'") from None
    if n < 1:
        raise ValueError(f"gpus={gpus!r} must be at least 1")
    return n


def in_launch() -> bool:
    """True inside a torchrun launch (every process of it has WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def cli_args(cfg) -> list[str]:
    """Return the `--field value` flags that reproduce a config on the sidflow command line (None fields omitted)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value) if isinstance(
            value, (dict, list)) else str(value)
        out += ["--" + f.name.replace("_", "-"), text]
    return out


RESULT_ENV = "SIDFLOW_RESULT_FILE"  # where rank 0 of a launch writes its result for the launching process


def run_per_gpu(command: str, cfg, n: int) -> tuple[int, dict | None]:
    """Run `sidflow <command>` with cfg on n local processes; return (exit code, the result rank 0 reported).

    The processes share this process's terminal (live progress bars); SIGTERM and SIGINT reach them (torchrun
    forwards them), so a preempted pod still checkpoints.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "sidflow.cli", command, *cli_args(cfg)]
    with tempfile.TemporaryDirectory(prefix="sidflow-launch-") as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.Popen(cmd, env={**os.environ, RESULT_ENV: str(result)})
        forward = lambda sig, _frame: proc.send_signal(sig)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
        try:
            rc = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return rc, json.loads(result.read_text()) if result.exists() else None


def report(result: dict) -> None:
    """Inside a launch, on rank 0: hand `result` to the launching process (nothing to do outside a launch)."""
    path = os.environ.get(RESULT_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(json.dumps(result))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
