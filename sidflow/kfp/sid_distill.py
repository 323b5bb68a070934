"""The `sid-distill` pipeline: watch teachers -> for each new one: download_teacher -> distill -> evaluate -> register.

Distill runs in one pod (`distill_nodes` = 1, the default) or, for more nodes, as a Kubeflow Trainer v2 TrainJob
that a CPU task creates and waits for (`dsl.If`/`dsl.Else` inside the loop); either branch returns the model URI,
so evaluate takes `dsl.OneOf(train.output, job.output)`; a small gate task reads its metrics, and register runs under
`dsl.If` on the gate. Both GPU tasks request their GPU count at run time (`gpus`, `eval_gpus`) and run one process
per GPU. Each run writes under <artifact_root>/runs/<run id>/<teacher>-<hash>/, joined inside the components
(sidflow/kfp/paths.py). Finetune is not in the DAG: that stage has not landed. Defaults are literals copied from
the config dataclasses (DistillConfig, WatchTeachersConfig, sidflow.trainjob.PlacementConfig) and, for the
None-default DistillConfig fields, from distill.PIPELINE_UNSET; tests/test_pipeline.py checks them and the
descriptions against the dataclasses.
"""

from kfp import dsl, kubernetes

from sidflow.kfp.components.distill import BASE_IMAGE as TRAINER_IMAGE
from sidflow.kfp.components.distill import distill
from sidflow.kfp.components.distill_trainjob import distill_trainjob
from sidflow.kfp.components.download_teacher import download_teacher
from sidflow.kfp.components.evaluate import evaluate, passes_gate
from sidflow.kfp.components.register import register
from sidflow.kfp.components.report import report
from sidflow.kfp.components.watch_teachers import watch_teachers
from sidflow.trainjob import S3_KEYS, S3_SECRET  # the Kubernetes secret every stage reads its S3 settings from

# The one-pod distill requests `gpus` GPUs (a count in the pipeline) and runs one process per GPU; its CPU and memory
# are the run-time parameters distill_cpu and distill_memory; these are their per-GPU defaults.
DISTILL_CPU, DISTILL_MEMORY, DISTILL_SHM = "8", "64G", "16Gi"
DISTILL_RETRIES = 3  # a retried distill resumes from its newest complete checkpoint (same output URI)
# Run URI: <artifact_root>/runs/<run id>/<teacher name>-<hash>, joined inside each component (sidflow.kfp.paths): the
# backend substitutes the run id only as a whole input value, never inside an f-string.
MAX_PARALLEL = 1  # teachers distilled at once; `sidflow pipeline compile --max-parallel N` (KFP takes no run parameter)
# Pod deadlines (activeDeadlineSeconds): a distill pod is retried (and resumes) when it runs past its deadline, so this
# bounds one attempt, not the run. The multi-node task waits for its TrainJob as long (sidflow.trainjob.TIMEOUT_S).
DISTILL_TIMEOUT_S, EVAL_TIMEOUT_S, CPU_TIMEOUT_S = 7 * 24 * 3600, 24 * 3600, 6 * 3600
# DistillConfig fields the pipeline does not expose: per-task values come from the loop (teacher) and the run (output).
# The None-default fields (κ1..κ4, clip_grad_value) are exposed with the "unset" values of distill.PIPELINE_UNSET,
# because kfp.local cannot run a pipeline parameter whose default is None.
NOT_EXPOSED = ("teacher", "output")
PLACEMENT = ("distill_nodes", "gpu_node_selector", "gpu_tolerations", "distill_cpu",  # trainjob.PlacementConfig
             "distill_memory")
# Pipeline parameter -> EvaluateConfig field. `eval_` where the bare name is a distill parameter or would be unclear;
# limit and workers take 0 for None (all prompts; min(4, cores) threads).
EVALUATE = {"eval_prompts": "prompts", "eval_reference": "reference", "eval_protocol": "protocol",
            "eval_features": "features", "inception_weights": "inception_weights", "eval_scorer": "scorer",
            "clip_model": "clip_model", "clip_weights": "clip_weights", "clip_precision": "clip_precision",
            "unet_dtype": "unet_dtype", "vae_dtype": "vae_dtype", "compile_vae": "compile_vae", "eval_batch": "batch",
            "eval_shard_size": "shard_size", "eval_limit": "limit", "eval_grid": "grid", "eval_workers": "workers",
            "eval_gpus": "gpus"}
GATE = ("max_fid", "promote", "clip_floor")  # the evaluate gate and RegisterConfig's promotion fields
EVAL_RETRIES = 2  # a retried evaluation keeps the shards already written; its pod requests eval_gpus GPUs


def _s3_env(task: dsl.PipelineTask, timeout_s: int = CPU_TIMEOUT_S) -> dsl.PipelineTask:
    # Caching is off on every task: each one reads or writes state that changes outside its inputs (the hub, the
    # registry, checkpoints under the run's prefix), and a re-run must redo its work, never return an old run's output.
    task.set_caching_options(False)
    kubernetes.set_timeout(task, timeout_s)
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in S3_KEYS})


def _gpu_pod(task: dsl.PipelineTask, gpus, retries: int, node_selector, tolerations, timeout_s: int, cpu=DISTILL_CPU,
             memory=DISTILL_MEMORY) -> dsl.PipelineTask:
    """GPU, CPU and memory (constants or run-time parameters), retries (the GPU stages resume), the S3 secret, and
    run-time node placement."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.add_node_selector_json(task, node_selector)  # resolved at run time by the KFP driver
    kubernetes.add_toleration_json(task, tolerations)
    return _s3_env(task, timeout_s)


_BUILD = {"max_parallel": MAX_PARALLEL}  # compile-time settings of build()


def _sid_distill(teachers: str = "", registry: str = "", model_name: str = "sid-generator", artifact_root: str = "",
                prompts: str = "", guidance: str = "lsg", kappa: float = 1.5, null_prompt: str = "auto",
                kappa_1: float = -99.0, kappa_2: float = -99.0, kappa_3: float = -99.0, kappa_4: float = -99.0,
                alpha: float = 1.0, t_min: int = 20, t_max: int = 980, t_init: int = 625, steps: int = 1,
                fake_dropout: float = 0.1, lr_fake: float = 1e-06, lr_g: float = 1e-06, adam_beta1: float = 0.0,
                adam_beta2: float = 0.999, adam_eps: float = 1e-08, batch: int = 512, micro_batch: int = 1,
                kimg: float = 10000.0, precision: str = "bf16", tf32: bool = False, grad_checkpointing: bool = False,
                clip_grad_value: float = 0.0, ema_halflife_kimg: float = 50.0, ema_rampup: float = 0.05,
                checkpoint_kimg: float = 100.0,
                keep_checkpoints: int = 3, log_every: int = 1, checkpoints: bool = True, profile: bool = False,
                seed: int = 0, sharding: str = "ddp", gpus: str = "1", resume: bool = True, distill_nodes: int = 1,
                gpu_node_selector: dict = {}, gpu_tolerations: list = [], distill_cpu: str = "8",
                distill_memory: str = "64G", eval_prompts: str = "", eval_reference: str = "",
                eval_protocol: str = "coco30k", eval_features: str = "inception", inception_weights: str = "",
                eval_scorer: str = "openclip", clip_model: str = "ViT-g-14", clip_weights: str = "laion2b_s12b_b42k",
                clip_precision: str = "fp16", unet_dtype: str = "fp16", vae_dtype: str = "auto",
                compile_vae: bool = True, eval_batch: int = 32, eval_shard_size: int = 1024, eval_limit: int = 0,
                eval_grid: int = 16, eval_workers: int = 0,
                eval_gpus: str = "1", max_fid: float = 0.0, promote: str = "auto", clip_floor: float = -1.0):
    """Distill every teacher whose current version has no registered generator yet.

    Args:
        teachers: comma-separated teacher sources: hf://org/name@rev, s3://..., or local paths.
        registry: registry root URI (s3://bucket/prefix or a local path) holding <model_name>/.
        model_name: registered model name whose teacher fingerprints are skipped.
        artifact_root: artifact root URI; a new teacher is published to <artifact_root>/teachers/<slug>.
        prompts: training prompts URI: .txt (one per line) or .parquet with a 'prompt' column.
        guidance: κ preset: lsg = κ everywhere, long = teacher only, short = fake training only (method.md §3).
        kappa: guidance scale κ of the preset; released SD1.5 models use 1.5, 2, 3, 4.5 (§3, §7.2).
        kappa_1: override κ1: CFG on the fake network while it is trained (§3); -99 = from the guidance preset.
        kappa_2: override κ2 (= κ3): CFG on the fake network inside the generator loss (§3); -99 = from the guidance
            preset.
        kappa_3: override κ3; tied to κ2 in the reference code, so it must equal κ2 (§3); -99 = from the guidance
            preset.
        kappa_4: override κ4: CFG on the teacher inside the generator loss (§3); -99 = from the guidance preset.
        null_prompt: ∅ for CFG and dropout: encoding of '' or zeros; auto = the teacher's
            force_zeros_for_empty_prompt (zeros for SDXL, '' for SD1.5/2.1) (§3, §6.4).
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
        clip_grad_value: clip each gradient value to ±this after nan_to_num (off for SD); 0 = no clipping.
        ema_halflife_kimg: EMA half-life in kimg; 0 turns EMA off (--ema 0.05 = 50 kimg, §5).
        ema_rampup: EMA ramp-up: half-life = min(half-life, rampup · images seen) (§5).
        checkpoint_kimg: publish a checkpoint every this many kimg (and on SIGTERM or Ctrl-C).
        keep_checkpoints: keep the newest N complete checkpoints; older ones are deleted once a new one is published
            (an SD1.5 checkpoint is ~24 GB).
        log_every: write a metrics line every this many iterations.
        checkpoints: publish checkpoints; off only for benchmarks and smoke runs (no resume).
        profile: time each phase of an iteration (synchronizes the GPU: slower).
        seed: random seed; every draw of iteration i derives from (seed, i, rank).
        sharding: ddp = a full replica per GPU; fsdp = parameters, grads and Adam state sharded (FSDP2), needed for
            SDXL.
        gpus: GPUs to use: a count or 'all' (one process per GPU); in the pipeline a count: the GPUs each distill pod
            requests.
        resume: resume from the newest complete checkpoint under output, if any.
        distill_nodes: distill nodes: 1 = one pod (the KFP task itself); more = a Kubeflow Trainer TrainJob of that
            many nodes with `gpus` GPUs each.
        gpu_node_selector: node labels the GPU pods must carry, e.g. {"nvidia.com/gpu.product":
            "NVIDIA-H100-80GB-HBM3"}; {} = any.
        gpu_tolerations: tolerations of the GPU pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists",
            "effect": "NoSchedule"}].
        distill_cpu: CPUs of the one-pod distill (distill_nodes = 1); give about 8 per GPU of `gpus` (TrainJob nodes
            get 8 per GPU themselves).
        distill_memory: memory of the one-pod distill; about 64G per GPU of `gpus`, more for SDXL (every process loads
            the teacher); TrainJob nodes get 64G per GPU.
        eval_prompts: prompt set URI: .parquet with caption, seed (default: row index), optional image_id
            (`sidflow data coco-prompts`).
        eval_reference: reference statistics URI (.npz from `sidflow data ref-stats`, same protocol and
            features).
        eval_protocol: coco30k: crop + Lanczos 256 (GigaGAN/DMD2/SiD-LSG); sdxl10k: FID at 512, CLIP at 256
            (DMD2 SDXL); native: images as generated (toy).
        eval_features: FID features: 'inception' (clean-fid's TF-Inception from inception_weights) or
            'toy:<evaluator URI>' (shapes-FID).
        inception_weights: URI (s3:// or local) of inception-2015-12-05.pt, clean-fid's TF-Inception
            TorchScript.
        eval_scorer: 'openclip' (clip_model + clip_weights, GigaGAN's CLIP score) or 'toy:<evaluator URI>'
            (prompt accuracy).
        clip_model: OpenCLIP architecture, or URI of an open_clip directory (open_clip_config.json + weights).
        clip_weights: OpenCLIP pretrained tag (Hugging Face cache) or URI of the checkpoint file; unused when
            clip_model is a directory.
        clip_precision: CLIP precision: fp16 weights (8x faster than fp32; moves the score < 1e-4,
            benchmarks/eval_throughput.py); fp32 = GigaGAN's exact .float(); tf32 = fp32 weights, TF32 matmuls.
        unet_dtype: UNet autocast precision on GPU (SiD-LSG generates in fp16); CPU runs use fp32.
        vae_dtype: VAE decode precision on GPU; auto: fp16 (as SiD-LSG generates) except fp32 for an SDXL VAE with
            force_upcast (it overflows in fp16); fp32 is safe for every VAE.
        compile_vae: torch.compile the VAE decode on GPU: 1.7-2x faster at the same precision (one pixel level on 3.7%
            of the pixels in fp32, fewer than eager fp16 moves); compiles once per process (~20-30 s).
        eval_batch: images generated per process per batch.
        eval_shard_size: prompts per shard: the unit of work handed to a process and of resume.
        eval_limit: evaluate only the first N prompts (smoke runs); None: all; 0 = all.
        eval_grid: images in grid.png: those of the first N prompts.
        eval_workers: CPU threads per process for crop, resize and CLIP preprocessing; None: min(4, cores): more contend
            with generation for Python's GIL; 0 = the default.
        eval_gpus: GPUs to use: a count or 'all' (one process per GPU); in the pipeline (eval_gpus) a count: the GPUs
            the evaluate pod requests.
        max_fid: registration gate: a model is registered only if its FID is finite and at most this; 0 = any
            finite FID.
        promote: auto: promote only if FID beats the champion's (and CLIP meets clip_floor); always; never.
        clip_floor: minimum CLIP score a model needs to be promoted; None: no floor; negative = no floor.
    """
    args = dict(locals())
    placement = {name: args[name] for name in PLACEMENT}
    hyper = {k: v for k, v in args.items()
             if k not in ("teachers", "registry", "model_name", "artifact_root", *PLACEMENT, *EVALUATE, *GATE)}
    scoring = {field: args[name] for name, field in EVALUATE.items()}
    watch = watch_teachers(teachers=teachers, registry=registry, model_name=model_name, artifact_root=artifact_root)
    watch.set_display_name("Find new teachers")
    _s3_env(watch)
    with dsl.ParallelFor(watch.output, name="new-teachers", parallelism=_BUILD["max_parallel"]) as teacher:
        fetch = download_teacher(source=teacher.source, dest=teacher.dest)
        fetch.set_display_name("Download teacher")
        _s3_env(fetch)
        # The run's prefix is built inside each component from these whole values (sidflow.kfp.paths).
        where = dict(artifact_root=artifact_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        ident = dict(teacher=fetch.outputs["uri"], teacher_fingerprint=fetch.outputs["fingerprint"], **where)
        with dsl.If(distill_nodes == 1, name="one-pod"):
            train = distill(**ident, **hyper)
            train.set_display_name("Distill one-step generator")
            _gpu_pod(train, gpus, DISTILL_RETRIES, gpu_node_selector, gpu_tolerations, DISTILL_TIMEOUT_S, distill_cpu,
                     distill_memory)
            kubernetes.empty_dir_mount(train, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=DISTILL_SHM)
        with dsl.Else(name="multi-node"):  # this CPU task creates the TrainJob and waits for it
            job = distill_trainjob(**ident, trainer_image=TRAINER_IMAGE, **placement, **hyper)
            job.set_display_name("Distill on several nodes (TrainJob)")
            job.set_retry(num_retries=DISTILL_RETRIES, backoff_duration="60s", backoff_factor=2.0)
            _s3_env(job, DISTILL_TIMEOUT_S)  # reads the exported model's sidflow.json
        model = dsl.OneOf(train.outputs["Output"], job.outputs["Output"])
        score = evaluate(model=model, teacher=fetch.outputs["uri"], **where, **scoring)  # writes <run>/eval
        score.set_display_name("Evaluate (FID, CLIP score)")
        _gpu_pod(score, eval_gpus, EVAL_RETRIES, gpu_node_selector, gpu_tolerations, EVAL_TIMEOUT_S)
        gate = passes_gate(metrics=score.outputs["Output"], max_fid=max_fid)
        gate.set_display_name("Check the registration gate")
        _s3_env(gate)
        with dsl.If(gate.output == True, name="passed-gate"):  # noqa: E712 (a KFP condition, not a bool)
            entry = register(registry=registry, model_name=model_name, model=model,
                             metrics=score.outputs["Output"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                             clip_floor=clip_floor, promote=promote)
            entry.set_display_name("Register (promote if better)")
            _s3_env(entry)
    # Runs after every teacher's tasks, failed ones included (a task outside the loop: ExitHandler around a
    # ParallelFor is broken upstream, kubeflow/pipelines #12390), and says which teacher ended where.
    done = report(teachers=watch.output, artifact_root=artifact_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                  registry=registry, model_name=model_name)
    done.set_display_name("Report per teacher").after(score).ignore_upstream_failure()
    _s3_env(done)


def build(max_parallel: int = MAX_PARALLEL):
    """Return the sid-distill pipeline with at most `max_parallel` teachers distilled at once (a compile-time value:
    KFP 2.17 takes only a literal for a ParallelFor's parallelism)."""
    if max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel} must be at least 1")
    _BUILD["max_parallel"] = max_parallel
    return dsl.pipeline(name="sid-distill")(_sid_distill)


sid_distill = build()
