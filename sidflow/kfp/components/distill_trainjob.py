"""KFP component `distill_trainjob`: distill on several nodes through a Kubeflow Trainer v2 TrainJob (sidflow.trainjob).

The task itself runs on the CPU runtime image and only orchestrates: it creates the TrainJob (the trainer image on
`distill_nodes` nodes × `gpus` GPUs), polls it until it is Complete or Failed, then reads the exported model.
Its ServiceAccount needs create/get/delete on trainjobs.trainer.kubeflow.org (manifests/base/rbac-trainjobs.yaml).
"""

from typing import Optional

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from sidflow.kfp import images

BASE_IMAGE = images.RUNTIME  # containers/runtime (sidflow/kfp/images.py)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def distill_trainjob(metrics: Output[Metrics], model: Output[Model], trainer_image: str, distill_nodes: int = 1,
                     gpu_node_selector: dict = {}, gpu_tolerations: list = [], distill_cpu: str = "8",
                     distill_memory: str = "64G", teacher: str = "", prompts: str = "", output: str = "",
                     artifact_root: str = "", run_id: str = "", teacher_fingerprint: str = "", retries: int = 3,
                     guidance: str = "lsg", kappa: float = 1.5, null_prompt: str = "auto",
                     kappa_1: Optional[float] = None, kappa_2: Optional[float] = None, kappa_3: Optional[float] = None,
                     kappa_4: Optional[float] = None, alpha: float = 1.0, t_min: int = 20, t_max: int = 980,
                     t_init: int = 625, steps: int = 1, fake_dropout: float = 0.1, lr_fake: float = 1e-06,
                     lr_g: float = 1e-06, adam_beta1: float = 0.0, adam_beta2: float = 0.999, adam_eps: float = 1e-08,
                     batch: int = 512, micro_batch: int = 1, kimg: float = 10000.0, precision: str = "bf16",
                     tf32: bool = False, grad_checkpointing: bool = False, clip_grad_value: Optional[float] = None,
                     ema_halflife_kimg: float = 50.0, ema_rampup: float = 0.05, checkpoint_kimg: float = 100.0,
                     keep_checkpoints: int = 3,
                     log_every: int = 1, checkpoints: bool = True, profile: bool = False, seed: int = 0,
                     sharding: str = "ddp", gpus: str = "1", resume: bool = True) -> str:
    """Distill `teacher` on `distill_nodes` nodes × `gpus` GPUs as a TrainJob; return the exported model's URI.

    The distill parameters are those of the `distill` component (DistillConfig fields, the same defaults and the
    same "unset" values); `gpus` counts the GPUs of each node. A retried task adopts the TrainJob its previous
    attempt created (the name derives from `output`), or replaces it if it failed; distill resumes from its newest
    checkpoint either way.

    Args:
        metrics: the final training metrics line and kimg.
        model: the exported generator's model card; its metadata holds the model URI (weights stay in S3).
        trainer_image: image of the training pods (containers/trainer).
        distill_nodes: distill nodes: 1 = one pod (the KFP task itself); more = a Kubeflow Trainer TrainJob of that
            many nodes with `gpus` GPUs each.
        gpu_node_selector: node labels the GPU pods must carry; {} = any.
        gpu_tolerations: tolerations of the GPU pods (Kubernetes JSON).
        distill_cpu: CPUs of the one-pod distill only (unused here: TrainJob nodes get 8 per GPU).
        distill_memory: memory of the one-pod distill only (unused here: TrainJob nodes get 64G per GPU).
        teacher: teacher URI (a published diffusers SD1.5/SD2.1-base/SDXL directory, local or s3://).
        prompts: training prompts URI: .txt (one per line) or .parquet with a 'prompt' column.
        output: run URI: config.json, checkpoints/, logs/ and model/ are written under it; empty: derived from
            artifact_root, run_id and teacher (sidflow.kfp.paths.run_output), as the pipeline does.
        artifact_root: artifact root URI the pipeline's runs go under (used when output is empty).
        run_id: the pipeline run's id, passed as the whole value dsl.PIPELINE_JOB_ID_PLACEHOLDER.
        teacher_fingerprint: the teacher's fingerprint: part of the task's cache key.
        retries: times a Failed TrainJob is deleted and created again by this task (it resumes from its newest
            checkpoint); KFP backends up to 2.17 drop set_retry inside a ParallelFor (kubeflow/pipelines #12389).
    """
    placement = {"distill_nodes": distill_nodes, "gpu_node_selector": gpu_node_selector,
                 "gpu_tolerations": gpu_tolerations, "distill_cpu": distill_cpu, "distill_memory": distill_memory}
    fields = {k: v for k, v in locals().items()
              if k not in ("metrics", "model", "trainer_image", "placement", *placement, "artifact_root", "run_id",
                           "teacher_fingerprint", "retries")}
    from sidflow import trainjob
    from sidflow.kfp.paths import run_output
    from sidflow.stages import distill as stage

    fields["output"] = output or run_output(artifact_root, run_id, teacher)

    cfg = stage.from_pipeline(fields)
    job = trainjob.manifest(cfg, trainjob.PlacementConfig(**placement), trainer_image)  # checks before any pod starts
    for attempt in range(retries + 1):
        try:
            trainjob.run(job)  # adopts a running job; deletes and re-creates a Failed one
            break
        except RuntimeError as e:
            if "failed:" not in str(e) or attempt == retries:
                raise
            print(f"{e}; attempt {attempt + 2} of {retries + 1} resumes from the newest checkpoint")
    model_uri, info = trainjob.result(cfg.output)
    for name, value in {"kimg": info["nimg"] / 1000, **info.get("metrics", {})}.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))
    from sidflow.generator import describe

    model.metadata.update(describe(model_uri, model.path))
    print(f"TrainJob {job['metadata']['name']} exported {model_uri}")
    return model_uri


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(distill_trainjob, "distill_trainjob.yaml")
