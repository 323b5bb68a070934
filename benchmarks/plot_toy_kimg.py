"""Shapes-FID against training length for the toy table's one-step and few-step SiD rows, with the teacher's 25-step
line at each κ, drawn from toy_quality result files (no model runs).

Rows are comparable only when scored by the same evaluators, so one protocol is plotted: by default the evaluator
count with the most SiD points. Rows sharing (steps, κ, kimg), e.g. several seeds, are drawn as their mean with a
bar from the lowest to the highest. Fine-tuned rows (stage=finetune) are left out of those points. A row scored
along its course (`toy_quality.py --curve-kimg`) that started from the teacher is a line of its own.

    python benchmarks/plot_toy_kimg.py                        # benchmarks/results/toy_quality.json
    python benchmarks/plot_toy_kimg.py --source r.json --evaluators 3 --out $OUT
    python benchmarks/plot_toy_kimg.py --source benchmarks/results/toy_quality.json,benchmarks/results/\
toy_k4_curve_h200.json,benchmarks/results/toy_k4_lr_curve_h200.json --evaluators 3 --file toy_k4_curves.json
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, record  # noqa: E402

FAMILIES = ("sid-lsg", "sid-fewstep")


def kappa(row: dict) -> float | None:
    return row.get("kappa", row.get("guidance"))  # older rows name the guidance scale "guidance"


def evaluators(row: dict) -> int:
    return len(row.get("shapes_fid_by_evaluator") or [None])  # rows of the first protocol had one evaluator




def curved(row: dict) -> bool:
    # A run scored along its course (toy_quality --curve-kimg) that started from the teacher: drawn as its own line.
    return bool(row.get("curve")) and not (row.get("config") or {}).get("init")


def points(rows: list[dict], n_eval: int) -> tuple[dict, dict]:
    """Return ({"K<steps> κ<kappa>": [{kimg, fid, low, high, runs}]}, {"κ<kappa>": teacher 25-step FID}). A row with
    a curve is a series of its own, named by its row and the settings it was given."""
    runs = defaultdict(lambda: defaultdict(list))
    series, kappas = {}, set()
    configs = [r.get("config") or {} for r in rows if curved(r) and evaluators(r) == n_eval]
    shared = {k for k in set().union(*configs) if len({str(c.get(k)) for c in configs}) == 1} | {"steps", "kappa"}
    for r in rows:
        if evaluators(r) != n_eval:
            continue
        if curved(r):  # labelled by the settings that tell it from the other curves (steps and κ are in its name)
            given = ", ".join(f"{k}={v}" for k, v in (r.get("config") or {}).items() if k not in shared)
            series[f"{r['row']} K{r['steps']} κ{kappa(r):g}" + (f" ({given})" if given else "")] = [
                {"kimg": p["kimg"], "fid": p["shapes_fid"], "low": p["shapes_fid"], "high": p["shapes_fid"], "runs": 1}
                for p in r["curve"]]
            kappas.add(kappa(r))
        elif r["row"] in FAMILIES and (r.get("config") or {}).get("stage") != "finetune":
            runs[r["steps"], kappa(r)][round(r["images_seen"] / 1000)].append(r["shapes_fid"])
    series = {f"K{steps} κ{k:g}": [{"kimg": kimg, "fid": round(sum(v) / len(v), 3), "low": min(v), "high": max(v),
                                    "runs": len(v)} for kimg, v in sorted(by_kimg.items())]
              for (steps, k), by_kimg in sorted(runs.items())} | series
    kappas |= {k for _, k in runs}
    teacher = {f"κ{kappa(r):g}": r["shapes_fid"] for r in rows
               if r["row"] == "teacher" and r["steps"] == 25 and evaluators(r) == n_eval and kappa(r) in kappas}
    return series, teacher


def plot(series: dict, teacher: dict, n_eval: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2 + 0.2 * len(series)), dpi=120)
    for name, pts in series.items():
        xs, ys = [p["kimg"] for p in pts], [p["fid"] for p in pts]
        err = [[max(0, p["fid"] - p["low"]) for p in pts], [max(0, p["high"] - p["fid"]) for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"SiD {name}")
    for (k, fid), style in zip(teacher.items(), ["--", ":", "-.", (0, (5, 5))]):
        ax.axhline(fid, linestyle=style, color="black", label=f"teacher 25 steps {k}")
    ax.set_xlabel("kimg (thousands of images the generator was trained on)")
    ax.set_ylabel(f"shapes-FID (mean of {n_eval} evaluator{'s' if n_eval > 1 else ''}; lower is better)")
    ax.set_title("Toy teacher: SiD against training length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below the axes: long curve labels
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # the legend below the axes stays in the picture
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(RESULTS / "toy_quality.json"),
                   help="toy_quality result files, comma-separated (their rows are drawn together)")
    p.add_argument("--evaluators", type=int, default=None, help="plot the rows scored by this many evaluators "
                   "(default: the count with the most SiD points)")
    p.add_argument("--file", default="toy_fid_vs_kimg.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    rows = [r for source in args.source.split(",") for r in json.loads(Path(source).read_text())["metrics"]["rows"]]
    counts = defaultdict(int)
    for r in rows:
        if r["row"] in FAMILIES or curved(r):
            counts[evaluators(r)] += 1
    if not counts:
        sys.exit(f"{args.source}: no sid-lsg or sid-fewstep rows and no curves to plot")
    n_eval = args.evaluators or max(counts, key=counts.get)
    series, teacher = points(rows, n_eval)
    if not series:
        sys.exit(f"{args.source}: no SiD rows scored by {n_eval} evaluators (there are {dict(counts)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / (Path(args.file).stem + ".png")
    plot(series, teacher, n_eval, png)
    record("toy_fid_vs_kimg", args.file, 0, {"evaluators": n_eval, "series": series, "teacher_25": teacher,
                                             "png": png.name}, {k: v for k, v in vars(args).items() if k != "out"}, out)


if __name__ == "__main__":
    main()
