"""The README's throughput table, rendered from the committed result files (no model runs).

Each row names a result file and the run in it (a sweep's `metrics.runs[*].run`, or none for a one-run record);
images/s, peak memory, MFU and the device come from the file, so the table cannot drift from what was measured.
`make results-table` rewrites the block between the README's markers; a test fails when the block is stale.

    python benchmarks/results_table.py            # print the table
    python benchmarks/results_table.py --write    # rewrite README.md's block
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- throughput-table:start (benchmarks/results_table.py) -->", "<!-- throughput-table:end -->"

# (model, what the row runs, result file, run name in its sweep or None). One-step SiD-LSG κ 1.5, EMA on, random
# weights from the published configs; rows of one file were measured in one command.
ROWS = [
    ("SD1.5", "bf16, micro-batch 24, the defaults (bf16 norms, NCHW)", "throughput_sd15_mb24_nchw_h200.json",
     "bf16 mb24 eager joint autocast-norms channels_last=false"),
    ("SD1.5", "bf16, micro-batch 28, the defaults", "throughput_sd15_mb24_nchw_h200.json",
     "bf16 mb28 eager joint autocast-norms channels_last=false"),
    ("SD1.5", "bf16, micro-batch 12, fp32 norms, NHWC (before the defaults)", "throughput_sd15_norms_h200.json",
     "bf16 mb12 eager joint"),
    ("SD1.5", "bf16, micro-batch 12, bf16 norms, NHWC", "throughput_sd15_norms_h200.json",
     "bf16 mb12 eager joint autocast-norms"),
    ("SD1.5", "bf16, micro-batch 8, bf16 norms, NHWC", "throughput_sd15_norms_h200.json",
     "bf16 mb8 eager joint autocast-norms"),
    ("SD1.5", "fp32 (TF32 off), micro-batch 8", "throughput_sd15_norms_h200.json", "fp32 mb8 eager joint"),
    ("SD1.5", "bf16, micro-batch 12, split generator backward, fp32 norms, NHWC", "throughput_sd15_perf_h200.json",
     "bf16 mb12 eager split"),
    ("SDXL", "bf16, micro-batch 12 × 2 rounds, gradient checkpointing", "throughput_sdxl_mb8_h200.json",
     "bf16 mb12 eager joint autocast-norms"),
    ("SDXL", "bf16, micro-batch 8 × 2 rounds, gradient checkpointing", "throughput_sdxl_mb8_h200.json",
     "bf16 mb8 eager joint autocast-norms"),
    ("SDXL", "bf16, micro-batch 4 × 2 rounds, gradient checkpointing", "throughput_sdxl_h200.json",
     "bf16 mb4 eager joint autocast-norms"),
]


def run_of(record: dict, name: str | None) -> dict:
    metrics = record["metrics"]
    if name is None:
        return metrics
    for run in metrics.get("runs", []):
        if run.get("run") == name:
            return run
    raise KeyError(f"no run {name!r} in the record {record['name']!r}")


def _num(v, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def render(results: Path = RESULTS) -> str:
    """Return the markdown table, one line per row of ROWS."""
    lines = ["| model | setting | GPU | images/s | peak GiB | MFU | result |", "|---|---|---|---|---|---|---|"]
    for model, setting, file, name in ROWS:
        record = json.loads((results / file).read_text())
        run = run_of(record, name)
        gpu = record["device"].removeprefix("NVIDIA ")
        lines.append(f"| {model} | {setting} | {gpu} | {_num(run.get('images_per_s_per_gpu'), 2)} | "
                     f"{_num(run.get('peak_mem_gib'), 1)} | {_num(run.get('mfu'), 3)} | "
                     f"[`{file}`](benchmarks/results/{file}) |")
    return "\n".join(lines) + "\n"


def block(readme: str) -> str:
    """The README's current table block (between the markers, exclusive)."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} … {END} block")
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite README.md's block instead of printing")
    args = p.parse_args()
    table = render()
    if not args.write:
        sys.stdout.write(table)
        return
    text = README.read_text()
    block(text)  # refuses a README without the markers
    head, rest = text.split(START, 1)
    README.write_text(head + START + "\n" + table + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
