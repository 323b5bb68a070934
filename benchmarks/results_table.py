"""The README's throughput table and docs/benchmarks.md's GPU-time profile, rendered from the committed result files
(no model runs).

Each row (profile column) names a result file and the run in it (a sweep's `metrics.runs[*].run`, or none for a
one-run record); images/s, peak memory, MFU, the device and the kernel times come from the file, so the tables
cannot drift from what was measured. `make results-table` rewrites the blocks between their markers; a test fails
when one is stale.

    python benchmarks/results_table.py            # print both tables
    python benchmarks/results_table.py --write    # rewrite the blocks in README.md and docs/benchmarks.md
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- throughput-table:start (benchmarks/results_table.py) -->", "<!-- throughput-table:end -->"
PROFILE_START, PROFILE_END = ("<!-- profile-table:start (benchmarks/results_table.py) -->",
                              "<!-- profile-table:end -->")

# (model, what the row runs, result file, run name in its sweep or None). One-step SiD-LSG κ 1.5, EMA on, random
# weights from the published configs; rows of one file were measured in one command.
ROWS = [
    ("SD1.5", "bf16, micro-batch 20, the defaults (fp32 norms, NCHW)", "throughput_sd15_norms_nchw_h200.json",
     "bf16 mb20 eager joint channels_last=false"),
    ("SD1.5", "bf16, micro-batch 20, `norms=autocast` (bf16 norms), NCHW", "throughput_sd15_norms_nchw_h200.json",
     "bf16 mb20 eager joint autocast-norms channels_last=false"),
    ("SD1.5", "bf16, micro-batch 24, `norms=autocast`, NCHW", "throughput_sd15_mb24_nchw_h200.json",
     "bf16 mb24 eager joint autocast-norms channels_last=false"),
    ("SD1.5", "bf16, micro-batch 28, `norms=autocast`, NCHW", "throughput_sd15_mb24_nchw_h200.json",
     "bf16 mb28 eager joint autocast-norms channels_last=false"),
    ("SD1.5", "bf16, micro-batch 12, fp32 norms, NHWC", "throughput_sd15_norms_h200.json",
     "bf16 mb12 eager joint"),
    ("SD1.5", "bf16, micro-batch 12, bf16 norms, NHWC", "throughput_sd15_norms_h200.json",
     "bf16 mb12 eager joint autocast-norms"),
    ("SD1.5", "bf16, micro-batch 8, bf16 norms, NHWC", "throughput_sd15_norms_h200.json",
     "bf16 mb8 eager joint autocast-norms"),
    ("SD1.5", "fp32 (TF32 off), micro-batch 8", "throughput_sd15_norms_h200.json", "fp32 mb8 eager joint"),
    ("SD1.5", "bf16, micro-batch 12, split generator backward, fp32 norms, NHWC", "throughput_sd15_perf_h200.json",
     "bf16 mb12 eager split"),
    ("SDXL", "bf16, micro-batch 12 × 2 rounds, gradient checkpointing, `norms=autocast`",
     "throughput_sdxl_mb8_h200.json",
     "bf16 mb12 eager joint autocast-norms"),
    ("SDXL", "bf16, micro-batch 8 × 2 rounds, gradient checkpointing, `norms=autocast`",
     "throughput_sdxl_mb8_h200.json",
     "bf16 mb8 eager joint autocast-norms"),
    ("SDXL", "bf16, micro-batch 4 × 2 rounds, gradient checkpointing, `norms=autocast`",
     "throughput_sdxl_h200.json",
     "bf16 mb4 eager joint autocast-norms"),
]


# One SD1.5 joint iteration at micro-batch 12 (bf16, EMA on) under torch.profiler (`--torch-profile`), before and
# after the norms and layout defaults: (column, result file, run). The last two ran in one command.
PROFILES = [
    ("fp32 norms, NHWC (before)", "throughput_sd15_norms_h200.json", "bf16 mb12 eager joint"),
    ("bf16 norms, NHWC", "throughput_sd15_layout_h200.json", "bf16 mb12 eager joint autocast-norms"),
    ("bf16 norms, NCHW", "throughput_sd15_layout_h200.json",
     "bf16 mb12 eager joint autocast-norms channels_last=false"),
]
KINDS = ("convolution", "matmul", "attention", "norm", "elementwise and reduction", "copy and layout",
         "optimizer and EMA", "other")
STEP_RANGE = "ProfilerStep*"  # the step's own range, which records before 3614f23 counted as a kernel


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


def kernel_ms(profile: dict) -> dict[str, float]:
    """GPU milliseconds per kernel kind of one profiled iteration, the step's own range left out of "other"."""
    step = sum(k["pct"] for k in profile.get("top_other", []) if k["kernel"] == STEP_RANGE)
    ms = {kind: profile["total_ms"] * profile["kinds_pct"].get(kind, 0.0) / 100 for kind in KINDS}
    ms["other"] -= profile["total_ms"] * step / 100
    return ms


def render_profile(results: Path = RESULTS) -> str:
    """Return the markdown table of kernel time per kind (ms, and % of the column's total), one column per PROFILES."""
    columns = [kernel_ms(run_of(json.loads((results / f).read_text()), name)["torch_profile"])
               for _, f, name in PROFILES]
    totals = [sum(c.values()) for c in columns]
    lines = ["| kernel kind | " + " | ".join(label for label, _, _ in PROFILES) + " |",
             "|---|" + "---|" * len(PROFILES)]
    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(f"{c[kind]:.0f} ms ({100 * c[kind] / t:.1f}%)"
                                                 for c, t in zip(columns, totals)) + " |")
    lines.append("| **all kernels** | " + " | ".join(f"**{t:.0f} ms**" for t in totals) + " |")
    lines.append("| result | " + " | ".join(f"`{f}`" for _, f, _ in PROFILES) + " |")
    return "\n".join(lines) + "\n"


def block(text: str, start: str = START, end: str = END) -> str:
    """A document's current table block (between the markers, exclusive)."""
    if start not in text or end not in text:
        raise SystemExit(f"no {start} … {end} block")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def _write(path: Path, start: str, end: str, table: str) -> None:
    text = path.read_text()
    block(text, start, end)  # refuses a document without the markers
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + table + end + rest.split(end, 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite the blocks instead of printing")
    args = p.parse_args()
    table, profile = render(), render_profile()
    if not args.write:
        sys.stdout.write(table + "\n" + profile)
        return
    _write(README, START, END, table)
    _write(BENCHMARKS, PROFILE_START, PROFILE_END, profile)


if __name__ == "__main__":
    main()
