"""The `sid-distill` pipeline: watch teachers -> for each new one: download_teacher -> distill [-> finetune] -> evaluate
-> register.

Distill runs in one pod (`distill_nodes` = 1, the default) or, for more nodes, as a Kubeflow Trainer v2 TrainJob
that a CPU task creates and waits for (`dsl.If`/`dsl.Else` inside the loop); either branch returns the model URI,
so evaluate takes `dsl.OneOf(train.output, job.output)`; a small gate task reads its metrics, and register runs under
`dsl.If` on the gate. The GPU tasks request their GPU count, CPU and memory at run time, as a small task per teacher
(size_teacher) resolved them from `gpus`, `distill_cpu`, `distill_memory` and `eval_gpus` ("auto": the teacher type's
preset, sidflow.sizing), and run one process per GPU. Each run writes under
<artifact_root>/runs/<run id>/<teacher>-<hash>/, joined inside the components (sidflow/kfp/paths.py).
With `finetune` on, a finetune task (one pod) trains the distilled generator further on real
pairs under `dsl.If`, and evaluate and register take its model (`dsl.OneOf` with a CPU no-op on the other branch).
The pipeline function is generated from the stage dataclasses (PARAMS): every run parameter is a field declared
once, with its type, default and help.
"""

import dataclasses

from kfp import dsl, kubernetes
from kfp.dsl import pipeline_channel

from sidflow import registry as registries
from sidflow.kfp import declare
from sidflow.kfp.components.distill import BASE_IMAGE as TRAINER_IMAGE
from sidflow.kfp.components.distill import distill
from sidflow.kfp.components.distill_trainjob import distill_trainjob
from sidflow.kfp.components.download_teacher import download_teacher
from sidflow.kfp.components.evaluate import evaluate, passes_gate
from sidflow.kfp.components.finetune import fine_tuned, finetune, keep_model
from sidflow.kfp.components.finetune_trainjob import finetune_trainjob
from sidflow.kfp.components.register import register
from sidflow.kfp.components.report import report
from sidflow.kfp.components.size_teacher import SIZED, size_teacher
from sidflow.kfp.components.watch_teachers import watch_teachers
from sidflow.kfp.tasks import EVAL_NAMES, FINETUNE_NAMES, Finetune, overridable, override_keys
from sidflow.stages.distill import DistillConfig
from sidflow.stages.evaluate import EvaluateConfig
from sidflow.stages.finetune import FinetuneConfig
from sidflow.stages.register import RegisterConfig
from sidflow.stages.watch_teachers import WatchTeachersConfig
from sidflow.trainjob import S3_KEYS, S3_SECRET, PlacementConfig  # S3: the secret every stage reads its settings from

# The hub: a token for gated or private teachers, an endpoint for a mirror. The secret is optional (a cluster without
# it runs, reaching the public hub anonymously): the KFP driver sets `optional` on each secretKeyRef (backend >= 2.15,
# driver/k8s.go, kubeflow/pipelines #12216), so a missing secret or key leaves the variable unset.
HF_SECRET, HF_KEYS = "sidflow-hf", ("HF_TOKEN", "HF_ENDPOINT")

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
EVAL_RETRIES = 2  # a retried evaluation keeps the shards already written; its pod requests eval_gpus GPUs
# The run parameters: each is a field of a stage dataclass, declared there once (sidflow.kfp.declare).
# Fields that default to None, and the ADVANCED settings, travel in `overrides` (sidflow.kfp.tasks says why).
EVAL_SKIP = ("model", "output", "sampler", "teacher_steps", "kappa", "save_images")  # teacher comparison rows only
# Each stage's run parameters by field name; the pipeline's names (EVAL_NAMES) differ only for evaluate.
WATCH, PLACEMENT = declare.params(WatchTeachersConfig), declare.params(PlacementConfig)
DISTILL = declare.params(DistillConfig, skip=("teacher", "output", *overridable(DistillConfig).values()))
EVALUATE = declare.params(EvaluateConfig, skip=(*EVAL_SKIP, *overridable(EvaluateConfig, EVAL_NAMES).values()))
# Finetune's own fields, and the distill fields it sets apart from distill (its K, length and guidance); the rest of
# its hyperparameters (batch, learning rates, precision...) are distill's. Its advanced ones go in overrides.
TUNED = (*FINETUNE_NAMES, "adv_weight", "disc_weight")
FINETUNE = declare.params(Finetune) + declare.params(
    FinetuneConfig, skip=tuple(f.name for f in dataclasses.fields(FinetuneConfig) if f.name not in TUNED),
    rename=FINETUNE_NAMES)
PARAMS = (WATCH + DISTILL + PLACEMENT + FINETUNE
          + [dataclasses.replace(p, name=EVAL_NAMES.get(p.name, p.name)) for p in EVALUATE]
          + declare.params(RegisterConfig, skip=("registry", "model_name", "model", "metrics", "teacher_fingerprint",
                                                 "run_id", *declare.none_fields(RegisterConfig))))
# The sizing parameters (gpus, sharding, distill_cpu, distill_memory, eval_gpus) default to "auto": the teacher type's
# preset, resolved per teacher by the size_teacher task (sidflow.sizing); an explicit value wins for every teacher.
PARAMS = [{p.name: p for p in SIZED}.get(p.name, p) for p in PARAMS]
# The run form (KFP UI 2.17, NewRunParametersV2.tsx) lists the parameters by name (the IR's keys are sorted) and shows
# only name and type; it marks one without a default "Missing parameter." and keeps Start off until it is filled. So
# the URIs a run cannot do without (config.param required=True) have no default here: those are what a user sees
# first, and the API server refuses a run without them (apiserver/template/v2_template.go). Python puts them first.
# finetune_data stays optional: it is needed only with finetune on (submit.check_required).
NEEDED = [dataclasses.replace(p, default=declare.REQUIRED) for p in PARAMS if p.required and p not in FINETUNE]
PARAMS = NEEDED + [p for p in PARAMS if not (p.required and p not in FINETUNE)]
# overrides key -> (dataclass, field): every None-default field of the stages in the DAG, and the ADVANCED ones
OVERRIDABLE = override_keys()
PARAMS.append(declare.Param("overrides", dict, {}, "settings without a run parameter of their own, by name: the "
                            f"fields that default to None and the advanced ones: {', '.join(OVERRIDABLE)}; e.g. "
                            "{\"kappa_4\": 3.0, \"norms\": \"autocast\"} (docs/parameters.md)"))


def stage_fields(a: dict) -> tuple[dict, dict, dict]:
    """Return (distill, evaluate, finetune-own) fields from the run's values by parameter name `a` (the DAG's channels,
    or the values submit checks): evaluate's by its field names; finetune takes distill's and its own on top."""
    hyper = {p.name: a[p.name] for p in DISTILL}
    scoring = {p.name: a[EVAL_NAMES.get(p.name, p.name)] for p in EVALUATE}
    tuned = {name: a[FINETUNE_NAMES.get(name, name)] for name in TUNED}
    return hyper, scoring, tuned


def check_run(arguments: dict) -> None:
    """Raise a one-line ValueError for a run parameter out of range, before the run starts: each stage's value checks
    (its check_values, which read nothing) on the configs its tasks would build from `arguments` and the defaults.
    Without it a bad value (batch=0, kimg=-1) is found in the distill pod, after the watch and the download."""
    from sidflow.config import override
    from sidflow.kfp.tasks import named_as_run_parameters, overridden
    from sidflow.sizing import AUTO
    from sidflow.stages import distill as distill_stage
    from sidflow.stages import evaluate as evaluate_stage
    from sidflow.stages import finetune as finetune_stage

    a = {p.name: p.default for p in PARAMS} | arguments
    given = a["overrides"]
    # GPUs per run where they are given (else the teacher's preset decides, and its task checks the split)
    world = int(a["gpus"]) * a["distill_nodes"] if str(a["gpus"]).isdigit() else 1
    hyper, scoring, own = stage_fields(a)
    checks = [(distill_stage.check_values, DistillConfig, hyper, {}, (world,)),
              (evaluate_stage.check_values, EvaluateConfig, scoring, EVAL_NAMES, ())]
    if a["finetune"]:
        checks.append((finetune_stage.check_values, FinetuneConfig, {**hyper, **own}, FINETUNE_NAMES, (world,)))
    for check, cls, fields, names, extra in checks:
        known = {k: v for k, v in fields.items() if v is not declare.REQUIRED and v != AUTO}  # URIs, sizing: later
        try:
            check(override(cls(), known | overridden(cls, given, names if cls is EvaluateConfig else None)),
                  *extra)
        except ValueError as e:  # the message names the stage's field: name the run parameter instead
            raise ValueError(named_as_run_parameters(str(e), names)) from None


SUMMARY = "Distill every teacher whose current version has no registered generator yet."


def _s3_env(task: dsl.PipelineTask, timeout_s: int = CPU_TIMEOUT_S) -> dsl.PipelineTask:
    # Caching is off on every task: each one reads or writes state that changes outside its inputs (the hub, the
    # registry, checkpoints under the run's prefix), and a re-run must redo its work, never return an old run's output.
    task.set_caching_options(False)
    kubernetes.set_timeout(task, timeout_s)
    # Optional, as the hub's: with workload identity (IRSA, GKE/Azure workload identity) there are no static keys, and
    # a cluster may keep the endpoint and region in the pod's environment instead.
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in S3_KEYS},
                                        optional=True)


def _hub_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    # The tasks that read the hub: the watch and the download (hf:// teachers), evaluate (CLIP weights by tag).
    return kubernetes.use_secret_as_env(task, secret_name=HF_SECRET, secret_key_to_env={k: k for k in HF_KEYS},
                                        optional=True)


def _registry_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    # The tasks that talk to the registry: its credentials as optional env (backend 2.17 sets `optional` on each
    # secretKeyRef, backend/src/v2/driver/k8s.go), so an S3 or path registry needs no such secret at all.
    return kubernetes.use_secret_as_env(task, secret_name=registries.SECRET,
                                        secret_key_to_env={k: k for k in registries.SECRET_KEYS}, optional=True)


def _gpu_pod(task: dsl.PipelineTask, resource, gpus, retries: int, node_selector, tolerations, timeout_s: int,
             cpu=DISTILL_CPU, memory=DISTILL_MEMORY) -> dsl.PipelineTask:
    """GPU resource and count, CPU and memory (constants, run-time parameters or another task's outputs: the driver
    resolves each from the task's inputs, backend 2.5+ driver.go), retries (the GPU stages resume), the S3 secret, and
    run-time node placement."""
    # The SDK adds a resource's channel to the task's inputs but not to those of the dsl.If around it, which a task
    # output must pass through (kfp 2.17 compiles "pipelinechannel--size-teacher-gpus not found" without this).
    task.register_pipeline_channels([v for v in (gpus, cpu, memory) if isinstance(v, pipeline_channel.PipelineChannel)])
    task.set_accelerator_type(resource).set_accelerator_limit(gpus)
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.add_node_selector_json(task, node_selector)  # resolved at run time by the KFP driver
    kubernetes.add_toleration_json(task, tolerations)
    return _s3_env(task, timeout_s)


_BUILD = {"max_parallel": MAX_PARALLEL}  # compile-time settings of build()


def _dag(args: dict) -> None:
    """Build the DAG from the pipeline's arguments (channels), by parameter name."""
    a = args
    watched, placement = ({p.name: a[p.name] for p in ps} for ps in (WATCH, PLACEMENT))
    hyper, scoring, own = stage_fields(a)
    overrides, artifact_root, registry, model_name = a["overrides"], a["artifact_root"], a["registry"], a["model_name"]
    watch = watch_teachers(**watched)
    watch.set_display_name("Find new teachers")
    _hub_env(_registry_env(_s3_env(watch)))
    with dsl.ParallelFor(watch.output, name="new-teachers", parallelism=_BUILD["max_parallel"]) as teacher:
        fetch = download_teacher(source=teacher.source, dest=teacher.dest)
        fetch.set_display_name("Download teacher")
        _hub_env(_s3_env(fetch))
        # The teacher's preset where a sizing parameter is "auto": these outputs set the GPU tasks' GPU count, CPU and
        # memory (the driver resolves a task output there as it does a run parameter, driver/resolve.go).
        size = size_teacher(teacher=fetch.outputs["uri"], **{p.name: a[p.name] for p in SIZED})
        size.set_display_name("Size the GPU tasks for this teacher")
        _s3_env(size)
        sized = {p.name: size.outputs[p.name] for p in SIZED}
        hyper = {**hyper, "gpus": sized["gpus"], "sharding": sized["sharding"]}
        placement = {**placement, "distill_cpu": sized["distill_cpu"], "distill_memory": sized["distill_memory"]}
        # The run's prefix is built inside each component from these whole values (sidflow.kfp.paths).
        where = dict(artifact_root=artifact_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        ident = dict(teacher=fetch.outputs["uri"], teacher_fingerprint=fetch.outputs["fingerprint"], **where)
        with dsl.If(a["distill_nodes"] == 1, name="one-pod"):
            train = distill(**ident, **hyper, overrides=overrides)
            train.set_display_name("Distill one-step generator")
            _gpu_pod(train, a["gpu_resource"], sized["gpus"], DISTILL_RETRIES, a["gpu_node_selector"],
                     a["gpu_tolerations"], DISTILL_TIMEOUT_S, sized["distill_cpu"], sized["distill_memory"])
            kubernetes.empty_dir_mount(train, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=DISTILL_SHM)
        with dsl.Else(name="multi-node"):  # this CPU task creates the TrainJob and waits for it
            job = distill_trainjob(**ident, trainer_image=TRAINER_IMAGE, **placement, **hyper, overrides=overrides)
            job.set_display_name("Distill on several nodes (TrainJob)")
            job.set_retry(num_retries=DISTILL_RETRIES, backoff_duration="60s", backoff_factor=2.0)
            _s3_env(job, DISTILL_TIMEOUT_S)  # reads the exported model's sidflow.json
        distilled = dsl.OneOf(train.outputs["Output"], job.outputs["Output"])
        with dsl.If(a["finetune"] == True, name="finetune"):  # noqa: E712 (a KFP condition, not a bool)
            tuned = {**hyper, **own}
            with dsl.If(a["distill_nodes"] == 1, name="finetune-one-pod"):
                tune_pod = finetune(init=distilled, **ident, **tuned, overrides=overrides)
                tune_pod.set_display_name("Fine-tune few-step generator (adversarial)")
                _gpu_pod(tune_pod, a["gpu_resource"], sized["gpus"], DISTILL_RETRIES, a["gpu_node_selector"],
                         a["gpu_tolerations"], DISTILL_TIMEOUT_S, sized["distill_cpu"], sized["distill_memory"])
                kubernetes.empty_dir_mount(tune_pod, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                           size_limit=DISTILL_SHM)
            with dsl.Else(name="finetune-multi-node"):  # as distill's: a CPU task creates the TrainJob, waits
                tune_job = finetune_trainjob(init=distilled, **ident, trainer_image=TRAINER_IMAGE, **placement,
                                             **tuned, overrides=overrides)
                tune_job.set_display_name("Fine-tune on several nodes (TrainJob)")
                tune_job.set_retry(num_retries=DISTILL_RETRIES, backoff_duration="60s", backoff_factor=2.0)
                _s3_env(tune_job, DISTILL_TIMEOUT_S)
            # One OneOf may not feed another (KFP): a CPU no-op turns this branch's into a plain output.
            tune = fine_tuned(model=dsl.OneOf(tune_pod.outputs["Output"], tune_job.outputs["Output"]))
            tune.set_display_name("The fine-tuned generator")
            _s3_env(tune)
        with dsl.Else(name="no-finetune"):  # a parameter OneOf needs a task on each branch: this one is a CPU no-op
            keep = keep_model(model=distilled)
            keep.set_display_name("Keep the distilled generator")
            _s3_env(keep)
        model = dsl.OneOf(tune.output, keep.output)
        score = evaluate(model=model, teacher=fetch.outputs["uri"], **where, **{**scoring, "gpus": sized["eval_gpus"]},
                         overrides=overrides, model_name=model_name)
        score.set_display_name("Evaluate (FID, CLIP score)")
        _gpu_pod(score, a["gpu_resource"], sized["eval_gpus"], EVAL_RETRIES, a["gpu_node_selector"],
                 a["gpu_tolerations"], EVAL_TIMEOUT_S)
        _hub_env(score)
        gate = passes_gate(metrics=score.outputs["Output"], overrides=overrides)
        gate.set_display_name("Check the registration gate")
        _s3_env(gate)
        with dsl.If(gate.output == True, name="passed-gate"):  # noqa: E712 (a KFP condition, not a bool)
            entry = register(registry=registry, model_name=model_name, model=model,
                             metrics=score.outputs["Output"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                             promote=a["promote"], overrides=overrides)
            entry.set_display_name("Register (promote if better)")
            _registry_env(_s3_env(entry))
    # Runs after every teacher's tasks, failed ones included (a task outside the loop: ExitHandler around a
    # ParallelFor is broken upstream, kubeflow/pipelines #12390), and says which teacher ended where.
    done = report(teachers=watch.output, artifact_root=artifact_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                  registry=registry, model_name=model_name)
    done.set_display_name("Report per teacher").after(score).ignore_upstream_failure()
    _registry_env(_s3_env(done))


def build(max_parallel: int = MAX_PARALLEL):
    """Return the sid-distill pipeline with at most `max_parallel` teachers distilled at once (a compile-time value:
    KFP 2.17 takes only a literal for a ParallelFor's parallelism)."""
    if max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel} must be at least 1")
    _BUILD["max_parallel"] = max_parallel
    text = declare.source("sid_distill", PARAMS, SUMMARY, "from sidflow.kfp.sid_distill import _dag\n_dag(arguments)")
    return dsl.pipeline(name="sid-distill")(declare.function("sid_distill", text, globals()))


sid_distill = build()
