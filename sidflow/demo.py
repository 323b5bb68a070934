"""`make demo`: the whole job that exists so far, on this machine, on a tiny teacher built from configs.

download-teacher → distill (a few real SiD-LSG iterations on the CPU) → generate a sample grid. The tiny teacher
has random weights, so its images are noise: the demo shows the machinery end to end, not image quality.
"""

import json
import os
from pathlib import Path


def run_demo(out: str) -> int:
    """Run the demo under `out`; print what was produced; return the exit code."""
    from PIL import Image

    from sidflow.generator import image_grid, load_generator, sample
    from sidflow.stages import distill, download_teacher
    from sidflow.toy.tiny import build_tiny_sd

    root = Path(out).resolve()
    built = root / "tiny-teacher-src"
    if not (built / "model_index.json").exists():
        build_tiny_sd(built, seed=0)
    (root / "prompts.txt").write_text("a red circle\na blue square on a grey background\na green triangle\n")
    os.environ.setdefault("SIDFLOW_CACHE", str(root / "cache"))

    step = download_teacher.run(download_teacher.DownloadTeacherConfig(source=str(built), dest=str(root / "teacher")))
    print(f"[1/3] teacher published at {step.uri} ({step.fingerprint[:23]}…, skipped={step.skipped})")
    cfg = distill.DistillConfig(teacher=step.uri, prompts=str(root / "prompts.txt"), output=str(root / "run"),
                                batch=4, micro_batch=2, kimg=0.032, checkpoint_kimg=0.016, precision="fp32",
                                lr_g=1e-5, lr_fake=1e-5, ema_halflife_kimg=0.01, resume=False)
    result = distill.run(cfg)
    print(f"[2/3] distilled {result.iterations} iterations ({result.kimg} kimg): model at {result.model_uri}")
    gen, info = load_generator(result.model_uri)
    prompts = ["a red circle", "a blue square on a grey background", "a green triangle", "a red circle"]
    grid = image_grid(sample(gen, info, prompts, list(range(len(prompts)))))
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(root / "samples.png")
    print(f"[3/3] one-step samples: {root / 'samples.png'}")
    lines = (root / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    print("\n| iteration | loss_fake | loss_g | images/s |\n|---|---|---|---|")
    for m in (first, last):
        print(f"| {m['iteration']} | {m['loss_fake']:.2f} | {m['loss_g']:.3f} | {m['images_per_s']:.1f} |")
    print("\nThe tiny teacher has random weights: the samples are noise by construction.")
    return 0
