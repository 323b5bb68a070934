"""Multi-node distill: the TrainJob manifest against Kubeflow Trainer's own CRD schema, its command against the real
`sidflow distill` and torchrun parsers, and create/poll/adopt against a loopback stand-in of the Kubernetes API."""

import argparse
import copy
import dataclasses
import json
import re
import shlex
import types
from pathlib import Path

import jsonschema
import pytest
import yaml

from sidflow import config, storage, trainjob
from sidflow.stages.distill import DistillConfig
from tests.loopback import JsonServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "distill-trainjob.yaml"
# Kubeflow Trainer v2.3.0's CRD schema (see its $comment); CEL rules are not evaluated, so names are checked below.
SCHEMA = json.loads((Path(__file__).parent / "data" / "trainjob_v1alpha1.schema.json").read_text())
CFG = DistillConfig(teacher="s3://b/teachers/sd15", prompts="s3://b/prompts.txt", output="s3://b/runs/r1/t1",
                    gpus="8", micro_batch=4, guidance="anti_cfg", kappa=-1.5, kappa_4=1.0, clip_grad_value=1.0)
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PLACEMENT = trainjob.PlacementConfig(distill_nodes=2, gpu_node_selector={"nvidia.com/gpu.product": "H100"},
                                     gpu_tolerations=[TOLERATION])


def _strict(schema):
    """The schema with unknown fields refused (as `kubectl create --validate=strict` does), not silently pruned."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and \
                not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


VALIDATOR = jsonschema.Draft4Validator(_strict(SCHEMA))


def _check_object(job: dict) -> None:
    VALIDATOR.validate(job)
    name = job["metadata"]["name"]  # the CRD's CEL rules: an RFC 1035 label of at most 63 characters
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


def _pod_patch(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == trainjob.NODE
    return node["template"]["spec"]["template"]["spec"]


def test_two_nodes_of_eight_gpus():
    job = trainjob.manifest(CFG, PLACEMENT, "registry.example/sidflow-trainer:9")
    _check_object(job)
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    t = spec["trainer"]
    assert t["image"] == "registry.example/sidflow-trainer:9"
    assert (t["numNodes"], t["numProcPerNode"]) == (2, 8)
    assert spec["activeDeadlineSeconds"] == trainjob.TIMEOUT_S  # Failed (DeadlineExceeded) after 7 days, not never
    assert t["resourcesPerNode"]["limits"] == t["resourcesPerNode"]["requests"] == {
        "cpu": "64", "memory": "512G", "nvidia.com/gpu": "8"}
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in t["env"]} == {
        k: {"name": "sidflow-s3", "key": k, "optional": True} for k in trainjob.S3_KEYS}  # none with workload identity
    assert not any(e["name"].startswith("PET_") for e in t["env"])  # reserved: Trainer's webhook refuses them
    pod = _pod_patch(job)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"} and pod["tolerations"] == [TOLERATION]
    import dataclasses

    mig = trainjob.manifest(CFG, dataclasses.replace(PLACEMENT, gpu_resource="nvidia.com/mig-3g.40gb"), "img")
    assert mig["spec"]["trainer"]["resourcesPerNode"]["limits"] == {  # a MIG profile (or amd.com/gpu) instead
        "cpu": "64", "memory": "512G", "nvidia.com/mig-3g.40gb": "8"}
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


def test_each_node_gets_the_cpu_and_memory_the_run_sized_for_its_teacher():
    import dataclasses

    from sidflow import sizing

    # The pipeline resolves distill_cpu / distill_memory per teacher (size_teacher); an SDXL teacher's nodes get
    # SDXL's 96G per GPU, not the 64G of SD1.5 (the manifest once ignored both and gave every node 64G per GPU).
    sized = sizing.resolve("sdxl", "8", "auto", "auto", "auto", "auto")
    job = trainjob.manifest(CFG, dataclasses.replace(PLACEMENT, distill_cpu=sized["distill_cpu"],
                                                     distill_memory=sized["distill_memory"]), "img")
    assert job["spec"]["trainer"]["resourcesPerNode"]["requests"] == {"cpu": "64", "memory": "768G",
                                                                      "nvidia.com/gpu": "8"}
    assert PLACEMENT.distill_cpu == PLACEMENT.distill_memory == "auto"  # by hand: 8 CPU and 64G per GPU (above)
    # "auto" itself takes the preset of the type the caller names, from the same table as the pipeline
    auto = trainjob.manifest(CFG, PLACEMENT, "img", kind="sdxl")["spec"]["trainer"]["resourcesPerNode"]["requests"]
    assert auto == job["spec"]["trainer"]["resourcesPerNode"]["requests"]


def test_a_manifest_by_hand_is_sized_by_its_teachers_type(tmp_path, capsys):
    from sidflow.cli import main
    from sidflow.toy.tiny import build_sd, tiny_sdxl_configs

    sdxl = build_sd(tmp_path / "sdxl", tiny_sdxl_configs(), seed=0)
    capsys.readouterr()  # the build's progress bars
    argv = ["distill-trainjob", "--distill-nodes", "2", "--gpus", "8", "--prompts", "s3://b/p.txt",
            "--output", "s3://b/runs/r1"]

    def requests(teacher: str) -> tuple[dict, str]:
        assert main([*argv, "--teacher", teacher]) == 0
        out = capsys.readouterr()
        return yaml.safe_load(out.out)["spec"]["trainer"]["resourcesPerNode"]["requests"], out.err

    assert requests(sdxl) == ({"cpu": "64", "memory": "768G", "nvidia.com/gpu": "8"}, "")  # SDXL's 96G per GPU
    # a teacher this machine cannot read (a hub id here) is sized as SD1.5, and the command says so on one line
    sized, err = requests("stabilityai/stable-diffusion-xl-base-1.0")
    assert sized == {"cpu": "64", "memory": "512G", "nvidia.com/gpu": "8"}
    (note,) = err.splitlines()
    assert "sd15 preset" in note and "--distill-memory" in note
    # given values are taken as they are, and nothing is read
    assert main([*argv, "--teacher", "nowhere", "--distill-cpu", "12", "--distill-memory", "100G"]) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out)["spec"]["trainer"]["resourcesPerNode"]["requests"]["memory"] == "100G"
    assert out.err == ""


def test_the_command_carries_the_config_through_the_real_parsers(monkeypatch):
    cmd = trainjob.manifest(CFG, PLACEMENT, "img")["spec"]["trainer"]["command"]
    # torchrun, with the rendezvous Trainer's torch plugin injects as PET_* variables (read when the parser is built)
    for name, value in {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
                        "PET_MASTER_ADDR": "sid-distill-x-node-0-0.sid-distill-x", "PET_MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(name, value)
    from torch.distributed.run import get_args_parser

    run = get_args_parser().parse_args(cmd[1:])
    assert cmd[0] == "torchrun" and run.module and run.training_script == "sidflow.cli"
    assert (run.nnodes, run.nproc_per_node, run.node_rank) == ("2", "8", 1)
    assert run.master_addr == "sid-distill-x-node-0-0.sid-distill-x"
    # then `sidflow distill`: its flags give back exactly CFG (None fields left out, so they stay None)
    assert run.training_script_args[0] == "distill"
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, DistillConfig)
    assert config.from_args(DistillConfig, parser.parse_args(run.training_script_args[1:])) == CFG


def test_no_placement_no_scheduling_fields():
    pod = _pod_patch(trainjob.manifest(CFG, trainjob.PlacementConfig(distill_nodes=4), "img"))
    assert "nodeSelector" not in pod and "tolerations" not in pod


@pytest.mark.parametrize("changes, placement, match", [
    (dict(gpus="all"), {}, r"gpus='all' must be a GPU count per node"),
    (dict(gpus="0"), {}, r"gpus='0' must be a GPU count per node"),
    (dict(micro_batch=3), {}, r"batch=512 is not divisible by nodes × GPUs × micro_batch = 2 × 8 × 3"),
    (dict(output=""), {}, r"output is empty"),
    ({}, dict(distill_nodes=0), r"distill_nodes=0 must be at least 1"),
    ({}, dict(gpu_node_selector={"gpu": 1}), r"gpu_node_selector=\{'gpu': 1\} must map label names to label values"),
    ({}, dict(gpu_tolerations=[{"key": "a", "operator": "Maybe"}]), r"gpu_tolerations item .* is not a toleration"),
    ({}, dict(gpu_tolerations=[{"key": "a", "toleration_seconds": 5}]), r"is not a toleration"),
    ({}, dict(gpu_tolerations={"key": "a"}), r"must be a list of tolerations"),
])
def test_user_errors_are_one_line(changes, placement, match):
    cfg = config.override(CFG, changes)
    with pytest.raises(ValueError, match=match) as e:
        trainjob.manifest(cfg, trainjob.PlacementConfig(**{"distill_nodes": 2, **placement}), "img")
    assert "\n" not in str(e.value)


def test_schema_refuses_what_trainer_would():
    good = trainjob.manifest(CFG, PLACEMENT, "img")
    for path, value in [(("spec", "trainer", "numProcPerNode"), "auto"),  # Trainer v2.1's IntOrString
                        (("spec", "podTemplateOverrides"), []),  # Trainer v2.1's name for runtimePatches
                        (("spec", "trainer", "nodes"), 2), (("spec", "runtimeRef", "name"), None)]:
        bad = copy.deepcopy(good)
        leaf = bad
        for key in path[:-1]:
            leaf = leaf[key]
        leaf[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(bad)


def test_job_name_is_stable_per_run_uri():
    a, b = trainjob.job_name("s3://b/runs/r1/t1"), trainjob.job_name("s3://b/runs/r1/t2")
    assert a == trainjob.job_name("s3://b/runs/r1/t1") and a != b
    assert re.fullmatch(r"sid-distill-[0-9a-f]{12}", a)


def test_example_is_what_its_command_prints(capsys):
    from sidflow.cli import main

    header = [line[1:].strip() for line in EXAMPLE.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.startswith("sidflow distill-trainjob"))
    command = ""
    for line in header[start:]:
        command += " " + line.rstrip("\\")
        if not line.endswith("\\"):
            break
    argv = shlex.split(command)
    assert main(argv[1:]) == 0
    (doc,) = yaml.safe_load_all(EXAMPLE.read_text())
    assert yaml.safe_load(capsys.readouterr().out) == doc, "regenerate manifests/examples/distill-trainjob.yaml"
    _check_object(doc)
    assert (doc["spec"]["trainer"]["numNodes"], doc["spec"]["trainer"]["numProcPerNode"]) == (2, 8)
    assert doc["spec"]["trainer"]["command"][3:5] == ["distill", "--teacher"]
    assert doc["metadata"]["name"] in EXAMPLE.read_text().split("apiVersion:")[0]  # the header's kubectl line


def test_trainer_image_is_the_distill_components():
    from sidflow.kfp.components.distill import BASE_IMAGE

    assert trainjob.TRAINER_IMAGE == BASE_IMAGE


def test_per_gpu_share_is_the_single_pods():
    from sidflow.kfp import sid_distill as p
    from sidflow.sizing import PRESETS

    sd15 = PRESETS["sd15"]  # a one-pod distill's default is one GPU's share of the SD1.5 preset
    assert (str(sd15.cpu_per_gpu), f"{sd15.memory_g_per_gpu}G", f"{trainjob.SHM_GI_PER_GPU}Gi") == (
        p.DISTILL_CPU, p.DISTILL_MEMORY, p.DISTILL_SHM)


def test_rbac_grants_exactly_what_run_calls():
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests" / "base" / "rbac-trainjobs.yaml").read_text()) if d]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    verbs = {v for r in role["rules"] if r["apiGroups"] == [trainjob.GROUP] and r["resources"] == [trainjob.PLURAL]
             for v in r["verbs"]}
    assert verbs == set(trainjob.RBAC_VERBS)


# Create, poll, adopt: a loopback stand-in of the Kubernetes API serving trainjobs. ---------------------------------


class FakeKube(JsonServer):
    """trainjobs of one namespace on 127.0.0.1; a job turns `outcome` after `polls` GETs; records every request."""

    VERB = {"POST": "create", "GET": "get", "DELETE": "delete"}

    def __init__(self, outcome="Complete", polls=2, existing=None, on_finish=None, flaky=0):
        self.jobs, self.gets = {}, 0
        self.outcome, self.polls, self.on_finish, self.flaky = outcome, polls, on_finish, flaky
        if existing is not None:
            self.jobs[existing["metadata"]["name"]] = existing
        super().__init__(self._route)

    def _route(self, method, path, query, body):
        m = re.fullmatch(r"/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?", path)
        if m is None or m.group(1) != "ml":
            return 404, {"kind": "Status", "code": 404}
        name = m.group(2)
        if method == "POST":
            if body["metadata"]["name"] in self.jobs:
                return 409, {"kind": "Status", "reason": "AlreadyExists", "code": 409}
            self.jobs[body["metadata"]["name"]] = copy.deepcopy(body)
            return 201, body
        if name not in self.jobs:
            return 404, {"kind": "Status", "reason": "NotFound", "code": 404}
        if method == "DELETE":
            del self.jobs[name]
            return 200, {"kind": "Status", "status": "Success"}
        if self.flaky:
            self.flaky -= 1
            return 503, {"kind": "Status", "code": 503}
        self.gets += 1
        job = self.jobs[name]
        if self.gets >= self.polls and "status" not in job:
            if self.on_finish:
                self.on_finish(job)
            job["status"] = {"conditions": [
                {"type": "Created", "status": "True", "reason": "JobsCreated", "message": ""},
                {"type": self.outcome, "status": "True", "reason": "BackoffLimitExceeded" if
                 self.outcome == "Failed" else "JobsCompleted", "message": "jobset node failed"}]}
        return 200, job

    def api(self):
        from kubernetes import client

        c = client.Configuration()
        c.host = self.url
        return client.CustomObjectsApi(client.ApiClient(c))

    def calls(self) -> list[str]:
        return [f"{m} {'/'.join(p.split('/')[7:]) or 'trainjobs'}" for m, p, _, _ in self.requests]


@pytest.fixture
def kube(monkeypatch):
    # Poll without waiting; the clock stands still unless a test moves it.
    monkeypatch.setattr(trainjob, "time", types.SimpleNamespace(sleep=lambda s: None, monotonic=lambda: 0.0))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    fakes = []

    def start(**kwargs):
        fakes.append(FakeKube(**kwargs))
        return fakes[-1]

    yield start
    for f in fakes:
        f.close()


def test_run_creates_the_job_and_waits_until_complete(kube):
    job = trainjob.manifest(CFG, PLACEMENT, "img")
    fake = kube(polls=3)
    final = trainjob.run(job, namespace="ml", api=fake.api())
    assert trainjob.condition(final)[0] == "Complete"
    name = job["metadata"]["name"]
    assert fake.calls() == ["POST trainjobs", f"GET {name}", f"GET {name}", f"GET {name}"]
    assert fake.requests[0][3] == job  # the manifest, as built
    assert {FakeKube.VERB[m] for m, *_ in fake.requests} <= set(trainjob.RBAC_VERBS)


def test_a_failed_job_is_a_one_line_error(kube):
    job = trainjob.manifest(CFG, PLACEMENT, "img")
    fake = kube(outcome="Failed", polls=1)
    with pytest.raises(RuntimeError) as e:
        trainjob.run(job, namespace="ml", api=fake.api())
    assert str(e.value) == f"TrainJob ml/{job['metadata']['name']} failed: BackoffLimitExceeded: jobset node failed"


def test_a_retry_replaces_a_failed_job_and_adopts_a_running_one(kube):
    job = trainjob.manifest(CFG, PLACEMENT, "img")
    name = job["metadata"]["name"]
    failed = {**copy.deepcopy(job), "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    fake = kube(existing=failed, polls=3)
    trainjob.run(job, namespace="ml", api=fake.api())
    assert fake.calls() == ["POST trainjobs", f"GET {name}", f"DELETE {name}", f"GET {name}", "POST trainjobs",
                            f"GET {name}", f"GET {name}"]
    assert fake.requests[2][2] == {"propagationPolicy": ["Foreground"]}  # old pods go before new ones start
    assert {FakeKube.VERB[m] for m, *_ in fake.requests} == set(trainjob.RBAC_VERBS)

    running = kube(existing=copy.deepcopy(job), polls=2)
    trainjob.run(job, namespace="ml", api=running.api())
    assert running.calls() == ["POST trainjobs", f"GET {name}", f"GET {name}"]  # adopted: no delete, no second POST


def test_a_job_past_its_deadline_is_deleted(kube, monkeypatch):
    job = trainjob.manifest(CFG, PLACEMENT, "img")
    name = job["metadata"]["name"]
    clock = iter(range(0, 10**6, 1000))
    monkeypatch.setattr(trainjob, "time", types.SimpleNamespace(sleep=lambda s: None, monotonic=lambda: next(clock)))
    fake = kube(polls=100)
    with pytest.raises(TimeoutError, match=f"TrainJob ml/{name} was not Complete after 2500 s: deleted it"):
        trainjob.run(job, namespace="ml", api=fake.api(), timeout_seconds=2500)
    assert fake.calls()[-1] == f"DELETE {name}"


def test_a_stopped_run_deletes_its_job(kube, monkeypatch):
    # Argo stops the task of a terminated run with SIGTERM; the TrainJob must not outlive it.
    import os
    import signal

    job = trainjob.manifest(CFG, PLACEMENT, "img")
    name = job["metadata"]["name"]
    monkeypatch.setattr(trainjob, "time", types.SimpleNamespace(sleep=lambda s: os.kill(os.getpid(), signal.SIGTERM),
                                                                monotonic=lambda: 0.0))
    fake = kube(polls=100)
    with pytest.raises(RuntimeError, match=f"stopped: deleted TrainJob ml/{name}"):
        trainjob.run(job, namespace="ml", api=fake.api())
    assert fake.calls() == ["POST trainjobs", f"GET {name}", f"DELETE {name}"]
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_transient_api_errors_are_retried(kube):
    job = trainjob.manifest(CFG, PLACEMENT, "img")
    fake = kube(polls=1, flaky=2)
    trainjob.run(job, namespace="ml", api=fake.api())
    assert [m for m, *_ in fake.requests] == ["POST", "GET", "GET", "GET"]


def test_component_runs_the_job_and_returns_the_model(kube, tiny_teacher, tmp_path, monkeypatch):
    """distill_trainjob's own body, with the kubeconfig pointing at the fake API and a local run URI. It validates
    the run once, for every rank (they skip it: SIDFLOW_CHECKED), and a bad input stops it before any job."""
    from kfp import dsl

    from sidflow.kfp.components.distill_trainjob import distill_trainjob

    output = str(tmp_path / "run")

    def train(job):  # what the pods would leave behind: an exported model with its sidflow.json
        cmd = job["spec"]["trainer"]["command"]
        assert cmd[cmd.index("--output") + 1] == output and "--kappa-1" not in cmd and "--clip-grad-value" not in cmd
        src = tmp_path / "model-src"
        src.mkdir()
        (src / "sidflow.json").write_text(json.dumps({"nimg": 2048, "metrics": {"iteration": 4, "loss_g": 0.5}}))
        (src / "README.md").write_text("# card\n")
        storage.publish_dir(str(src), storage.join(output, "model"))

    fake = kube(on_finish=train)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "me", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": "ml"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    card = dsl.Model(uri=str(tmp_path / "card"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    args = dict(metrics=metrics, model=card, trainer_image="img", distill_nodes=2, gpu_tolerations=[TOLERATION],
                teacher=tiny_teacher, prompts=str(prompts), output=output, gpus="8")
    with pytest.raises(ValueError, match="kappa_1=-1.0 is outside"):
        distill_trainjob.python_func(**{**args, "kappa": -1.0})
    assert not fake.jobs
    model = distill_trainjob.python_func(**args)
    assert model == storage.join(output, "model")
    assert metrics.metadata == {"kimg": 2.048, "iterations": 4.0, "loss_g": 0.5}  # named as the one-pod distill's
    assert card.metadata["uri"] == model and card.metadata["kimg"] == 2.048
    assert Path(card.path).read_text() == "# card\n"
    (created,) = fake.jobs.values()
    assert created["spec"]["trainer"]["numNodes"] == 2 and _pod_patch(created)["tolerations"] == [TOLERATION]
    assert {"name": "SIDFLOW_CHECKED", "value": "1"} in created["spec"]["trainer"]["env"]


def test_finetune_runs_as_a_trainjob_of_its_own(tmp_path):
    """The pipeline's finetune on several nodes: the same TrainJob, running `sidflow finetune`, validated once by the
    task (a bad input stops it before any job)."""
    from sidflow.kfp import tasks
    from sidflow.stages.finetune import FinetuneConfig

    cfg = FinetuneConfig(teacher="s3://b/t", prompts="s3://b/p.txt", output="s3://b/run/finetune", init="s3://b/run",
                         data="s3://b/pairs", gpus="8", micro_batch=4)
    job = trainjob.manifest(cfg, PLACEMENT, "img", checked=True, stage="finetune")
    cmd = job["spec"]["trainer"]["command"]
    assert cmd[:4] == ["torchrun", "--module", "sidflow.cli", "finetune"]
    assert cmd[cmd.index("--init") + 1] == "s3://b/run" and cmd[cmd.index("--data") + 1] == "s3://b/pairs"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "finetune"
    assert job["metadata"]["name"] != trainjob.job_name("s3://b/run")  # not the distill job of the same run
    assert {"name": "SIDFLOW_CHECKED", "value": "1"} in job["spec"]["trainer"]["env"]
    _check_object(job)
    placement = {f.name: getattr(PLACEMENT, f.name) for f in dataclasses.fields(trainjob.PlacementConfig)}
    with pytest.raises(ValueError, match="data is empty"):
        tasks.finetune_trainjob(None, None, "img", str(tmp_path), "run-1", "fp", 0, {}, **{
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "data"}, **placement, "data": ""})


def test_run_local_takes_the_trainjob_branch_for_several_nodes(kube, tiny_teacher, tmp_path, monkeypatch):
    """The whole pipeline under kfp.local with distill_nodes=2: the TrainJob task, not the one-pod distill, runs."""
    from sidflow.cli import main
    from sidflow.demo import TOY_TEACHER
    from sidflow.generator import export_generator
    from sidflow.teacher import load_teacher
    from sidflow.toy.metrics import toy_eval_set

    def train(job):  # what the pods would leave behind: an exported generator (the toy teacher's UNet as is)
        cmd = job["spec"]["trainer"]["command"]
        toy = load_teacher(str(TOY_TEACHER))
        export_generator(toy.unet, toy, storage.join(cmd[cmd.index("--output") + 1], "model"), {
            "teacher": tiny_teacher, "teacher_fingerprint": "sha256:fake", "nimg": 512, "weights": "raw", "steps": 1,
            "config": {"t_init": 625, "steps": 1}, "metrics": {"iteration": 1}})

    fake = kube(polls=1, on_finish=train)  # complete at the first poll: the executor subprocess never sleeps
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}], "users": [{"name": "me", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": "ml"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    art = tmp_path / "art"
    evaluator = str(TOY_TEACHER / "evaluator")
    eval_set = toy_eval_set(str(tmp_path / "eval"), evaluator, n=4, reference_images=32)
    assert main(["pipeline", "run-local", "--pipeline-root", str(tmp_path / "root"), "--teachers", tiny_teacher,
                 "--registry", str(tmp_path / "registry"), "--artifact-root", str(art), "--prompts", str(prompts),
                 "--set", "distill_nodes=2", "--set", "gpus=8", "--set", 'overrides={"kappa_4": 2.5}',
                 "--set", 'gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}]',
                 "--set", f"eval_prompts={eval_set['prompts']}", "--set", f"eval_reference={eval_set['reference']}",
                 "--set", "eval_protocol=native", "--set", f"eval_features=toy:{evaluator}",
                 "--set", f"eval_scorer=toy:{evaluator}"]) == 0
    (job,) = fake.jobs.values()
    assert (job["spec"]["trainer"]["numNodes"], job["spec"]["trainer"]["numProcPerNode"]) == (2, 8)
    assert _pod_patch(job)["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    cmd = job["spec"]["trainer"]["command"]
    assert cmd[cmd.index("--kappa-4") + 1] == "2.5" and "--kappa-1" not in cmd  # set vs "unset" κ
    assert cmd[cmd.index("--teacher") + 1].startswith(str(art / "teachers"))  # the downloaded copy
    ran = {p.parent.name for p in (tmp_path / "root").rglob("executor_output.json")}
    assert ran == {"watch-teachers", "download-teacher", "size-teacher", "distill-trainjob", "keep-model", "evaluate",
                   "passes-gate",
                   "register", "report"}  # no one-pod distill, no finetune; evaluate took the TrainJob model


@pytest.mark.parametrize("key, text, expected", [
    ("gpu_node_selector", '{"pool": "gpu"}', {"pool": "gpu"}), ("gpu_tolerations", "[]", []),
    ("distill_nodes", "4", 4)])
def test_placement_flags_parse_json(key, text, expected):
    assert getattr(config.override(trainjob.PlacementConfig(), {key: text}), key) == expected


@pytest.mark.parametrize("key, text, match", [
    ("gpu_node_selector", "[1]", r"gpu_node_selector='\[1\]' is not a JSON object"),
    ("gpu_tolerations", "{", r"gpu_tolerations='\{' is not a JSON array")])
def test_placement_flags_refuse_bad_json(key, text, match):
    with pytest.raises(ValueError, match=match):
        config.override(trainjob.PlacementConfig(), {key: text})
