"""`make demo`: the whole sid-distill pipeline under kfp.local on the bundled toy teacher, then the before/after table.

watch_teachers → download_teacher → distill (real SiD-LSG iterations on the CPU) → evaluate (shapes-FID and prompt
accuracy with the bundled evaluator) → register (champion if it passes the gate). The teacher rows go through the
same evaluate stage (DDIM, CFG κ) with the same prompts, seeds and reference, and so does the one-step generator
as distillation starts (the teacher's weights at t_init), so the table shows what distillation changed. Every
number printed is measured in this run. A second demo in the same directory finds the teacher already registered:
watch_teachers skips it.
"""

import json
import os
from pathlib import Path

TOY_TEACHER = Path(__file__).resolve().parent.parent / "examples" / "toy-teacher"
MODEL_NAME = "toy-sid"


def demo_parameters(root: Path, kimg: float, kappa: float, eval_set: dict) -> dict:
    """sid-distill parameters for a CPU run on the toy teacher (everything else at the pipeline's defaults)."""
    evaluator = str(TOY_TEACHER / "evaluator")
    return {"teachers": str(TOY_TEACHER), "registry": str(root / "registry"), "model_name": MODEL_NAME,
            "artifact_root": str(root / "artifacts"), "prompts": str(root / "prompts.txt"), "kappa": kappa,
            "batch": 32, "micro_batch": 32, "kimg": kimg, "checkpoint_kimg": kimg / 2, "precision": "fp32",
            "lr_g": 3e-5, "lr_fake": 3e-5, "ema_halflife_kimg": 0.5, "ema_rampup": 0.5,
            "eval_prompts": eval_set["prompts"], "eval_reference": eval_set["reference"], "eval_protocol": "native",
            "eval_features": f"toy:{evaluator}", "eval_scorer": f"toy:{evaluator}", "eval_batch": 128}


def export_start(uri: str, kappa: float) -> str:
    """Publish the one-step generator as distillation starts (the teacher's UNet fed at t_init) at `uri`, so the
    evaluate stage scores the starting point like the distilled model."""
    from sidflow.generator import export_generator, generator_info
    from sidflow.stages.distill import DistillConfig
    from sidflow.teacher import load_teacher

    cfg = DistillConfig(teacher=str(TOY_TEACHER), kappa=kappa)  # t_init and steps as the demo's pipeline run has
    teacher = load_teacher(cfg.teacher)
    export_generator(teacher.unet, teacher, uri, generator_info(cfg, 0, "teacher", {}))
    return uri


def run_demo(out: str, kimg: float = 3.2, n: int = 256, kappa: float = 2.0) -> dict | None:
    """Run the demo under `out`; print the table and the grid path; return {"rows": {name: metrics}, "champion",
    "model"}, or None if the pipeline registered no champion."""
    import warnings

    from sidflow import registry
    from sidflow.kfp.compile import run_local
    from sidflow.stages import evaluate
    from sidflow.toy import shapes
    from sidflow.toy.metrics import toy_eval_set

    # kfp.local warns that pod settings (GPUs, images, display names) do not apply on this machine: expected here.
    warnings.filterwarnings("ignore", module=r"kfp\..*")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SIDFLOW_CACHE", str(root / "cache"))
    os.environ.setdefault("SIDFLOW_NO_BAR", "1")  # kfp.local interleaves the tasks' output: bars would garble it
    (root / "prompts.txt").write_text("\n".join(sorted({shapes.caption(*c) for c in shapes.combos("train")})))
    evaluator = str(TOY_TEACHER / "evaluator")
    eval_set = toy_eval_set(str(root / "eval-set"), evaluator, n=n)
    reg = str(root / "registry")
    before = registry.champion(reg, MODEL_NAME)
    print(f"[1/3] sid-distill under kfp.local: artifacts in {root / 'artifacts'}, registry {reg}", flush=True)
    run_local(str(root / "kfp-root"), **demo_parameters(root, kimg, kappa, eval_set))
    champion = registry.champion(reg, MODEL_NAME)
    if champion is None:
        print("the pipeline registered no champion: see the task logs above")
        return None
    if before is not None and before.version == champion.version:
        print(f"      teacher already distilled (registry v{champion.version}); delete {root} to distill again")
    print(f"[2/3] registry: {MODEL_NAME} v{champion.version} is champion: {champion.model_uri}")

    print("[3/3] the teacher and the generator's starting point through the same evaluate stage (same prompts, seeds, "
          "reference)", flush=True)
    common = {"prompts": eval_set["prompts"], "reference": eval_set["reference"], "protocol": "native",
              "features": f"toy:{evaluator}", "scorer": f"toy:{evaluator}", "batch": 128}
    rows = {}
    for steps in (1, 25):
        result = evaluate.run(evaluate.EvaluateConfig(
            model=str(TOY_TEACHER), sampler="ddim", teacher_steps=steps, kappa=kappa,
            output=str(root / f"eval-teacher-{steps}"), **common))
        rows[f"teacher, {steps} DDIM step{'s' if steps > 1 else ''}, CFG {kappa:g}"] = result.metrics
    start = evaluate.run(evaluate.EvaluateConfig(model=export_start(str(root / "generator-start"), kappa),
                                                 output=str(root / "eval-generator-start"), **common))
    rows["one-step generator before distillation"] = start.metrics
    rows[f"distilled SiD-LSG, one step, κ {kappa:g}"] = champion.metrics
    print(f"\n| sampler | shapes-FID ↓ | prompt accuracy ↑ |   ({n} prompts, same seeds)\n|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['fid']:.1f} | {m['clip']:.3f} |")
    grids = sorted((root / "artifacts" / "runs").glob("*/*/grid.png"), key=os.path.getmtime)
    if grids:  # written by the evaluate task next to its metrics.json
        print(f"\nsample grid (distilled, one step, captioned): {grids[-1]}")
    print(json.dumps({"champion": champion.version, "model": champion.model_uri}))
    return {"rows": rows, "champion": champion.version, "model": champion.model_uri}
