"""The sid-distill pipeline: compiled IR against the config dataclasses, the committed YAML, and a kfp.local run."""

import dataclasses
import glob
import json
import os
import typing
from pathlib import Path

import pytest
import yaml

from components.distill import distill
from components.download_teacher import download_teacher
from components.register import register
from components.watch_teachers import watch_teachers
from pipeline import sid_distill as pipeline_module
from pipeline.compile import DEFAULT_OUT, compile
from sidflow import storage
from sidflow.stages.distill import DistillConfig
from sidflow.stages.download_teacher import DownloadTeacherConfig
from sidflow.stages.register import RegisterConfig
from sidflow.stages.watch_teachers import WatchTeachersConfig

KFP_TYPE = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN"}


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


def test_dag_tasks_display_names_and_parallel_for(ir):
    spec = ir[0]
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"watch-teachers", "for-loop-1"}
    assert root["watch-teachers"]["taskInfo"]["name"] == "Find new teachers"
    loop = root["for-loop-1"]
    assert loop["taskInfo"]["name"] == "new-teachers"
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--watch-teachers-Output"}
    inner = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert {k: t["taskInfo"]["name"] for k, t in inner.items()} == {
        "download-teacher": "Download teacher", "distill": "Distill one-step generator"}
    assert inner["distill"]["dependentTasks"] == ["download-teacher"]
    assert inner["distill"]["inputs"]["parameters"]["teacher"]["taskOutputParameter"] == {
        "producerTask": "download-teacher", "outputParameterKey": "uri"}
    fields = inner["download-teacher"]["inputs"]["parameters"]
    assert fields["dest"]["parameterExpressionSelector"] == 'parseJson(string_value)["dest"]'
    assert set(spec["components"]) == {"comp-watch-teachers", "comp-for-loop-1", "comp-download-teacher",
                                       "comp-distill"}  # no register until evaluate lands


def test_pod_settings_caching_and_retries(ir):
    spec, platform = ir
    resources = spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == str(pipeline_module.DISTILL_GPUS)
    assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == pipeline_module.DISTILL_CPU
    assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == pipeline_module.DISTILL_MEMORY
    inner = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert inner["distill"]["retryPolicy"]["maxRetryCount"] == pipeline_module.DISTILL_RETRIES
    assert inner["distill"]["cachingOptions"] == {"enableCache": True}
    for task in (spec["root"]["dag"]["tasks"]["watch-teachers"], inner["download-teacher"]):
        assert not task["cachingOptions"].get("enableCache", False)  # proto3 omits false
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-watch-teachers", "exec-download-teacher", "exec-distill"}
    for ex in executors.values():
        (secret,) = ex["secretAsEnv"]
        assert secret["secretName"] == "sidflow-s3"
        assert {(m["secretKey"], m["envVar"]) for m in secret["keyToEnv"]} == {
            (k, k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")}
    assert executors["exec-distill"]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": pipeline_module.DISTILL_SHM, "volumeName": "dshm"}]


def test_root_parameters_match_the_config_dataclasses(ir):
    params = ir[0]["root"]["inputDefinitions"]["parameters"]
    expected = {**_fields(WatchTeachersConfig),
                **{k: v for k, v in _fields(DistillConfig).items() if k not in pipeline_module.NOT_EXPOSED}}
    assert set(params) == set(expected)
    for name, (field, tp) in expected.items():
        p = params[name]
        assert p["parameterType"] == KFP_TYPE[tp], name
        assert p["defaultValue"] == field.default and isinstance(p["defaultValue"], bool) == (tp is bool), name
        assert " ".join(p["description"].split()) == field.metadata["help"] + ".", name


@pytest.mark.parametrize("component, cls", [
    (watch_teachers, WatchTeachersConfig), (download_teacher, DownloadTeacherConfig), (distill, DistillConfig),
    (register, RegisterConfig)])
def test_component_parameters_are_the_config_fields(component, cls):
    inputs = component.component_spec.inputs
    fields = _fields(cls)
    assert set(inputs) == set(fields)
    kfp_names = {str: "String", int: "Integer", float: "Float", bool: "Boolean"}
    for name, (field, tp) in fields.items():
        assert inputs[name].default == field.default, name
        assert inputs[name].type == kfp_names[tp], name


def test_committed_yaml_is_up_to_date(ir):
    committed = list(yaml.safe_load_all(Path(DEFAULT_OUT).read_text()))
    assert committed == ir, "pipeline/sid_distill.yaml is stale: run `sidflow pipeline compile`"


def test_watch_component_drops_unknown_fingerprints(tiny_teacher, tmp_path):
    out = watch_teachers.python_func(teachers=tiny_teacher, registry=str(tmp_path / "r"),
                                     artifact_root=str(tmp_path / "a"))
    digest = "sha256:" + storage.manifest_digest(storage.build_manifest(tiny_teacher))
    assert [e["fingerprint"] for e in out] == [digest]
    assert json.loads(json.dumps(out)) == out  # what KFP serialises for the ParallelFor


def test_run_local_distills_each_new_teacher(tiny_teacher, tmp_path, monkeypatch):
    from sidflow.cli import main

    monkeypatch.setenv("SIDFLOW_NO_BAR", "1")
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    art = tmp_path / "art"
    assert main(["pipeline", "run-local", "--pipeline-root", str(tmp_path / "root"), "--teachers", tiny_teacher,
                 "--registry", str(tmp_path / "registry"), "--artifact-root", str(art), "--prompts", str(prompts),
                 "--set", "batch=2", "--set", "micro_batch=1", "--set", "kimg=0.002", "--set", "precision=fp32",
                 "--set", "checkpoints=false"]) == 0
    digest = "sha256:" + storage.manifest_digest(storage.build_manifest(tiny_teacher))
    teacher_dir = glob.glob(str(art / "teachers" / "*"))
    assert len(teacher_dir) == 1 and storage.read_manifest(teacher_dir[0]) is not None
    (model,) = [os.path.dirname(p) for p in glob.glob(str(art / "runs" / "*" / "*" / "model" / "manifest.json"))]
    info = json.loads(Path(model, "sidflow.json").read_text())
    assert info["teacher_fingerprint"] == digest
    assert info["config"]["teacher"] == teacher_dir[0] and info["config"]["kimg"] == 0.002


def test_run_local_refuses_unknown_parameters_in_one_line(tmp_path, capsys):
    from sidflow.cli import main

    assert main(["pipeline", "run-local", "--pipeline-root", str(tmp_path / "root"), "--teachers", "t",
                 "--registry", "r", "--artifact-root", "a", "--prompts", "p", "--set", "kappa_1=2"]) == 2
    assert capsys.readouterr().err.strip() == "sidflow pipeline: error: unknown sid-distill parameter(s): kappa_1"
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
