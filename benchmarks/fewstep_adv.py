"""Cost of a few-step iteration with the adversarial term against a one-step SiD-LSG iteration, in one command.

Both runs go through their stages (`sidflow distill`, then `sidflow finetune` with real pairs) on one teacher built
from published configs with random weights (no download), same micro-batch and rounds, `profile` on. The pairs are
random-noise images with captions, packed and encoded by the stage as a user's would be. A K-step iteration draws
one k ~ U{1..K}, so its time varies with k: images/s is all timed images over all their time (the median of a mixture
would pick one k), and the ratio is one-step images/s over K-step images/s.

  python benchmarks/fewstep_adv.py --model sd15 --micro-batch 8 --rounds 2 --iters 8 --file fewstep_adv_sd15_h200.json
  python benchmarks/fewstep_adv.py --model tiny --micro-batch 2 --rounds 1 --iters 2 --out /tmp/results  # CPU smoke
"""

import argparse
import io
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import MODELS, RESULTS, record, synthetic_run  # noqa: E402


def _pairs(out: str, n: int, size: int) -> None:
    from PIL import Image

    from sidflow.pairs import pack

    rng = np.random.default_rng(0)

    def rows():
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
            yield buf.getvalue(), f"a photo of object number {i}"

    pack(rows(), out)


def _timed(run_dir: Path, warmup: int, gpus: int) -> dict:
    lines = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()][warmup:]
    phases = {k.removeprefix("phase_").removesuffix("_s"): statistics.mean(x[k] for x in lines)
              for k in lines[0] if k.startswith("phase_")}
    # Images over time of the timed iterations: the harmonic mean of the per-iteration rates.
    return {"images_per_s_per_gpu": round(statistics.harmonic_mean([x["images_per_s"] for x in lines]) / gpus, 3),
            "peak_mem_gib": max(x.get("peak_mem_gib", 0) for x in lines) if torch.cuda.is_available() else None,
            "phase_seconds_mean": {k: round(v, 4) for k, v in phases.items()}, "iterations_timed": len(lines),
            "loss_g_last": lines[-1]["loss_g"], "loss_fake_last": lines[-1]["loss_fake"],
            **{k: lines[-1][k] for k in ("loss_disc", "loss_adv") if k in lines[-1]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="sd15")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="K of the few-step run")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kappa", type=float, default=1.5)
    p.add_argument("--guidance", default="lsg", help="guidance of the few-step run (lsg, zero_cfg, anti_cfg)")
    p.add_argument("--pairs", type=int, default=256, help="real pairs to pack and encode")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--file", default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from sidflow.stages import distill, finetune
    from sidflow.teacher import load_teacher

    work, teacher, prompts = synthetic_run(args.model, "sidflow-fewstep-")
    size = load_teacher(teacher).image_size
    _pairs(str(work / "pairs"), args.pairs, size)
    batch = args.micro_batch * args.rounds * args.gpus
    common = dict(teacher=teacher, prompts=prompts, kappa=args.kappa, batch=batch, micro_batch=args.micro_batch,
                  kimg=batch * (args.warmup + args.iters) / 1000, grad_checkpointing=args.grad_checkpointing,
                  checkpoints=False, profile=True, gpus=str(args.gpus))
    distill.launch(distill.DistillConfig(**common, output=str(work / "one")))
    one = _timed(work / "one", args.warmup, args.gpus)
    kappa = -0.5 if args.guidance == "anti_cfg" else args.kappa
    finetune.launch(finetune.FinetuneConfig(**{**common, "kappa": kappa}, output=str(work / "few"), steps=args.steps,
                                            guidance=args.guidance, data=str(work / "pairs")))
    few = _timed(work / "few", args.warmup, args.gpus)
    metrics = {"one_step_lsg": one, f"k{args.steps}_adv": few,
               "cost_ratio": round(one["images_per_s_per_gpu"] / few["images_per_s_per_gpu"], 3),
               "memory_ratio": (round(few["peak_mem_gib"] / one["peak_mem_gib"], 3)
                                if one["peak_mem_gib"] else None)}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else "cpu" if gpu == "cpu" else "gpu"
    file = args.file or f"fewstep_adv_{args.model.replace('-', '_')}_{tag}.json"
    config = {**vars(args), "batch": batch, "weights": "random (published config, no download)"}
    record("fewstep_adv", file, args.gpus, metrics, config, Path(args.out))


if __name__ == "__main__":
    main()
