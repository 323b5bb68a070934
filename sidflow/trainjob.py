"""Multi-node distill as a Kubeflow Trainer v2 TrainJob: the manifest (a pure function), then create it and wait.

The KFP task that calls `run` only orchestrates. The TrainJob's pods (ClusterTrainingRuntime `torch-distributed`:
one replicated job `node`, one container `node` per node) run `torchrun --module sidflow.cli distill ...`; torchrun
reads the rendezvous from the PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT
variables that Trainer's torch plugin injects, and sets WORLD_SIZE, so `sidflow distill` does not relaunch itself.
API: trainer.kubeflow.org/v1alpha1 of Kubeflow Trainer v2.2 and v2.3 (pod settings go in `runtimePatches`; v2.0
and v2.1 called it `podTemplateOverrides`). The kubernetes client comes with kfp; it is imported only by `run`.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from sidflow import __version__, sizing, storage
from sidflow.config import param, to_args
from sidflow.launch import CHECKED_ENV

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs
TRAINER_IMAGE = f"ghcr.io/example/sidflow-trainer:{__version__}"  # = sidflow.kfp.images.TRAINER (no kfp import here)
NODE = "node"  # the runtime's trainer replicated job, and its container
MANAGER = "sidflow.kubeflow.org/distill"  # key of sidflow's entry in spec.runtimePatches
RBAC_VERBS = ("create", "delete", "get")  # every call `run` makes; manifests/base/rbac-trainjobs.yaml grants these
S3_SECRET = "sidflow-s3"  # the Kubernetes secret every stage reads its S3 settings from (manifests/base)
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")
# /dev/shm per GPU, the single-pod distill's (sidflow/kfp/sid_distill.py: 16Gi for its one GPU). CPU and memory per
# GPU are the teacher type's preset (sidflow.sizing.PRESETS).
SHM_GI_PER_GPU = 16
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
TOLERATION_OPERATORS, TAINT_EFFECTS = ("Equal", "Exists"), ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class PlacementConfig:
    """Where the GPU work of a pipeline run goes; pipeline parameters beside DistillConfig's."""

    distill_nodes: int = param(1, "distill nodes: 1 = one pod (the KFP task itself); more = a Kubeflow Trainer "
                                  "TrainJob of that many nodes with `gpus` GPUs each")
    gpu_node_selector: dict = field(default_factory=dict, metadata={"help": (
        'node labels the GPU pods must carry, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}; {} = any')})
    gpu_tolerations: list = field(default_factory=list, metadata={"help": (
        'tolerations of the GPU pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]')})
    distill_cpu: str = param(sizing.AUTO, "CPUs of each distill pod: the one-pod distill, or each TrainJob "
                                          "node; auto = the teacher type's preset (docs/sizing.md)")
    gpu_resource: str = param("nvidia.com/gpu", "Kubernetes resource name the GPU pods request `gpus` of: "
                                                "nvidia.com/gpu, a MIG profile (nvidia.com/mig-3g.40gb) or another "
                                                "vendor's device (amd.com/gpu)")
    distill_memory: str = param(sizing.AUTO, "memory of each distill pod: the one-pod distill, or each TrainJob "
                                             "node (every process loads the teacher); auto = the teacher type's "
                                             "preset (docs/sizing.md)")


def job_name(output: str) -> str:
    """Return the TrainJob name for a run URI: stable, so a retried KFP task finds the job its last attempt made."""
    return "sid-distill-" + hashlib.sha256(output.encode()).hexdigest()[:12]


def command(cfg, stage: str = "distill") -> list[str]:
    """Return the trainer container's command: torchrun over the node's GPUs, `sidflow <stage>` (distill or finetune)
    with cfg's values."""
    return ["torchrun", "--module", "sidflow.cli", stage, *to_args(cfg)]


def check(cfg, placement: PlacementConfig) -> int:
    """Return the GPUs per node; raise a one-line ValueError for anything the cluster would refuse or fail on."""
    nodes = placement.distill_nodes
    if not cfg.output:
        raise ValueError("output is empty: it must be a URI")
    if nodes < 1:
        raise ValueError(f"distill_nodes={nodes} must be at least 1")
    if not cfg.gpus.isdigit() or int(cfg.gpus) < 1:
        raise ValueError(f"gpus={cfg.gpus!r} must be a GPU count per node (at least 1) when distill runs as a TrainJob")
    gpus = int(cfg.gpus)
    if cfg.micro_batch < 1 or cfg.batch % (nodes * gpus * cfg.micro_batch):
        raise ValueError(f"batch={cfg.batch} is not divisible by nodes × GPUs × micro_batch = "
                         f"{nodes} × {gpus} × {cfg.micro_batch}")
    selector = placement.gpu_node_selector
    if not isinstance(selector, dict) or not all(isinstance(v, str) for v in [*selector, *selector.values()]):
        raise ValueError(f"gpu_node_selector={selector!r} must map label names to label values (strings)")
    if not isinstance(placement.gpu_tolerations, list):
        raise ValueError(f"gpu_tolerations={placement.gpu_tolerations!r} must be a list of tolerations")
    for t in placement.gpu_tolerations:
        if not isinstance(t, dict) or set(t) - TOLERATION_KEYS or t.get("operator", "Equal") not in \
                TOLERATION_OPERATORS or t.get("effect", "NoSchedule") not in TAINT_EFFECTS:
            raise ValueError(f"gpu_tolerations item {t!r} is not a toleration: keys {sorted(TOLERATION_KEYS)}, "
                             f"operator in {list(TOLERATION_OPERATORS)}, effect in {list(TAINT_EFFECTS)}")
    return gpus


# The longest a TrainJob may run: its own activeDeadlineSeconds (honoured where the CRD has the field, as Trainer
# v2.3.0's does) and how long the orchestrating task waits for it; the same as the one-pod distill's pod deadline.
TIMEOUT_S = 7 * 24 * 3600


def manifest(cfg, placement: PlacementConfig, image: str, checked: bool = False, stage: str = "distill",
             kind: str = "sd15") -> dict:
    """Return the TrainJob that runs `sidflow <stage>` with `cfg` on distill_nodes nodes × cfg.gpus GPUs each.
    `checked`: the caller validated cfg for all of them (distill.check), so the ranks do not, each fetching the
    prompts and probing the output again; a manifest applied by hand (`sidflow distill-trainjob`) leaves it off.
    `kind`: the teacher type whose preset sizes a distill_cpu or distill_memory left "auto"."""
    gpus = check(cfg, placement)
    # Each node gets what the run sized for a distill pod. In the pipeline size_teacher has resolved "auto" per
    # teacher already, so an SDXL node gets SDXL's host memory, not SD1.5's; by hand the caller names the type.
    sized = sizing.resolve(kind, str(gpus), cfg.sharding, placement.distill_cpu, placement.distill_memory, "1")
    cpu, memory = sized["distill_cpu"], sized["distill_memory"]
    resources = {"cpu": cpu, "memory": memory, placement.gpu_resource: str(gpus)}
    # optional, as on the pipeline's tasks: with workload identity the secret holds no keys, or does not exist
    env = [{"name": k, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": k, "optional": True}}} for k in S3_KEYS]
    if checked:
        env.append({"name": CHECKED_ENV, "value": "1"})
    pod = {  # what the runtime's pod template does not have: /dev/shm for NCCL, and the GPU placement
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GI_PER_GPU * gpus}Gi"}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if placement.gpu_node_selector:
        pod["nodeSelector"] = dict(placement.gpu_node_selector)
    if placement.gpu_tolerations:
        pod["tolerations"] = [dict(t) for t in placement.gpu_tolerations]
    patch = {"replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": job_name(cfg.output),
                     "labels": {"app.kubernetes.io/part-of": "sidflow", "app.kubernetes.io/component": stage}},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": RUNTIME},
            "trainer": {"image": image, "command": command(cfg, stage), "env": env, "numNodes": placement.distill_nodes,
                        "numProcPerNode": gpus, "resourcesPerNode": {"requests": resources, "limits": dict(resources)}},
            "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": patch}}}],
            "activeDeadlineSeconds": TIMEOUT_S,
        },
    }


def condition(job: dict) -> tuple[str, str] | None:
    """Return (type, "reason: message") of the job's true Complete or Failed condition, or None while it runs."""
    for c in job.get("status", {}).get("conditions", []):
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"], f"{c.get('reason', '')}: {c.get('message', '')}"
    return None


class _Terminated(Exception):
    """SIGTERM reached the orchestrating task: the pipeline run was stopped, or its pod deadline passed."""


def run(job: dict, namespace: str = "", api=None, poll_seconds: float = 30.0,
        timeout_seconds: float | None = TIMEOUT_S) -> dict:
    """Create `job` and poll it until it is Complete; return its final object, or raise if it Failed.

    A job of the same name left by an earlier attempt of the task is adopted if it is running or complete, and
    deleted and created again if it failed: the new one resumes from the newest checkpoint under its output.
    The job is deleted (its checkpoints stay) when it is not Complete after `timeout_seconds`, and when this process
    gets SIGTERM, which is how Argo stops the task of a terminated run: no TrainJob outlives the run that made it.
    `api` is a kubernetes CustomObjectsApi (default: in-cluster credentials); `namespace` defaults to the pod's own.
    """
    from kubernetes.client.rest import ApiException

    api = api or _custom_objects_api()
    where = dict(group=GROUP, version=VERSION, namespace=namespace or _own_namespace(), plural=PLURAL)
    name = job["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(body=job, **where)
        print(f"created TrainJob {where['namespace']}/{name}")
    except ApiException as e:
        if e.status != 409:  # 409 Conflict: a previous attempt of this task created it
            raise
        if (condition(_get(api, name, where)) or ("",))[0] == "Failed":
            api.delete_namespaced_custom_object(name=name, propagation_policy="Foreground", **where)
            while _get(api, name, where, missing_ok=True) is not None:  # old pods gone before new ones start
                time.sleep(poll_seconds)
            api.create_namespaced_custom_object(body=job, **where)
            print(f"re-created failed TrainJob {where['namespace']}/{name}")
        else:
            print(f"adopted TrainJob {where['namespace']}/{name}")
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds

    def terminated(*_):
        raise _Terminated

    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if main else None
    try:
        while True:
            state = _get(api, name, where)
            done = condition(state)
            if done is not None and done[0] == "Complete":
                return state
            if done is not None:
                raise RuntimeError(f"TrainJob {where['namespace']}/{name} failed: {done[1]}")
            if deadline is not None and time.monotonic() > deadline:
                api.delete_namespaced_custom_object(name=name, propagation_policy="Foreground", **where)
                raise TimeoutError(f"TrainJob {where['namespace']}/{name} was not Complete after {timeout_seconds:.0f} "
                                   "s: deleted it (its checkpoints stay; a retry resumes from them)")
            time.sleep(poll_seconds)
    except _Terminated:
        api.delete_namespaced_custom_object(name=name, propagation_policy="Foreground", **where)
        raise RuntimeError(f"stopped: deleted TrainJob {where['namespace']}/{name} (its checkpoints stay)") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def result(output: str) -> tuple[str, dict]:
    """Return (model URI, its sidflow.json) of a finished distill or finetune run under `output`."""
    model = storage.join(output, "model")
    if storage.read_manifest(model) is None:
        raise RuntimeError(f"the TrainJob completed but {model} has no manifest: the run did not export a model")
    return model, json.loads(storage.read_text(storage.join(model, "sidflow.json")))


def _get(api, name: str, where: dict, missing_ok: bool = False, attempts: int = 10) -> dict | None:
    from kubernetes.client.rest import ApiException

    for attempt in range(attempts):
        try:
            return api.get_namespaced_custom_object(name=name, **where)
        except ApiException as e:
            if e.status == 404 and missing_ok:
                return None
            if e.status not in (429, 500, 502, 503, 504) or attempt == attempts - 1:
                raise
            time.sleep(min(2.0 ** attempt, 60.0))  # the API server is busy or restarting: back off and ask again


def _own_namespace() -> str:
    """Return the pod's namespace; outside a pod, the kubeconfig's current context's (default: "default")."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except FileNotFoundError:
        from kubernetes import config

        context = config.list_kube_config_contexts(os.environ.get("KUBECONFIG"))[1]
        return context["context"].get("namespace", "default")


def _custom_objects_api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:  # outside a pod: the user's kubeconfig ($KUBECONFIG read now, not at import)
        config.load_kube_config(os.environ.get("KUBECONFIG"))
    return client.CustomObjectsApi()
