"""DDP on one host: the same `sidflow distill` command on 1 and N GPUs, same global batch and seed.

Reports images/s for each GPU count, the speed-up and scaling efficiency against one GPU, and how far the
per-iteration losses of each run are from the 1-GPU run (every draw is keyed by the global micro-batch index,
so the runs differ only by floating-point reduction order). SD1.5 configs with random weights: no download.

  python benchmarks/ddp.py --model sd15 --gpus 1,2 --micro-batch 8 --batch 32 --iters 6 --warmup 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, record  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--gpus", default="1,2", help="comma-separated GPU counts; the first is the reference")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="global batch, the same for every GPU count")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--file", default="scaling_h200x2.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from sidflow.toy.tiny import SD15, build_sd, tiny_configs

    work = Path(tempfile.mkdtemp(prefix="sidflow-ddp-"))
    teacher = build_sd(work / "teacher", SD15 if args.model == "sd15" else tiny_configs())
    (work / "prompts.txt").write_text("\n".join(f"a photo of object number {i}" for i in range(1000)))
    counts = [int(n) for n in args.gpus.split(",")]
    runs = {}
    for n in counts:
        cmd = [sys.executable, "-m", "sidflow.cli", "distill", "--teacher", teacher, "--prompts",
               str(work / "prompts.txt"), "--output", str(work / f"run-{n}"), "--gpus", str(n), "--kappa", "1.5",
               "--batch", str(args.batch), "--micro-batch", str(args.micro_batch), "--checkpoints", "false",
               "--kimg", str(args.batch * (args.warmup + args.iters) / 1000), "--ema-halflife-kimg", "0",
               "--grad-checkpointing", str(args.grad_checkpointing).lower()]
        subprocess.run(cmd, check=True, env={**os.environ, "SIDFLOW_NO_BAR": "1"})
        runs[n] = [json.loads(x) for x in (work / f"run-{n}" / "logs" / "metrics.jsonl").read_text().splitlines()]
    ref = counts[0]
    ips = {n: statistics.median(x["images_per_s"] for x in runs[n][args.warmup:]) for n in counts}
    metrics = {
        "images_per_s": {str(n): round(v, 3) for n, v in ips.items()},
        "images_per_s_per_gpu": {str(n): round(v / n, 3) for n, v in ips.items()},
        "speedup": {str(n): round(ips[n] / ips[ref], 3) for n in counts},
        "efficiency": {str(n): round(ips[n] * ref / (ips[ref] * n), 3) for n in counts},
        "loss_g": {str(n): [round(x["loss_g"], 4) for x in runs[n]] for n in counts},
        "loss_fake": {str(n): [round(x["loss_fake"], 4) for x in runs[n]] for n in counts},
        "max_rel_diff_loss_fake": {str(n): max(abs(a["loss_fake"] - b["loss_fake"]) / abs(b["loss_fake"])
                                               for a, b in zip(runs[n], runs[ref])) for n in counts},
    }
    if len(counts) == 2 and counts[0] == 1:  # the names benchmarks.md gives scaling_h200x2.json
        metrics.update(images_per_s_1gpu=metrics["images_per_s"]["1"],
                       images_per_s_2gpu=metrics["images_per_s"][str(counts[1])],
                       scaling_2gpu=metrics["efficiency"][str(counts[1])])
    record("ddp_" + args.model, args.file, max(counts), metrics, {k: v for k, v in vars(args).items() if k != "out"},
           Path(args.out))


if __name__ == "__main__":
    main()
