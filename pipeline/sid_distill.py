"""The `sid-distill` pipeline: watch teachers -> for each new one: download_teacher -> distill.

Evaluate has not landed yet, and register needs its metrics, so register is not in the DAG: it is wired in when
evaluate lands (a stage that has not landed is never faked). Defaults are literals copied from the config
dataclasses; tests/test_pipeline.py checks them and the descriptions against the dataclasses.
"""

from kfp import dsl, kubernetes

from components.distill import distill
from components.download_teacher import download_teacher
from components.watch_teachers import watch_teachers

S3_SECRET = "sidflow-s3"  # Kubernetes secret holding the S3 settings every stage reads through boto3
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")
DISTILL_GPUS = 1  # the component runs one training process; multi-GPU pods go through `sidflow distill --gpus N`
DISTILL_CPU, DISTILL_MEMORY, DISTILL_SHM = "8", "64G", "16Gi"
DISTILL_RETRIES = 3  # a retried distill resumes from its newest complete checkpoint (same output URI)
# Run URI: <artifact_root>/runs/<run id>/<task id>. Not the teacher's slug: kfp.local (2.17) resolves a loop item's
# field inside an f-string to the whole item JSON. The task id is fixed by the driver, so retries reuse it.
# DistillConfig fields the pipeline does not expose (they stay at None): kfp.local cannot run a pipeline
# parameter whose default is None. Per-task values come from the loop (teacher) and the run (output).
NOT_EXPOSED = ("teacher", "output", "kappa_1", "kappa_2", "kappa_3", "kappa_4", "clip_grad_value")


def _s3_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in S3_KEYS})


@dsl.pipeline(name="sid-distill")
def sid_distill(teachers: str = "", registry: str = "", model_name: str = "sid-generator", artifact_root: str = "",
                prompts: str = "", guidance: str = "lsg", kappa: float = 1.5, alpha: float = 1.0, t_min: int = 20,
                t_max: int = 980, t_init: int = 625, steps: int = 1, fake_dropout: float = 0.1, lr_fake: float = 1e-06,
                lr_g: float = 1e-06, adam_beta1: float = 0.0, adam_beta2: float = 0.999, adam_eps: float = 1e-08,
                batch: int = 512, micro_batch: int = 1, kimg: float = 10000.0, precision: str = "bf16",
                tf32: bool = False, grad_checkpointing: bool = False, ema_halflife_kimg: float = 50.0,
                ema_rampup: float = 0.05, checkpoint_kimg: float = 100.0, log_every: int = 1, checkpoints: bool = True,
                profile: bool = False, seed: int = 0, gpus: str = "1", resume: bool = True):
    """Distill every teacher whose current version has no registered generator yet.

    Args:
        teachers: comma-separated teacher sources: hf://org/name@rev, s3://..., or local paths.
        registry: registry root URI (s3://bucket/prefix or a local path) holding <model_name>/.
        model_name: registered model name whose teacher fingerprints are skipped.
        artifact_root: artifact root URI; a new teacher is published to <artifact_root>/teachers/<slug>.
        prompts: training prompts URI: .txt (one per line) or .parquet with a 'prompt' column.
        guidance: κ preset: lsg = κ everywhere, long = teacher only, short = fake training only (method.md §3).
        kappa: guidance scale κ of the preset; released SD1.5 models use 1.5, 2, 3, 4.5 (§3, §7.2).
        alpha: α of the SiD generator loss; 1.0 for SD (method.md §4).
        t_min: smallest diffusion time t drawn for both losses (§1).
        t_max: t is drawn from {t_min..t_max-1} (§1).
        t_init: generator start time; 0.9286·z is fed at t=625 (§1, §2).
        steps: generator steps K; 1 is one-step SiD-LSG (§6.1).
        fake_dropout: prompt dropout to '' in the fake step when κ1 or κ2 is not 1 (§3).
        lr_fake: Adam learning rate of the fake score network (§5).
        lr_g: Adam learning rate of the generator (§5).
        adam_beta1: Adam β1 (§5).
        adam_beta2: Adam β2 (§5).
        adam_eps: Adam ε (§5).
        batch: global batch per phase (prompts per fake step and per generator step) (§5).
        micro_batch: samples per GPU per accumulation round (--batch-gpu in the reference code).
        kimg: training length in thousands of generator images (10 Mimg in run_sid.sh).
        precision: bf16 = autocast over fp32 master weights; fp32 = paper-faithful (TF32 off unless tf32) (§5,
            §8).
        tf32: allow TF32 matmuls in fp32 mode (off in the reference code).
        grad_checkpointing: gradient checkpointing in the generator, fake and teacher UNets.
        ema_halflife_kimg: EMA half-life in kimg; 0 turns EMA off (--ema 0.05 = 50 kimg, §5).
        ema_rampup: EMA ramp-up: half-life = min(half-life, rampup · images seen) (§5).
        checkpoint_kimg: publish a checkpoint every this many kimg (and on SIGTERM).
        log_every: write a metrics line every this many iterations.
        checkpoints: publish checkpoints; off only for benchmarks and smoke runs (no resume).
        profile: time each phase of an iteration (synchronizes the GPU: slower).
        seed: random seed; every draw of iteration i derives from (seed, i, rank).
        gpus: GPUs to use: a count or 'all' (sidflow distill launches one process per GPU).
        resume: resume from the newest complete checkpoint under output, if any.
    """
    hyper = {k: v for k, v in locals().items() if k not in ("teachers", "registry", "model_name", "artifact_root")}
    watch = watch_teachers(teachers=teachers, registry=registry, model_name=model_name, artifact_root=artifact_root)
    watch.set_display_name("Find new teachers").set_caching_options(False)  # the registry and the hub change
    _s3_env(watch)
    with dsl.ParallelFor(watch.output, name="new-teachers") as teacher:
        fetch = download_teacher(source=teacher.source, dest=teacher.dest)
        fetch.set_display_name("Download teacher").set_caching_options(False)  # the source may have moved on
        _s3_env(fetch)
        run_uri = f"{artifact_root}/runs/{dsl.PIPELINE_JOB_ID_PLACEHOLDER}/{dsl.PIPELINE_TASK_ID_PLACEHOLDER}"
        train = distill(teacher=fetch.outputs["uri"], output=run_uri, **hyper)
        train.set_display_name("Distill one-step generator")
        train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(DISTILL_GPUS)
        train.set_cpu_request(DISTILL_CPU).set_cpu_limit(DISTILL_CPU)
        train.set_memory_request(DISTILL_MEMORY).set_memory_limit(DISTILL_MEMORY)
        train.set_retry(num_retries=DISTILL_RETRIES, backoff_duration="60s", backoff_factor=2.0)
        _s3_env(train)
        kubernetes.empty_dir_mount(train, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=DISTILL_SHM)
