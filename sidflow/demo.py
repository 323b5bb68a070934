"""`make demo`: distill the bundled toy teacher on this machine and show the before/after table.

download-teacher → distill (real SiD-LSG iterations on the CPU) → one-step samples, scored with the bundled shapes
evaluator against the teacher at 1 and 25 DDIM steps. Every number printed is measured in this run.
"""

import os
from pathlib import Path

TOY_TEACHER = Path(__file__).resolve().parent.parent / "examples" / "toy-teacher"


def run_demo(out: str, kimg: float = 3.2, n: int = 256, kappa: float = 2.0) -> int:
    """Run the demo under `out`; print the table and the grid path; return the exit code."""
    import numpy as np
    from PIL import Image

    from sidflow.generator import image_grid, load_generator, sample
    from sidflow.stages import distill, download_teacher
    from sidflow.teacher import load_teacher
    from sidflow.toy import evaluator, shapes
    from sidflow.toy.train_teacher import sample_teacher

    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SIDFLOW_CACHE", str(root / "cache"))
    (root / "prompts.txt").write_text("\n".join(sorted({shapes.caption(*c) for c in shapes.combos("train")})))

    step = download_teacher.run(download_teacher.DownloadTeacherConfig(source=str(TOY_TEACHER),
                                                                       dest=str(root / "teacher")))
    print(f"[1/3] teacher published at {step.uri} ({step.fingerprint[:23]}…, skipped={step.skipped})")
    cfg = distill.DistillConfig(teacher=step.uri, prompts=str(root / "prompts.txt"), output=str(root / "run"),
                                kappa=kappa, batch=32, micro_batch=32, kimg=kimg, checkpoint_kimg=kimg / 2,
                                precision="fp32", lr_g=1e-5, lr_fake=1e-5, ema_halflife_kimg=0.5, ema_rampup=0.5,
                                resume=False)
    result = distill.run(cfg)
    print(f"[2/3] distilled {result.iterations} iterations ({result.kimg} kimg): model at {result.model_uri}")

    model = evaluator.load(TOY_TEACHER / "evaluator")
    captions = shapes.sample(n, 12_345, "train")[1]
    reference = shapes.sample(4 * n, 777, "train")[0]
    seeds = list(range(n))
    teacher = load_teacher(step.uri)
    gen, info = load_generator(result.model_uri)
    rows = {f"teacher, 1 DDIM step, CFG {kappa}": sample_teacher(teacher, captions, seeds, 1, kappa),
            f"teacher, 25 DDIM steps, CFG {kappa}": sample_teacher(teacher, captions, seeds, 25, kappa),
            f"distilled SiD-LSG one-step, κ {kappa}": sample(gen, info, captions, seeds, batch=128)}
    grid = np.concatenate([image_grid(images[:12], cols=12) for images in rows.values()])
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(root / "samples.png")
    print(f"[3/3] samples (rows: {', '.join(rows)}): {root / 'samples.png'}\n")
    print(f"| sampler | shapes-FID ↓ | prompt accuracy ↑ |   ({n} prompts, same seeds)\n|---|---|---|")
    for name, images in rows.items():
        fid = evaluator.shapes_fid(model, images, reference)
        print(f"| {name} | {fid:.1f} | {evaluator.prompt_accuracy(model, images, captions):.3f} |")
    return 0
