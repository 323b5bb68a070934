"""Scaling on one host: the same `sidflow distill` command on 1 and N GPUs, DDP and FSDP, same global batch and seed.

Reports images/s for each GPU count and placement, the speed-up and scaling efficiency against one GPU, peak
memory, and how far the per-iteration losses of each run are from the 1-GPU run (every draw is keyed by the global
micro-batch index, so the runs differ only by floating-point reduction order). On one GPU both placements are the
same unsharded program, so that run is measured once and is the reference of both. SD1.5 configs with random
weights (SDXL's with --model sdxl): no download. The result file is rewritten after every run, so a cut-off
call keeps what it measured.

  python benchmarks/ddp.py --model sd15 --gpus 1,2 --micro-batch 8 --batch 32 --iters 6 --warmup 2
  python benchmarks/ddp.py --model sd15 --gpus 1,2,4,8 --sharding ddp,fsdp --batch 128 --file scaling.json
  python benchmarks/ddp.py --model sdxl --gpus 1,2,4,8 --sharding fsdp --micro-batch 2 --batch 16 --grad-checkpointing
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import MODELS, RESULTS, record, synthetic_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="sd15")
    p.add_argument("--gpus", default="1,2", help="comma-separated GPU counts; the first is the reference")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="global batch, the same for every GPU count")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sharding", default="ddp", help="comma-separated placements: ddp, fsdp")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--file", default="scaling_h200x2.json")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from sidflow.config import to_args
    from sidflow.launch import run_per_gpu
    from sidflow.stages.distill import DistillConfig, validate

    os.environ["SIDFLOW_NO_BAR"] = "1"  # the runs' progress bars (their metrics lines are what is read)

    work, teacher, prompts = synthetic_run(args.model, "sidflow-ddp-")
    counts = [int(n) for n in args.gpus.split(",")]
    modes = args.sharding.split(",")
    runs: dict[tuple[str, int], list[dict]] = {}
    failed: dict[tuple[str, int], str] = {}
    for mode in modes:
        for n in counts:
            if n == 1 and (modes[0], 1) in runs:  # one GPU: the same unsharded program in every placement
                runs[mode, 1] = runs[modes[0], 1]
                continue
            out = work / f"run-{mode}-{n}"
            cfg = DistillConfig(teacher=teacher, prompts=prompts, output=str(out), gpus=str(n), kappa=1.5,
                                batch=args.batch, micro_batch=args.micro_batch, checkpoints=False,
                                kimg=args.batch * (args.warmup + args.iters) / 1000, ema_halflife_kimg=0,
                                grad_checkpointing=args.grad_checkpointing, sharding=mode)
            # Each run is fresh processes, so no run inherits another's GPU memory or caches: `sidflow distill` on
            # one GPU, and on N the N processes it would start itself (torchrun), started here directly.
            if n == 1:
                rc = subprocess.run([sys.executable, "-m", "sidflow.cli", "distill", *to_args(cfg)]).returncode
            else:
                validate(cfg, world_size=n)
                rc = run_per_gpu("distill", cfg, n)[0]
            if rc:  # recorded as failed; the other placements and counts still run
                failed[mode, n] = f"sidflow distill exited with {rc}"
            else:
                runs[mode, n] = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
            _record(args, runs, failed, modes, counts, final=(mode, n) == (modes[-1], counts[-1]))


def _record(args, runs: dict, failed: dict, modes: list[str], counts: list[int], final: bool) -> None:
    ref = counts[0]
    ips = {key: statistics.median(x["images_per_s"] for x in lines[args.warmup:]) for key, lines in runs.items()}
    mem = {key: max(x.get("peak_mem_gib", 0) for x in lines) for key, lines in runs.items()}
    metrics: dict = {}
    for mode in modes:
        done = [n for n in counts if (mode, n) in runs]
        base = ips.get((mode, ref))
        metrics[mode] = [{"gpus": n, "images_per_s": round(ips[mode, n], 3),
                          "images_per_s_per_gpu": round(ips[mode, n] / n, 3),
                          "efficiency": round(ips[mode, n] * ref / (base * n), 3) if base else None,
                          "peak_mem_gib": mem[mode, n],
                          "max_rel_diff_loss_fake": max(abs(a["loss_fake"] - b["loss_fake"]) / abs(b["loss_fake"])
                                                        for a, b in zip(runs[mode, n], runs[mode, ref])),
                          "loss_g": [round(x["loss_g"], 4) for x in runs[mode, n]]} for n in done]
        metrics[mode] += [{"gpus": n, "error": failed[mode, n]} for n in counts if (mode, n) in failed]
    first = modes[0]  # the flat names of scaling_h200x2.json: the first placement
    if len(counts) == 2 and counts[0] == 1 and (first, counts[1]) in runs:
        metrics.update(images_per_s_1gpu=round(ips[first, 1], 3), images_per_s_2gpu=round(ips[first, counts[1]], 3),
                       scaling_2gpu=round(ips[first, counts[1]] / (2 * ips[first, 1]), 3))
    record("scaling_" + args.model, args.file, max(n for _, n in runs), metrics,
           {k: v for k, v in vars(args).items() if k != "out"}, Path(args.out), final=final)

if __name__ == "__main__":
    main()
