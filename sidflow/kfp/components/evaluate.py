"""KFP component `evaluate`: FID and CLIP score of a model on a prompt set (sidflow.stages.evaluate)."""

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from sidflow.kfp import images

BASE_IMAGE = images.TRAINER  # CUDA: generation, Inception, CLIP (sidflow/kfp/images.py)
RUNTIME_IMAGE = images.RUNTIME  # CPU


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(metrics: Output[Metrics], samples: Output[HTML], model: str = "", prompts: str = "",
             reference: str = "", output: str = "", protocol: str = "coco30k", features: str = "inception",
             inception_weights: str = "", scorer: str = "openclip", clip_model: str = "ViT-g-14",
             clip_weights: str = "laion2b_s12b_b42k", clip_precision: str = "fp16", unet_dtype: str = "fp16",
             vae_dtype: str = "auto", compile_vae: bool = True, batch: int = 32, shard_size: int = 1024, limit: int = 0,
             grid: int = 16, workers: int = 0, gpus: str = "1", artifact_root: str = "", run_id: str = "",
             teacher: str = "") -> str:
    """Evaluate `model` and return the URI of its metrics.json.

    Every parameter is the EvaluateConfig field of the same name (`sidflow evaluate --help`); `limit` 0 and
    `workers` 0 mean None (all prompts, the default thread count). `metrics` shows fid, clip and images in the UI;
    `samples` is the captioned sample grid.

    Args:
        metrics: fid, clip, images and images/s of the evaluation.
        samples: HTML page with the captioned sample grid.
        model: exported generator URI (the distill task's output).
        output: URI the evaluation writes metrics.json, clip_scores.parquet, grid.png and row.md under; empty:
            `eval/` of the run directory derived from artifact_root, run_id and teacher, as the pipeline does.
        artifact_root: artifact root URI the pipeline's runs go under (used when output is empty).
        run_id: the pipeline run's id, passed as the whole value dsl.PIPELINE_JOB_ID_PLACEHOLDER.
        teacher: the distilled teacher's URI (names the run directory when output is empty).
    """
    import base64

    from sidflow import storage
    from sidflow.config import override
    from sidflow.kfp.paths import run_output
    from sidflow.stages import evaluate as stage

    output = output or storage.join(run_output(artifact_root, run_id, teacher), "eval")

    fields = {k: v for k, v in locals().items() if k in stage.EvaluateConfig.__dataclass_fields__}
    fields.update(limit=limit or None, workers=workers or None)
    result = stage.launch(override(stage.EvaluateConfig(), fields))  # one process per GPU of the pod
    print(stage.summary(result))
    for name in ("fid", "clip", "images", "images_per_s"):
        metrics.log_metric(name, float(result.metrics[name]))
    grid_uri = storage.join(output, "grid.png")
    page = "<p>no grid (grid = 0)</p>"
    if storage.exists(grid_uri):
        png = base64.b64encode(storage.read_bytes(grid_uri)).decode()
        page = f'<img alt="samples" src="data:image/png;base64,{png}">'
    with open(samples.path, "w") as f:
        f.write(f"<html><body><h3>{model}</h3><p>FID {result.fid:.3f}, score {result.clip:.4f} "
                f"({result.images} images)</p>{page}</body></html>")
    return result.metrics_uri


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def passes_gate(metrics: str, max_fid: float = 0.0) -> bool:
    """True when the evaluation's FID and score are finite and, if `max_fid` > 0, the FID is at most `max_fid`.

    A task of its own because a condition must read a task's single output (kfp.local resolves no named output
    there).

    Args:
        metrics: URI of the evaluation's metrics.json.
        max_fid: largest FID that is registered; 0 = any finite FID.
    """
    import json
    import math

    from sidflow import storage

    m = json.loads(storage.read_text(metrics))
    passed = math.isfinite(m["fid"]) and math.isfinite(m["clip"]) and (max_fid <= 0 or m["fid"] <= max_fid)
    print(f"fid {m['fid']:.4f}, score {m['clip']:.4f}: {'passes' if passed else 'fails'} the gate (max_fid={max_fid})")
    return passed


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(evaluate, "evaluate.yaml")
