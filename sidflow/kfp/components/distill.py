"""KFP component `distill`: one-step SiD-LSG distillation of a published teacher (sidflow.stages.distill)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from sidflow.kfp import images

BASE_IMAGE = images.TRAINER  # containers/trainer (sidflow/kfp/images.py)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def distill(metrics: Output[Metrics], model: Output[Model], teacher: str = "", prompts: str = "", output: str = "",
            artifact_root: str = "", run_id: str = "", teacher_fingerprint: str = "", retries: int = 3,
            guidance: str = "lsg", kappa: float = 1.5, null_prompt: str = "auto", kappa_1: Optional[float] = None,
            kappa_2: Optional[float] = None, kappa_3: Optional[float] = None, kappa_4: Optional[float] = None,
            alpha: float = 1.0, t_min: int = 20, t_max: int = 980, t_init: int = 625, steps: int = 1,
            fake_dropout: float = 0.1, lr_fake: float = 1e-06, lr_g: float = 1e-06, adam_beta1: float = 0.0,
            adam_beta2: float = 0.999, adam_eps: float = 1e-08, batch: int = 512, micro_batch: int = 1,
            kimg: float = 10000.0, precision: str = "bf16", tf32: bool = False, grad_checkpointing: bool = False,
            clip_grad_value: Optional[float] = None, ema_halflife_kimg: float = 50.0, ema_rampup: float = 0.05,
            checkpoint_kimg: float = 100.0,
            keep_checkpoints: int = 3, log_every: int = 1, checkpoints: bool = True, profile: bool = False,
            seed: int = 0, sharding: str = "ddp", gpus: str = "1", resume: bool = True) -> str:
    """Distill `teacher` into a one-step generator under `output`; return the exported model's URI.

    Every parameter is the DistillConfig field of the same name, with the same default (sidflow.stages.distill;
    `sidflow distill --help` describes each). κ1..κ4 and clip_grad_value also take the pipeline's "unset" values
    (distill.PIPELINE_UNSET: -99 = from the guidance preset, 0 = no clipping). The model itself stays in the
    artifact store as a URI; `metrics` logs the training summary. An interrupted run (SIGTERM) fails the task so
    that its retry resumes it.

    Args:
        metrics: the distill result's numeric metrics, kimg and iterations.
        model: the exported generator's model card; its metadata holds the model URI (weights stay in S3).
        teacher: teacher URI (a published diffusers SD1.5/SD2.1-base/SDXL directory, local or s3://).
        prompts: training prompts URI: .txt (one per line) or .parquet with a 'prompt' column.
        output: run URI: config.json, checkpoints/, logs/ and model/ are written under it; empty: derived from
            artifact_root, run_id and teacher (sidflow.kfp.paths.run_output), as the pipeline does.
        artifact_root: artifact root URI the pipeline's runs go under (used when output is empty).
        run_id: the pipeline run's id, passed as the whole value dsl.PIPELINE_JOB_ID_PLACEHOLDER.
        teacher_fingerprint: the teacher's fingerprint: part of the task's cache key, so a new teacher version is
            never answered with an old run's outputs.
        retries: times a crashed training launch is started again in this pod, resuming from its newest checkpoint.
            KFP backends up to 2.17 drop set_retry for tasks inside a ParallelFor (kubeflow/pipelines #12389,
            #13897), so the task retries itself; a lost pod is retried only where the backend honours set_retry.
    """
    fields = {k: v for k, v in locals().items()
              if k not in ("metrics", "model", "artifact_root", "run_id", "teacher_fingerprint", "retries")}
    from sidflow.kfp.paths import run_output
    from sidflow.stages import distill as stage

    fields["output"] = output or run_output(artifact_root, run_id, teacher)

    cfg = stage.from_pipeline(fields)  # checks Literal values and types like the CLI does
    result = stage.launch_with_retries(cfg, retries)  # one process per GPU of the pod, re-launched after a crash
    print(stage.summary(result))
    for name, value in {"kimg": result.kimg, "iterations": result.iterations, **result.metrics}.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))
    if result.interrupted:
        raise RuntimeError(f"distill of {teacher} was interrupted at {result.kimg:.3f} kimg; a retry resumes it")
    from sidflow.generator import describe

    model.metadata.update(describe(result.model_uri, model.path))
    return result.model_uri


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(distill, "distill.yaml")
