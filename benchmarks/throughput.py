"""Throughput of real SiD-LSG iterations through `sidflow distill` on a teacher built from published configs.

The SD1.5 teacher (UNet, CLIP-L text tower, VAE) has random weights: no download. The run goes through the stage
itself (validate, load, copy, train, export) with `profile` on, so each phase is timed between GPU synchronizations.
Images/s is the median over the iterations after `--warmup`. TFLOP/s counts the UNet work of one sample-iteration
(method.md §4): G forward (fake step) + fake forward·backward (×2 batch when κ1 ≠ 1) + G forward·backward +
teacher and fake forward·input-backward (×2 batch when guided), with a backward costing 2 forwards (1 for an
input-only backward), and the forward FLOPs counted by torch.utils.flop_counter.

  python benchmarks/throughput.py --model sd15 --micro-batch 8 --rounds 2 --iters 6
  python benchmarks/throughput.py --model sdxl --gpus 2 --sharding fsdp --micro-batch 1 --rounds 4 \
      --grad-checkpointing --file throughput_sdxl_h200x2.json                  # per GPU, FSDP on 2 GPUs
  python benchmarks/throughput.py --model tiny --iters 3 --out /tmp/results      # CPU smoke run
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import MODELS, RESULTS, record, synthetic_run  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 peak of the SXM parts


def forward_tflop(teacher) -> float:
    """Return TFLOP of one UNet forward on one sample (counted, not estimated), with the teacher's conditioning."""
    from torch.utils.flop_counter import FlopCounterMode

    from sidflow.teacher import score_net

    device = next(teacher.unet.parameters()).device
    x = torch.randn(1, *teacher.latent_shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        score_net(teacher.unet)(x, torch.tensor([500], device=device), teacher.encode(["a photo"]).to(device))
    return counter.get_total_flops() / 1e12


def forward_equivalents(k1: float, k2: float, k4: float) -> float:
    """Return UNet forward-equivalents per sample-iteration for the given κ's (method.md §4 cost line)."""
    x = lambda k: 1 if k in (0, 1) else 2  # noqa: E731  guided evaluations double the batch
    fake_step = 1 + x(k1) * 3  # G forward, fake forward + full backward
    gen_step = 3 + x(k4) * 2 + x(k2) * 2  # G forward + full backward; teacher and fake forward + input backward
    return fake_step + gen_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="sd15")
    p.add_argument("--gpus", type=int, default=1, help="processes (one per GPU); figures are per GPU")
    p.add_argument("--sharding", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="accumulation rounds per phase")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kappa", type=float, default=1.5)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--ema", type=float, default=50.0, help="EMA half-life kimg (0 = off)")
    p.add_argument("--file", default=None, help="result file name (default throughput_<model>_<precision>.json)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from sidflow.stages.distill import DistillConfig, launch
    from sidflow.teacher import load_teacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work, teacher, prompts = synthetic_run(args.model, "sidflow-bench-")
    batch = args.micro_batch * args.rounds * args.gpus
    cfg = DistillConfig(teacher=teacher, prompts=prompts, output=str(work / "run"), kappa=args.kappa,
                        batch=batch, micro_batch=args.micro_batch, kimg=batch * (args.warmup + args.iters) / 1000,
                        precision=args.precision, grad_checkpointing=args.grad_checkpointing,
                        ema_halflife_kimg=args.ema, checkpoints=False, profile=True, gpus=str(args.gpus),
                        sharding=args.sharding)
    launch(cfg)
    lines = [json.loads(x) for x in (work / "run" / "logs" / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    ips = statistics.median(x["images_per_s"] for x in lines) / args.gpus
    phases = {k.removeprefix("phase_").removesuffix("_s"): statistics.median(x[k] for x in lines)
              for k in lines[0] if k.startswith("phase_")}
    fwd = forward_tflop(load_teacher(teacher, device))
    per_sample = fwd * forward_equivalents(args.kappa, args.kappa, args.kappa)
    tflops = ips * per_sample
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    metrics = {
        "images_per_s_per_gpu": round(ips, 3),
        "tflops_per_gpu": round(tflops, 1),
        "mfu": round(tflops / peak, 3) if peak else None,
        "peak_mem_gib": max(x.get("peak_mem_gib", 0) for x in lines) if device.type == "cuda" else None,  # rank 0
        "micro_batch": args.micro_batch,
        "precision": args.precision,
        "phase_split": {k: round(v / sum(phases.values()), 3) for k, v in phases.items()},
        "phase_seconds": {k: round(v, 4) for k, v in phases.items()},
        "unet_forward_tflop_per_sample": float(f"{fwd:.4g}"),
        "iterations_timed": len(lines),
        "loss_g_last": lines[-1]["loss_g"],
        "loss_fake_last": lines[-1]["loss_fake"],
    }
    name = f"throughput_{args.model.replace('-', '_')}" + ("" if args.precision == "bf16" else "_fp32")
    tag = next((k.lower() for k in PEAK_BF16_TFLOPS if k in gpu), "cpu" if gpu == "cpu" else "gpu")
    file = args.file or f"{name}_{tag}.json"
    config = {**vars(args), "batch": batch, "weights": "random (published config, no download)"}
    record(name, file, args.gpus, metrics, config, Path(args.out))


if __name__ == "__main__":
    main()
