"""The sid-distill pipeline: compiled IR against the config dataclasses, the committed YAML, and a kfp.local run."""

import dataclasses
import glob
import json
import typing
from pathlib import Path

import pytest
import yaml

from sidflow import sizing, storage
from sidflow.config import default
from sidflow.kfp import sid_distill as pipeline_module
from sidflow.kfp.compile import DEFAULT_OUT, compile
from sidflow.kfp.components.distill import distill
from sidflow.kfp.components.register import register
from sidflow.kfp.components.watch_teachers import watch_teachers
from sidflow.stages.distill import DistillConfig
from sidflow.stages.evaluate import EvaluateConfig
from sidflow.stages.register import RegisterConfig
from sidflow.trainjob import PlacementConfig

KFP_TYPE = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN", dict: "STRUCT",
            list: "LIST"}


def _base_type(tp):
    """str for a Literal of strings, T for Optional[T], else tp itself."""
    if typing.get_origin(tp) is typing.Literal:
        return type(typing.get_args(tp)[0])
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, _base_type(hints[f.name])) for f in dataclasses.fields(cls)}


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    """[pipeline spec, kubernetes platform spec] of a fresh compile."""
    path = compile(str(tmp_path_factory.mktemp("ir") / "sid_distill.yaml"))
    return list(yaml.safe_load_all(Path(path).read_text()))


def _tasks(spec) -> dict[str, dict]:
    """Every container task of the IR, in every DAG, by its display name (found by meaning, not compiler ids)."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return {t["taskInfo"]["name"]: t for dag in dags for t in dag["tasks"].values()
            if "executorLabel" in spec["components"][t["componentRef"]["name"]]}


def _nodes(spec) -> dict[str, dict]:
    """Every task of the IR, container or sub-DAG, by display name, with "key" (its id in its DAG), "dag" (the
    component holding it) and "comp" (its own component): tests find tasks by meaning, never by compiler ids, so
    another dsl.If somewhere renumbers nothing here."""
    holders = {"root": spec["root"], **{k: c for k, c in spec["components"].items() if "dag" in c}}
    return {t["taskInfo"]["name"]: {**t, "key": key, "dag": holder, "comp": t["componentRef"]["name"]}
            for holder, comp in holders.items() for key, t in comp["dag"]["tasks"].items()}


def _sized(nodes, name: str) -> str:
    """The placeholder of the teacher's sizing output `name` (the size_teacher task's), as a GPU task's resources
    read it."""
    key = nodes["Size the GPU tasks for this teacher"]["key"]
    return f"{{{{$.inputs.parameters['pipelinechannel--{key}-{name}']}}}}"


def _branches(nodes, branch: str = "one-pod") -> dict:
    """The compiler's wrapper task around the one-pod / multi-node branches, or around the finetune / no-finetune
    ones (branch="finetune"); it has no display name of its own."""
    (task,) = [t for t in nodes.values() if t["comp"] == nodes[branch]["dag"]]
    return task


def _distill_tasks(spec) -> tuple[dict, dict]:
    """(the one-pod distill task, the TrainJob task): one in each branch of the distill_nodes condition."""
    n = _nodes(spec)
    one_pod, multi_node = n["one-pod"], n["multi-node"]
    assert one_pod["triggerPolicy"]["condition"] == \
        "int(inputs.parameter_values['pipelinechannel--distill_nodes']) == 1"
    assert multi_node["triggerPolicy"]["condition"] == \
        "!(int(inputs.parameter_values['pipelinechannel--distill_nodes']) == 1)"
    train, job = n["Distill one-step generator"], n["Distill on several nodes (TrainJob)"]
    assert (train["dag"], job["dag"]) == (one_pod["comp"], multi_node["comp"])
    return train, job


def test_dag_tasks_display_names_and_parallel_for(ir):
    spec = ir[0]
    n = _nodes(spec)
    assert {name for name, t in n.items() if t["dag"] == "root"} == {"Find new teachers", "new-teachers",
                                                                      "Report per teacher"}
    loop = n["new-teachers"]
    assert loop["parameterIterator"]["items"] == {
        "inputParameter": f"pipelinechannel--{n['Find new teachers']['key']}-Output"}
    branches, tuning = _branches(n), _branches(n, "finetune")
    assert branches["dag"] == tuning["dag"] == loop["comp"]
    assert {name for name, t in n.items() if t["dag"] == loop["comp"]} - {
        branches["taskInfo"]["name"], tuning["taskInfo"]["name"]} == {
        "Download teacher", "Size the GPU tasks for this teacher", "Evaluate (FID, CLIP score)",
        "Check the registration gate", "passed-gate"}
    fetch, size = n["Download teacher"], n["Size the GPU tasks for this teacher"]
    assert sorted(branches["dependentTasks"]) == sorted([fetch["key"], size["key"]])
    train, job = _distill_tasks(spec)
    channel = f"pipelinechannel--{fetch['key']}-uri"
    for task in (train, job):  # both distill the downloaded teacher
        assert task["inputs"]["parameters"]["teacher"] == {"componentInputParameter": channel}
    assert branches["inputs"]["parameters"][channel] == {
        "taskOutputParameter": {"producerTask": fetch["key"], "outputParameterKey": "uri"}}
    assert fetch["inputs"]["parameters"]["dest"]["parameterExpressionSelector"] == 'parseJson(string_value)["dest"]'
    assert set(_tasks(spec)) == {  # every container task
        "Find new teachers", "Download teacher", "Size the GPU tasks for this teacher", "Distill one-step generator",
        "Distill on several nodes (TrainJob)", "Fine-tune few-step generator (adversarial)",
        "Fine-tune on several nodes (TrainJob)", "The fine-tuned generator", "Keep the distilled generator",
        "Evaluate (FID, CLIP score)",
        "Check the registration gate", "Register (promote if better)", "Report per teacher"}


def _oneof(wrapper: dict) -> dict:
    # The input a task reads a dsl.OneOf through: the wrapper task's one output.
    return {"taskOutputParameter": {"outputParameterKey": f"pipelinechannel--{wrapper['key']}-oneof-1",
                                    "producerTask": wrapper["key"]}}


def test_finetune_runs_under_its_switch_on_the_distilled_model(ir):
    spec, platform = ir
    n = _nodes(spec)
    on, off = n["finetune"], n["no-finetune"]
    assert on["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--finetune'] == true"
    assert off["triggerPolicy"]["condition"] == "!(inputs.parameter_values['pipelinechannel--finetune'] == true)"
    tune, keep = n["Fine-tune few-step generator (adversarial)"], n["Keep the distilled generator"]
    tune_job, tuned = n["Fine-tune on several nodes (TrainJob)"], n["The fine-tuned generator"]
    # One pod or a TrainJob, as distill_nodes says (as for distill); their OneOf made a plain output by a no-op.
    one_pod, multi_node = n["finetune-one-pod"], n["finetune-multi-node"]
    assert one_pod["triggerPolicy"]["condition"] == \
        "int(inputs.parameter_values['pipelinechannel--distill_nodes']) == 1"
    assert (tune["dag"], tune_job["dag"]) == (one_pod["comp"], multi_node["comp"])
    assert (tuned["dag"], keep["dag"]) == (on["comp"], off["comp"])
    assert tuned["inputs"]["parameters"]["model"] == _oneof(_branches(n, "finetune-one-pod"))
    distill_branches = _branches(n)
    distilled = _oneof(distill_branches)  # dsl.OneOf(one-pod distill, TrainJob), handed into both branches
    channel = f"pipelinechannel--{distill_branches['key']}-{distilled['taskOutputParameter']['outputParameterKey']}"
    assert _branches(n, "finetune")["inputs"]["parameters"][channel] == distilled
    for task in (tune, tune_job):
        assert task["inputs"]["parameters"]["init"] == {"componentInputParameter": channel}
    assert keep["inputs"]["parameters"]["model"] == {"componentInputParameter": channel}
    job, size = tune_job["inputs"]["parameters"], n["Size the GPU tasks for this teacher"]["key"]
    for name in PLACEMENT_FIELDS:  # as distill's TrainJob: CPU and memory as the teacher's sizing resolved them
        channel = f"{size}-{name}" if name in sizing.SIZED else name
        assert job[name] == {"componentInputParameter": f"pipelinechannel--{channel}"}
    assert job["data"] == {"componentInputParameter": "pipelinechannel--finetune_data"}
    # Its own K, length, guidance and data; distill's hyperparameters otherwise.
    params = tune["inputs"]["parameters"]
    for field in ("data", "steps", "kimg", "guidance", "kappa"):
        assert params[field] == {"componentInputParameter": f"pipelinechannel--finetune_{field}"}
    for field in ("adv_weight", "disc_weight", "lr_g", "batch"):
        assert params[field] == {"componentInputParameter": f"pipelinechannel--{field}"}
    assert params["overrides"] == {"componentInputParameter": "pipelinechannel--overrides"}  # gan_clip and co.
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert root["finetune"]["defaultValue"] is False and root["finetune_steps"]["defaultValue"] == 4
    # A GPU pod like distill's: resources from run parameters, retries, /dev/shm, the S3 secret.
    executor = "exec-finetune"
    resources = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == _sized(n, "gpus")
    assert tune["retryPolicy"]["maxRetryCount"] == pipeline_module.DISTILL_RETRIES
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]
    assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm" and k8s["secretAsEnv"]


def test_evaluate_takes_either_branchs_model_and_gates_register(ir):
    spec = ir[0]
    n = _nodes(spec)
    evaluate_task, check, gate = n["Evaluate (FID, CLIP score)"], n["Check the registration gate"], n["passed-gate"]
    branches = _branches(n, "finetune")
    oneof = _oneof(branches)
    assert evaluate_task["inputs"]["parameters"]["model"] == oneof  # dsl.OneOf(finetune, the distilled model kept)
    assert sorted(evaluate_task["dependentTasks"]) == sorted([branches["key"], n["Download teacher"]["key"],
                                                             n["Size the GPU tasks for this teacher"]["key"]])
    assert check["inputs"]["parameters"] == {
        "overrides": {"componentInputParameter": "pipelinechannel--overrides"},
        "metrics": {"taskOutputParameter": {"outputParameterKey": "Output", "producerTask": evaluate_task["key"]}}}
    assert not check["cachingOptions"].get("enableCache", False)
    assert gate["triggerPolicy"]["condition"] == \
        f"inputs.parameter_values['pipelinechannel--{check['key']}-Output'] == true"
    assert sorted(gate["dependentTasks"]) == sorted([branches["key"], evaluate_task["key"], check["key"]])
    reg = n["Register (promote if better)"]
    assert reg["dag"] == gate["comp"]
    params = reg["inputs"]["parameters"]
    assert params["metrics"] == {"componentInputParameter": f"pipelinechannel--{evaluate_task['key']}-Output"}
    assert params["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert not reg["cachingOptions"].get("enableCache", False)  # the champion it compares against moves
    resources = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--gpu_resource']}}"
    assert resources["accelerator"]["resourceCount"] == _sized(n, "eval_gpus")  # the teacher's, not the run's
    assert evaluate_task["retryPolicy"]["maxRetryCount"] == pipeline_module.EVAL_RETRIES


def test_multi_node_branch_creates_a_trainjob(ir):
    spec, platform = ir
    train, job = _distill_tasks(spec)
    params = job["inputs"]["parameters"]
    size = _nodes(spec)["Size the GPU tasks for this teacher"]["key"]
    for name in PLACEMENT_FIELDS:  # CPU and memory as the teacher's sizing resolved them
        channel = f"{size}-{name}" if name in sizing.SIZED else name
        assert params[name] == {"componentInputParameter": f"pipelinechannel--{channel}"}
    assert params["trainer_image"] == {"runtimeValue": {"constant": distill.component_spec.implementation
                                                        .container.image}}
    assert job["retryPolicy"]["maxRetryCount"] == pipeline_module.DISTILL_RETRIES  # a retry adopts or replaces it
    # The one-pod task's resources are run-time parameters, which the compiler hands it as extra inputs.
    size = _nodes(spec)["Size the GPU tasks for this teacher"]["key"]
    resource_inputs = {"accelerator_count", "accelerator_type", "cpu_limit", "cpu_request", "memory_limit",
                       "memory_request", "pipelinechannel--gpu_resource", f"pipelinechannel--{size}-gpus",
                       f"pipelinechannel--{size}-distill_cpu", f"pipelinechannel--{size}-distill_memory"}
    assert set(params) - {"trainer_image", *PLACEMENT_FIELDS} == set(train["inputs"]["parameters"]) - resource_inputs
    executor = spec["deploymentSpec"]["executors"]["exec-distill-trainjob"]["container"]
    assert executor["image"].startswith("ghcr.io/example/sidflow-runtime:")  # a CPU pod that only orchestrates
    assert "resources" not in executor
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill-trainjob"]
    assert set(k8s) == {"secretAsEnv", "activeDeadlineSeconds"}  # no GPU placement: that goes into the TrainJob


def test_pod_settings_caching_and_retries(ir):
    spec, platform = ir
    train, _ = _distill_tasks(spec)
    resources = spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]
    # the resource name (MIG, other vendors) and the count are run-time parameters, which the driver resolves
    assert resources["accelerator"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--gpu_resource']}}"
    n = _nodes(spec)
    assert resources["accelerator"]["resourceCount"] == _sized(n, "gpus")
    assert spec["root"]["inputDefinitions"]["parameters"]["gpu_resource"]["defaultValue"] == "nvidia.com/gpu"
    # GPUs, CPU and memory of the one-pod distill are set at run time, as the teacher's sizing task resolved them.
    assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == _sized(n, "distill_cpu")
    assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == _sized(n, "distill_memory")
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert {name: root[name]["defaultValue"] for name in sizing.SIZED} == dict.fromkeys(sizing.SIZED, "auto")
    assert train["retryPolicy"]["maxRetryCount"] == pipeline_module.DISTILL_RETRIES
    for task in _tasks(spec).values():  # no task is cached (README, "Caching"): each reads state outside its inputs
        assert not task["cachingOptions"].get("enableCache", False), task["taskInfo"]["name"]  # proto3 omits false
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-watch-teachers", "exec-download-teacher", "exec-size-teacher", "exec-distill",
                              "exec-distill-trainjob", "exec-finetune", "exec-finetune-trainjob", "exec-keep-model",
                              "exec-fine-tuned", "exec-evaluate", "exec-passes-gate", "exec-register", "exec-report"}
    for name, ex in executors.items():
        long = {"exec-distill": pipeline_module.DISTILL_TIMEOUT_S, "exec-finetune": pipeline_module.DISTILL_TIMEOUT_S,
                "exec-distill-trainjob": pipeline_module.DISTILL_TIMEOUT_S,
                "exec-finetune-trainjob": pipeline_module.DISTILL_TIMEOUT_S,
                "exec-evaluate": pipeline_module.EVAL_TIMEOUT_S}
        want = long.get(name, pipeline_module.CPU_TIMEOUT_S)
        assert int(ex["activeDeadlineSeconds"]) == want, name  # no task runs forever
        secrets = {s["secretName"]: s for s in ex["secretAsEnv"]}
        # The hub's secret on the tasks that read the hub (hf:// teachers, CLIP weights by tag), and only there; the
        # registry's on the tasks that talk to the registry.
        hub = name in ("exec-watch-teachers", "exec-download-teacher", "exec-evaluate")
        reg = name in ("exec-watch-teachers", "exec-register", "exec-report")
        assert set(secrets) == {"sidflow-s3", *["sidflow-hf"] * hub, *["sidflow-registry"] * reg}, name
        assert {(m["secretKey"], m["envVar"]) for m in secrets["sidflow-s3"]["keyToEnv"]} == {
            (k, k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")}
        if hub:
            assert {(m["secretKey"], m["envVar"]) for m in secrets["sidflow-hf"]["keyToEnv"]} == {
                ("HF_TOKEN", "HF_TOKEN"), ("HF_ENDPOINT", "HF_ENDPOINT")}
        if reg:
            assert [m["envVar"] for m in secrets["sidflow-registry"]["keyToEnv"]] == [
                "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MODEL_REGISTRY_TOKEN"]
        # optional: the driver (backend >= 2.15, driver/k8s.go) sets secretKeyRef.optional, so a cluster without the
        # secret (no hub token; workload identity instead of S3 keys) still starts the pod
        assert all(s["optional"] is True for s in secrets.values()), name
    assert executors["exec-evaluate"]["nodeSelector"] == executors["exec-distill"]["nodeSelector"] == (
        executors["exec-finetune"]["nodeSelector"])
    assert executors["exec-distill"]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": pipeline_module.DISTILL_SHM, "volumeName": "dshm"}]


def test_gpu_placement_is_set_at_run_time(ir):
    """Node selector and tolerations are pipeline parameters, resolved by the KFP driver (kfp-kubernetes *_json)."""
    spec, platform = ir
    distill_pod = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]
    assert distill_pod["nodeSelector"] == {
        "nodeSelectorJson": {"componentInputParameter": "pipelinechannel--gpu_node_selector"}}
    assert distill_pod["tolerations"] == [
        {"tolerationJson": {"componentInputParameter": "pipelinechannel--gpu_tolerations"}}]
    # the driver looks them up among the inputs of the DAG around the task: the one-pod condition
    inputs = spec["components"][_nodes(spec)["one-pod"]["comp"]]["inputDefinitions"]["parameters"]
    assert inputs["pipelinechannel--gpu_node_selector"]["parameterType"] == "STRUCT"
    assert inputs["pipelinechannel--gpu_tolerations"]["parameterType"] == "LIST"


PLACEMENT_FIELDS = tuple(_fields(PlacementConfig))


def test_every_run_parameter_is_a_dataclass_field_and_reaches_its_task_by_name(ir):
    # The pipeline signature and each component's are generated from the dataclasses (sidflow.kfp.declare): what is
    # checked here is that a run parameter arrives where it is used, not that hand-made copies agree.
    from sidflow.kfp.tasks import ADVANCED, EVAL_NAMES

    spec = ir[0]
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert not [n for n, p in root.items() if p.get("isOptional") and "defaultValue" not in p]  # kfp.local runs them
    tasks = _tasks(spec)
    distill_in = tasks["Distill one-step generator"]["inputs"]["parameters"]
    eval_in = tasks["Evaluate (FID, CLIP score)"]["inputs"]["parameters"]
    for name in ("kappa", "guidance", "lr_g", "steps", "seed"):
        assert distill_in[name] == {"componentInputParameter": f"pipelinechannel--{name}"}
    for field, name in EVAL_NAMES.items():
        if field in eval_in and name not in sizing.SIZED:  # eval_gpus: the teacher's sizing (test_size_teacher...)
            assert eval_in[field] == {"componentInputParameter": f"pipelinechannel--{name}"}
    for task in ("Distill one-step generator", "Distill on several nodes (TrainJob)", "Evaluate (FID, CLIP score)",
                 "Check the registration gate", "Register (promote if better)"):
        assert tasks[task]["inputs"]["parameters"]["overrides"] == {"componentInputParameter":
                                                                    "pipelinechannel--overrides"}, task
    for name, field in (("kappa", "kappa"), ("kimg", "kimg"), ("eval_protocol", "protocol")):
        cls = EvaluateConfig if name.startswith("eval_") else DistillConfig
        f = _fields(cls)[field][0]
        assert root[name]["defaultValue"] == default(f)
        assert " ".join(root[name]["description"].split()) == f.metadata["help"]
    none = {"kappa_1", "kappa_2", "kappa_4", "clip_grad_value", "eval_limit", "eval_workers", "clip_floor", "max_fid"}
    assert set(pipeline_module.OVERRIDABLE) == none | set(ADVANCED)
    assert not set(pipeline_module.OVERRIDABLE) & set(root)
    # The run form keeps what a run is planned with; the components keep every field as an input (teams reuse them).
    assert len(root) == 43 and {"teachers", "kappa", "kimg", "finetune", "adv_weight", "eval_protocol"} <= set(root)
    component = {name: set(c["inputDefinitions"]["parameters"]) for name, c in spec["components"].items()}
    assert {"norms", "compile", "t_init"} <= component["comp-distill"]
    assert {"batch", "grid"} <= component["comp-evaluate"]
    assert not {"norms", "compile", "t_init"} & set(distill_in) and not {"batch", "grid"} & set(eval_in)


def test_a_field_added_to_a_dataclass_becomes_a_component_parameter():
    # One declaration: a new field, with its type, default and help, is a typed KFP input with no other edit.
    from kfp import dsl

    from sidflow.config import param
    from sidflow.kfp import declare

    @dataclasses.dataclass(frozen=True)
    class Toy:
        rate: float = param(0.5, "how fast")
        mode: typing.Literal["a", "b"] = param("a", "which")
        cap: int | None = param(None, "upper bound; None: none")

    text = declare.source("toy", declare.params(Toy), "A toy.", "return str(arguments)", returns="str")
    comp = dsl.component(base_image="python:3.11", install_kfp_package=False)(declare.function("toy", text, {}))
    inputs = comp.component_spec.inputs
    assert set(inputs) == {"rate", "mode", "cap"} and inputs["rate"].description == "how fast"
    assert (inputs["rate"].type, inputs["rate"].default) == ("Float", 0.5)
    assert (inputs["mode"].type, inputs["mode"].default) == ("String", "a")
    assert (inputs["cap"].type, inputs["cap"].optional) == ("Integer", True)
    assert comp.python_func(rate=1.0) == str({"rate": 1.0, "mode": "a", "cap": None})
    assert declare.none_fields(Toy) == ("cap",)
    assert [p.choices for p in declare.params(Toy)] == [None, ("a", "b"), None]


def test_overrides_carry_the_none_default_and_advanced_fields_typed_and_checked(tmp_path):
    from sidflow.kfp.tasks import EVAL_NAMES, _distill_config, checked_overrides, overridden
    from sidflow.stages.distill import resolved_kappas
    from sidflow.stages.finetune import FinetuneConfig

    given = checked_overrides({"kappa_4": "3", "clip_grad_value": 5, "eval_limit": "100", "clip_floor": 0.2,
                               "norms": "autocast", "log_every": "10", "eval_batch": 8, "gan_clip": "2"})
    assert given == {"kappa_4": 3.0, "clip_grad_value": 5.0, "eval_limit": 100, "clip_floor": 0.2,
                     "norms": "autocast", "log_every": 10, "eval_batch": 8, "gan_clip": 2.0}
    cfg = dataclasses.replace(DistillConfig(guidance="anti_cfg", kappa=-1.5), **overridden(DistillConfig, given))
    assert resolved_kappas(cfg) == {"kappa_1": 1.0, "kappa_2": -1.5, "kappa_4": 3.0} and cfg.clip_grad_value == 5.0
    assert (cfg.norms, cfg.log_every, cfg.batch) == ("autocast", 10, 512)  # eval_batch is evaluate's, not distill's
    assert overridden(EvaluateConfig, given, EVAL_NAMES) == {"limit": 100, "batch": 8}
    assert overridden(RegisterConfig, given) == {"clip_floor": 0.2}
    assert overridden(FinetuneConfig, given)["gan_clip"] == 2.0
    with pytest.raises(ValueError, match=r"overrides: 'kappa_3' is not one of .* \(did you mean kappa_\d\?\)"):
        checked_overrides({"kappa_3": 1.0})
    with pytest.raises(ValueError, match="eval_limit='many' is not a valid int"):
        checked_overrides({"eval_limit": "many"})
    with pytest.raises(ValueError, match="overrides: 'kimg' is not one of"):  # a run parameter: not in overrides
        checked_overrides({"kimg": 1})
    # A run started from the UI has not been through submit: the distill task refuses a bad key itself.
    fields = {"teacher": "t", "prompts": "p", "output": str(tmp_path)}
    with pytest.raises(ValueError, match="overrides: 'norm' is not one of .*did you mean norms"):
        _distill_config(fields, "", "", {"norm": "fp32"})
    with pytest.raises(ValueError, match="^eval_batch=0 must be at least 1$"):  # evaluate's, before the distill
        _distill_config(fields, "", "", {"eval_batch": 0})
    assert _distill_config(fields, "", "", {"norms": "autocast", "eval_grid": 4}).norms == "autocast"


RUN_IDENTITY = {"artifact_root", "run_id", "teacher_fingerprint"}  # the run's prefix is joined inside (kfp.paths)


def test_committed_yaml_is_up_to_date(ir):
    committed = list(yaml.safe_load_all(Path(DEFAULT_OUT).read_text()))
    assert committed == ir, "sidflow/kfp/sid_distill.yaml is stale: run `python -m sidflow.kfp.compile`"


def test_watch_component_items_carry_their_fingerprints(tiny_teacher, tmp_path):
    out = watch_teachers.python_func(teachers=tiny_teacher, registry=str(tmp_path / "r"),
                                     artifact_root=str(tmp_path / "a"))
    digest = "sha256:" + storage.manifest_digest(storage.build_manifest(tiny_teacher))
    assert [e["fingerprint"] for e in out] == [digest]
    assert json.loads(json.dumps(out)) == out  # what KFP serialises for the ParallelFor


def test_run_local_end_to_end_on_s3_registers_once_then_skips(s3_bucket, sidflow_cache, tmp_path, monkeypatch):
    """The whole DAG under kfp.local on the bundled toy teacher, artifacts and registry on the loopback S3: the run
    writes under its own prefix, registers once, and a second run skips the teacher. (Two teachers of one run get two
    prefixes: test_output_prefixes_are_unique_per_run_and_teacher_as_the_backend_resolves_them.)"""
    from sidflow import registry
    from sidflow.cli import main
    from sidflow.demo import TOY_TEACHER
    from sidflow.generator import load_generator, sample
    from sidflow.pairs import pack
    from sidflow.toy.metrics import toy_eval_set
    from sidflow.toy.shapes import write_parquet

    monkeypatch.setenv("SIDFLOW_NO_BAR", "1")
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background, center\na blue square on a black background, top left\n")
    evaluator = str(TOY_TEACHER / "evaluator")
    eval_set = toy_eval_set(f"{s3_bucket}/eval", evaluator, n=8, reference_images=64)
    reg, art = f"{s3_bucket}/registry", f"{s3_bucket}/art"
    write_parquet(str(tmp_path / "shapes.parquet"), 6, seed=0)  # real pairs for finetune, packed onto the S3
    table = storage.parquet_table((tmp_path / "shapes.parquet").read_bytes())
    pack(zip(table.column("image").to_pylist(), table.column("caption").to_pylist()), f"{s3_bucket}/pairs")
    args = ["pipeline", "run-local", "--pipeline-root", str(tmp_path / "root"), "--teachers", str(TOY_TEACHER),
            "--registry", reg, "--artifact-root", art, "--prompts", str(prompts)]
    for kv in ("batch=2", "micro_batch=2", "kimg=0.004", "precision=fp32", "checkpoints=false",
               "finetune=true", f"finetune_data={s3_bucket}/pairs", "finetune_steps=2", "finetune_kimg=0.002",
               "model_name=toy", f"eval_prompts={eval_set['prompts']}", f"eval_reference={eval_set['reference']}",
               "eval_protocol=native", f"eval_features=toy:{evaluator}", f"eval_scorer=toy:{evaluator}", "eval_grid=4"):
        args += ["--set", kv]
    assert main(args) == 0
    (version,) = registry.list_versions(reg, "toy")
    assert registry.champion(reg, "toy") is not None
    digest = "sha256:" + storage.manifest_digest(storage.build_manifest(str(TOY_TEACHER)))
    assert version.teacher_fingerprint == digest
    (run_id,) = storage.listdir(f"{art}/runs")
    (run,) = storage.listdir(f"{art}/runs/{run_id}")
    prefix = f"{art}/runs/{run_id}/{run}"
    assert "{{" not in run_id and version.model_uri == f"{prefix}/finetune/model"  # the fine-tuned one registered
    assert storage.exists(storage.join(prefix, "eval", "metrics.json"))  # evaluate wrote in its run's directory
    assert version.metrics["images"] == 8 and 0 <= version.metrics["clip"] <= 1 and version.metrics["fid"] > 0
    assert version.metrics["model"] == version.model_uri  # the evaluation scored the registered model
    gen, info = load_generator(version.model_uri)
    assert sample(gen, info, ["a red circle on a white background, center"], [0]).shape == (1, 32, 32, 3)
    assert info["config"]["kimg"] == 0.002 and info["config"]["steps"] == 2 and info["teacher_fingerprint"] == digest
    assert info["config"]["init"] == f"{prefix}/model" and info["config"]["batch"] == 2  # distill's, and its batch
    (report_out,) = glob.glob(str(tmp_path / "root" / "*" / "report" / "executor_output.json"))
    rows = json.loads(Path(report_out).read_text())["parameterValues"]["Output"]
    assert [r["status"] for r in rows] == ["registered"]
    (attempt,) = storage.list_files(f"{art}/teacher-attempts")  # the report recorded the teacher's outcome
    record = json.loads(storage.read_text(f"{art}/teacher-attempts/{attempt}"))
    assert (record["status"], record["fingerprint"], record["run_id"]) == ("registered", digest, run_id)
    cards = {task: [json.loads(Path(out).read_text())["artifacts"]["model"]["artifacts"][0]  # KFP Model artifacts
                    for out in glob.glob(str(tmp_path / "root" / "*" / "*" / task / "executor_output.json"))]
             for task in ("distill", "finetune")}
    assert [(c["metadata"]["uri"], c["metadata"]["teacher_fingerprint"]) for c in cards["finetune"]] == [
        (version.model_uri, digest)]
    assert [c["metadata"]["uri"] for c in cards["distill"]] == [f"{prefix}/model"]

    assert main(args) == 0  # same teachers, same fingerprints: watch_teachers finds nothing new
    assert [v.version for v in registry.list_versions(reg, "toy")] == [1]
    assert len(storage.listdir(f"{art}/runs")) == 1  # no second distillation


def test_run_local_refuses_unknown_parameters_in_one_line(tmp_path, capsys):
    from sidflow.cli import main

    base = ["pipeline", "run-local", "--pipeline-root", str(tmp_path / "root"), "--teachers", "t", "--registry", "r",
            "--artifact-root", "a", "--prompts", "p", "--set"]
    for pair, line in [("kapa=2", "unknown sid-distill parameter(s): kapa (did you mean kappa?)"),
                       ("norms=bf16", "norms='bf16' is not one of"),  # no run parameter: checked in overrides
                       (("kappa_4=2", 'overrides={"kappa_4": 3}'), "kappa_4 is given twice"),
                       ('overrides={"kapa_4": 2}', "overrides: 'kapa_4' is not one of"),
                       ('overrides={"kappa_4": "x"}', "kappa_4='x' is not a valid float"),
                       ("batch=0", "batch=0 and micro_batch=1 must be at least 1")]:  # a value out of range
        first, *more = (pair,) if isinstance(pair, str) else pair  # more: each after another --set
        assert main(base + [first] + [a for x in more for a in ("--set", x)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sidflow pipeline: error: {line}") and err.count("\n") == 1, err
    assert not (tmp_path / "root").exists()


def test_register_component_registers_and_promotes(tmp_path):
    src = tmp_path / "model-src"
    src.mkdir()
    (src / "sidflow.json").write_text(json.dumps({"teacher_fingerprint": "sha256:abc", "config": {"kimg": 1}}))
    model = str(tmp_path / "model")
    storage.publish_dir(str(src), model)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"fid": 30.0, "clip": 0.3}))
    reg = str(tmp_path / "registry")
    out = register.python_func(registry=reg, model=model, metrics=str(metrics), run_id="r1")
    assert out == {"version": 1, "promoted": True, "champion_version": 1}
    from sidflow import registry

    assert registry.fingerprints(reg, "sid-generator") == {"sha256:abc"}
    with pytest.raises(ValueError, match="promote='bogus' is not one of"):
        register.python_func(registry=reg, model=model, metrics=str(metrics), promote="bogus")


@pytest.mark.parametrize("fid, clip, max_fid, passed", [
    (30.0, 0.3, 0.0, True), (30.0, 0.3, 25.0, False), (30.0, 0.3, 30.0, True), (float("nan"), 0.3, 0.0, False),
    (30.0, float("inf"), 0.0, False)])
def test_registration_gate(tmp_path, fid, clip, max_fid, passed):
    from sidflow.kfp.components.evaluate import passes_gate

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"fid": fid, "clip": clip}))  # json writes NaN/Infinity, as Python reads them
    overrides = {"max_fid": max_fid} if max_fid else {}
    assert passes_gate.python_func(metrics=str(metrics), overrides=overrides) is passed


# The KFP backend's rules, which kfp.local does not apply ---------------------------------------------------------
# Resolution of a task's inputs as the v2 backend does it (kubeflow/pipelines backend/src/v2, tags 2.5.0-2.17.0):
# 1. the driver (driver/resolve.go, resolveInputParameter) replaces a runtimeValue constant by the run's value only
#    when the constant *is* one of the placeholders (a `switch` on the whole string);
# 2. the launcher (component/launcher_v2.go, compileCmdAndArgs) substitutes {{$.inputs.parameters['x']}} in the
#    command and arguments, and nothing else; a `{{$.pipeline_...}}` inside a longer string stays as it is.
PLACEHOLDERS = ("{{$.pipeline_job_uuid}}", "{{$.pipeline_task_uuid}}", "{{$.pipeline_job_name}}",
                "{{$.pipeline_job_resource_name}}", "{{$.pipeline_task_name}}", "{{$.pipeline_root}}")


def driver_constant(value, run: dict):
    """Step 1: the value the executor receives for a runtimeValue constant."""
    return run[value] if isinstance(value, str) and value in run else value


def _constants(node):
    if isinstance(node, dict):
        if "runtimeValue" in node:
            yield node["runtimeValue"]["constant"]
        for v in node.values():
            yield from _constants(v)
    elif isinstance(node, list):
        for v in node:
            yield from _constants(v)


def test_no_constant_embeds_a_run_placeholder(ir):
    # Fails for an f-string such as f"{artifact_root}/runs/{dsl.PIPELINE_JOB_ID_PLACEHOLDER}": the backend would
    # hand the container the literal placeholder, and every run would share one prefix.
    for value in _constants(ir[0]):
        if isinstance(value, str) and "{{$.pipeline_" in value:
            assert value in PLACEHOLDERS, value


def test_output_prefixes_are_unique_per_run_and_teacher_as_the_backend_resolves_them(ir):
    from sidflow.kfp.paths import run_output

    tasks = _tasks(ir[0])
    outputs = set()
    for run_uuid in ("6f1c2e0a-run-one", "a93b7d44-run-two"):
        run = {"{{$.pipeline_job_uuid}}": run_uuid, "{{$.pipeline_task_uuid}}": "dag-execution-7"}
        for teacher in ("s3://b/art/teachers/sd15-1a2b", "s3://b/art/teachers/sd21-3c4d"):
            per_task = set()
            for name in ("Distill one-step generator", "Distill on several nodes (TrainJob)",
                         "Evaluate (FID, CLIP score)"):
                params = tasks[name]["inputs"]["parameters"]
                run_id = driver_constant(params["run_id"]["runtimeValue"]["constant"], run)
                assert params["artifact_root"] == {"componentInputParameter": "pipelinechannel--artifact_root"}
                assert "output" not in params  # joined inside the component from whole values
                per_task.add(run_output("s3://b/art", run_id, teacher))
            assert len(per_task) == 1  # distill and evaluate of one teacher share the run directory
            outputs |= per_task
    assert len(outputs) == 4  # 2 runs x 2 teachers: nothing shared, no run resumes another's checkpoints
    with pytest.raises(ValueError, match="unresolved placeholder"):
        run_output("s3://b/art", "{{$.pipeline_job_uuid}}", "s3://b/art/teachers/sd15")


def test_distill_cache_key_includes_the_teacher_fingerprint(ir):
    tasks = _tasks(ir[0])
    for name in ("Distill one-step generator", "Distill on several nodes (TrainJob)"):
        (channel,) = tasks[name]["inputs"]["parameters"]["teacher_fingerprint"].values()
        assert f"{_nodes(ir[0])['Download teacher']['key']}-fingerprint" in channel


def test_loop_parallelism_is_bounded_and_set_at_compile_time(tmp_path):
    from sidflow.kfp.compile import compile

    for n, path in ((None, DEFAULT_OUT), (3, compile(str(tmp_path / "p3.yaml"), max_parallel=3))):
        spec = next(yaml.safe_load_all(Path(path).read_text()))
        loop = _nodes(spec)["new-teachers"]
        assert loop["iteratorPolicy"]["parallelismLimit"] == (n or pipeline_module.MAX_PARALLEL)
    assert pipeline_module.MAX_PARALLEL == 1
    again = next(yaml.safe_load_all(Path(compile(str(tmp_path / "again.yaml"))).read_text()))  # build() restored it
    assert _nodes(again)["new-teachers"]["iteratorPolicy"]["parallelismLimit"] == 1


def test_a_last_task_reports_every_teacher_even_after_failures(ir):
    n = _nodes(ir[0])
    task = n["Report per teacher"]
    assert task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs when a teacher's tasks failed
    assert sorted(task["dependentTasks"]) == sorted([n["new-teachers"]["key"], n["Find new teachers"]["key"]])
    assert task["inputs"]["parameters"]["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}


def test_report_names_where_each_teacher_ended(tmp_path):
    from sidflow.kfp.paths import run_output
    from sidflow.kfp.report import markdown, teacher_status

    art, reg = str(tmp_path / "art"), str(tmp_path / "reg")
    teachers = [{"source": f"hf://org/{n}", "dest": f"{art}/teachers/{n}"} for n in ("a", "b", "c", "d", "e", "f")]
    runs = [run_output(art, "run-1", t["dest"]) for t in teachers]
    from sidflow.train import checkpoint

    checkpoint.save(runs[1], 2048, {"nimg": 2048}, {"nimg": 2048})  # b: stopped mid-distill
    src = tmp_path / "model"
    src.mkdir()
    (src / "sidflow.json").write_text("{}")
    for run in runs[2:]:
        storage.publish_dir(str(src), storage.join(run, "model"))
    storage.write_text(storage.join(runs[2], "eval", "metrics.json"), json.dumps({"fid": 99.0, "clip": 0.2}))
    from sidflow import registry

    registry.register(reg, "m", storage.join(runs[3], "model"), {"fid": 9.0, "clip": 0.3}, "fp", "run-1")
    registry.promote(reg, "m", 1)
    # e: distilled, its finetune stopped after a checkpoint; f: fine-tuned, and the fine-tuned model registered.
    storage.write_text(storage.join(runs[4], "finetune", "config.json"), "{}")
    checkpoint.save(storage.join(runs[4], "finetune"), 1024, {"nimg": 1024}, {"nimg": 1024})
    storage.publish_dir(str(src), storage.join(runs[5], "finetune", "model"))
    registry.register(reg, "m", storage.join(runs[5], "finetune", "model"), {"fid": 19.0, "clip": 0.3}, "fp", "run-1")
    rows = [teacher_status(art, "run-1", t, reg, "m") for t in teachers]
    assert [r["status"] for r in rows] == ["not-started", "distill-failed", "gated", "registered", "finetune-failed",
                                           "registered"]
    assert rows[1]["detail"] == "stopped at 2.048 kimg" and rows[3]["detail"] == "m v1 (champion)"
    assert rows[4]["detail"] == "distilled; finetune stopped at 1.024 kimg" and rows[5]["detail"] == "m v2"
    assert markdown(rows).count("\n") == 8


# What a platform team reuses without installing sidflow: the IR and each component's spec. ------------------------


def test_top_level_pipeline_and_components_are_up_to_date(tmp_path):
    from sidflow.kfp.compile import REPO, _components, _write

    assert (REPO / "pipeline" / "sid-distill.yaml").read_text() == Path(DEFAULT_OUT).read_text(), \
        "pipeline/ is stale: run `python -m sidflow.kfp.compile`"
    names = _components()
    assert sorted(p.name for p in (REPO / "components").glob("*.yaml")) == sorted(
        f"{n.replace('_', '-')}.yaml" for n in names)
    for name, component in names.items():
        fresh = _write(component, str(tmp_path / f"{name}.yaml"))
        assert Path(fresh).read_text() == (REPO / "components" / f"{name.replace('_', '-')}.yaml").read_text(), \
            f"components/{name}.yaml is stale: run `python -m sidflow.kfp.compile`"


def test_component_specs_load_into_a_pipeline_of_ones_own(tmp_path):
    from kfp import compiler, components, dsl

    from sidflow.kfp.compile import REPO

    register_op = components.load_component_from_file(str(REPO / "components" / "register.yaml"))
    distill_op = components.load_component_from_file(str(REPO / "components" / "distill.yaml"))

    @dsl.pipeline(name="team-pipeline")
    def team(teacher: str = "s3://team/teachers/sd15"):
        d = distill_op(teacher=teacher, prompts="s3://team/prompts.txt", output="s3://team/runs/one", kimg=100.0)
        register_op(registry="s3://team/registry", model=d.outputs["Output"], metrics="s3://team/eval/m.json")

    compiler.Compiler().compile(team, str(tmp_path / "team.yaml"))
    spec = next(yaml.safe_load_all((tmp_path / "team.yaml").read_text()))
    assert set(spec["root"]["dag"]["tasks"]) == {"distill", "register"}
    assert spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["image"].endswith("sidflow-trainer:0.1.0")


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path, node


def test_image_override_changes_every_image_and_nothing_else(tmp_path):
    from sidflow.kfp.compile import compile

    digest = "sha256:" + "ab" * 32
    ours = list(yaml.safe_load_all(Path(compile(str(tmp_path / "ours.yaml"), image_registry="registry.example.com/ml",
                                                trainer_digest=digest)).read_text()))
    default = list(yaml.safe_load_all(Path(DEFAULT_OUT).read_text()))
    before, after = dict(_leaves(default)), dict(_leaves(ours))
    assert before.keys() == after.keys()
    changed = {p: (before[p], after[p]) for p in before if before[p] != after[p]}
    assert changed and all(isinstance(b, str) and ("sidflow-runtime:" in b or "sidflow-trainer:" in b)
                           for b, _ in changed.values())
    assert {a for _, a in changed.values()} == {"registry.example.com/ml/sidflow-runtime:0.1.0",
                                                f"registry.example.com/ml/sidflow-trainer@{digest}"}
    assert "ghcr.io/example" not in (tmp_path / "ours.yaml").read_text()
    with pytest.raises(ValueError, match="is not sha256"):
        compile(str(tmp_path / "bad.yaml"), runtime_digest="latest")


def test_size_teacher_outputs_set_the_gpu_tasks_resources_as_the_backend_resolves_them(ir):
    # The driver resolves a resource placeholder from the task's own inputs (driver/resolve.go,
    # resolvePodSpecInputRuntimeParameter, reading GetStringValue): each must be an input of the GPU task, fed from the
    # sizing task's STRING output through every DAG in between (loop -> dsl.If branch -> task).
    spec = ir[0]
    n = _nodes(spec)
    size, fetch = n["Size the GPU tasks for this teacher"], n["Download teacher"]
    assert size["dag"] == n["new-teachers"]["comp"] and size["dependentTasks"] == [fetch["key"]]
    assert size["inputs"]["parameters"]["teacher"] == {
        "taskOutputParameter": {"outputParameterKey": "uri", "producerTask": fetch["key"]}}
    for name in sizing.SIZED:  # the run's value ("auto" by default) goes in; the resolved one comes out
        assert size["inputs"]["parameters"][name] == {"componentInputParameter": f"pipelinechannel--{name}"}
    outputs = spec["components"][size["comp"]]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in outputs.items()} == dict.fromkeys(("teacher_type", *sizing.SIZED),
                                                                                 "STRING")
    from_size = {name: {"taskOutputParameter": {"outputParameterKey": name, "producerTask": size["key"]}}
                 for name in sizing.SIZED}
    branch = _branches(n)  # the one-pod / multi-node wrapper inside the loop
    for name in ("gpus", "sharding", "distill_cpu", "distill_memory"):
        assert branch["inputs"]["parameters"][f"pipelinechannel--{size['key']}-{name}"] == from_size[name]
    train = n["Distill one-step generator"]
    channel = {name: {"componentInputParameter": f"pipelinechannel--{size['key']}-{name}"} for name in sizing.SIZED}
    assert train["inputs"]["parameters"]["gpus"] == channel["gpus"]  # the processes it starts match its GPUs
    assert train["inputs"]["parameters"]["sharding"] == channel["sharding"]
    for resource, name in (("accelerator_count", "gpus"), ("cpu_request", "distill_cpu"),
                           ("memory_limit", "distill_memory")):
        assert train["inputs"]["parameters"][resource] == {"runtimeValue": {"constant": _sized(n, name)}}
        assert train["inputs"]["parameters"][f"pipelinechannel--{size['key']}-{name}"] == channel[name]
    score = n["Evaluate (FID, CLIP score)"]
    assert score["inputs"]["parameters"]["gpus"] == from_size["eval_gpus"]
    assert score["inputs"]["parameters"][f"pipelinechannel--{size['key']}-eval_gpus"] == from_size["eval_gpus"]
    assert spec["deploymentSpec"]["executors"]["exec-size-teacher"]["container"]["image"].startswith(
        "ghcr.io/example/sidflow-runtime:")  # a CPU pod: it reads two JSON files


def test_choice_parameters_are_drop_downs_the_backend_checks(ir):
    # ParameterSpec.literals: the run form shows a Select for it (frontend NewRunParametersV2.tsx) and API server 2.17
    # refuses a run whose value is not one of them (apiserver/template/v2_template.go, util.ValidateLiteralParameter).
    # The SDK emits none for a typing.Literal; sidflow.kfp.compile adds them.
    root = ir[0]["root"]["inputDefinitions"]["parameters"]
    with_choices = {p.name: list(p.choices) for p in pipeline_module.PARAMS if p.choices}
    assert {name: spec["literals"] for name, spec in root.items() if "literals" in spec} == with_choices
    assert {"guidance", "precision", "sharding", "eval_protocol", "promote"} <= set(with_choices)
    assert with_choices["sharding"] == ["ddp", "fsdp", "auto"]
    for name in with_choices:  # the default must be allowed, or the form's untouched run is refused
        assert root[name]["defaultValue"] in root[name]["literals"], name
    assert "literals" not in root["gpus"]  # a count: free text
