"""`sidflow pipeline submit|schedule`: the override parser, and the request bodies kfp.Client sends to a loopback
stand-in of the KFP v2beta1 REST API (no cluster)."""

import json
from pathlib import Path

import pytest

from sidflow.cli import main
from sidflow.kfp import submit
from sidflow.kfp.compile import DEFAULT_OUT
from tests.loopback import JsonServer

PARAMS = submit.package_parameters(DEFAULT_OUT)  # the committed IR: what a submit sends against
REQUIRED = ["teachers=hf://stable-diffusion-v1-5/stable-diffusion-v1-5@main", "registry=s3://b/registry",
            "artifact_root=s3://b/sidflow", "prompts=s3://b/prompts.txt", "eval_prompts=s3://b/eval/coco30k.parquet",
            "eval_reference=s3://b/eval/val2014.npz", "inception_weights=s3://b/weights/inception-2015-12-05.pt"]


class FakeKfp(JsonServer):
    """The v2beta1 endpoints kfp.Client calls, on 127.0.0.1; records every request as (method, path, query, body)."""

    def __init__(self, experiments=(), fail=None):
        self.experiments, self.fail = list(experiments), fail or {}
        super().__init__(self._route)

    def _route(self, method, path, query, body):
        if (method, path) in self.fail:
            return self.fail[(method, path)]
        route = {
            ("GET", "/apis/v2beta1/healthz"): lambda: {"multi_user": False},
            ("GET", "/apis/v2beta1/experiments"): lambda: {"experiments": self.experiments} if self.experiments else {},
            ("POST", "/apis/v2beta1/experiments"): lambda: {"experiment_id": "exp-new", **body},
            ("POST", "/apis/v2beta1/runs"): lambda: {"run_id": "run-42", **body},
            ("POST", "/apis/v2beta1/recurringruns"): lambda: {"recurring_run_id": "rr-7", **body},
        }.get((method, path))
        if route is None:
            return 404, {"error": f"no route {method} {path}", "code": 5}
        return 200, route()

    def bodies(self, method: str, path: str) -> list[dict]:
        return [b for m, p, _, b in self.requests if (m, p) == (method, path)]



@pytest.fixture
def kfp_api(monkeypatch, tmp_path):
    """A fresh FakeKfp; kfp's context file and KF_PIPELINES_* variables of this machine kept out."""
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "context.json"))
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                 "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(**kwargs) -> FakeKfp:
        servers.append(FakeKfp(**kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_submit_sends_typed_parameters_and_pipeline_root(kfp_api, capsys):
    api = kfp_api()
    rc = main(["pipeline", "submit", "--host", api.url, "--pipeline-root", "s3://b/kfp-root", "--run-name", "nightly",
               *REQUIRED, "tf32=false", "checkpoints=False", "lr_g=1e-5", "batch=1024", "kimg=20", "gpus=8",
               'overrides={"kappa_1": 2, "eval_limit": 100}', "distill_nodes=2",
               'gpu_node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}',
               'gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]'])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"run_id": "run-42", "experiment": "sidflow", "url": f"{api.url}/#/runs/details/run-42"}
    assert [b["display_name"] for b in api.bodies("POST", "/apis/v2beta1/experiments")] == ["sidflow"]
    (run,) = api.bodies("POST", "/apis/v2beta1/runs")
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-new"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "sid-distill"
    config = run["runtime_config"]
    assert config["pipeline_root"] == "s3://b/kfp-root"
    params = config["parameters"]
    # tf32 and checkpoints have no run parameter of their own (the run form's advanced settings): into overrides
    expected = {"lr_g": 1e-5, "batch": 1024, "kimg": 20.0, "gpus": "8",
                "overrides": {"kappa_1": 2.0, "eval_limit": 100, "tf32": False, "checkpoints": False},
                "distill_nodes": 2,
                "gpu_node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                **dict(kv.split("=", 1) for kv in REQUIRED)}
    assert params == expected
    # == cannot tell 1 from 1.0 or True: the JSON types themselves must be the declared ones.
    assert {k: type(v) for k, v in params.items()} == {k: type(v) for k, v in expected.items()}


def test_schedule_creates_an_enabled_recurring_run_without_catchup(kfp_api, capsys):
    api = kfp_api(experiments=[{"experiment_id": "exp-old", "display_name": "distills"}])
    rc = main(["pipeline", "schedule", "--host", api.url, "--experiment", "distills", "--cron", "0 0 3 * * *",
               "--name", "sid-nightly", "--pipeline-root", "s3://b/kfp-root", *REQUIRED, "resume=true",
               "adam_eps=1e-8", "seed=7"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recurring_run_id"] == "rr-7" and out["url"] == f"{api.url}/#/recurringrun/details/rr-7"
    assert api.bodies("POST", "/apis/v2beta1/experiments") == []  # the existing experiment is reused
    (job,) = api.bodies("POST", "/apis/v2beta1/recurringruns")
    assert job["display_name"] == "sid-nightly" and job["experiment_id"] == "exp-old"
    assert job["mode"] == "ENABLE"
    assert int(job["max_concurrency"]) == 1
    assert job["no_catchup"] is True
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert job["runtime_config"]["pipeline_root"] == "s3://b/kfp-root"
    params = job["runtime_config"]["parameters"]
    assert params["resume"] is True and params["seed"] == 7 and type(params["seed"]) is int
    assert params["overrides"] == {"adam_eps": 1e-8} and type(params["overrides"]["adam_eps"]) is float
    assert job["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "sid-distill"


def test_api_errors_are_one_line(kfp_api, capsys):
    api = kfp_api(fail={("POST", "/apis/v2beta1/runs"): (400, {
        "error": "Invalid input error: bad\nparameter", "message": "Invalid input error: parameter kimg is bad",
        "code": 3})})
    assert main(["pipeline", "submit", "--host", api.url, *REQUIRED]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # before it, kfp's own "Experiment details: <link>"
    assert err == (f"sidflow pipeline submit: error: KFP API at {api.url}: 400 Bad Request: "
                   "Invalid input error: parameter kimg is bad")


def test_refused_connection_is_one_line(kfp_api, capsys):
    api = kfp_api()
    api.close()  # nothing listens on that port any more
    assert main(["pipeline", "submit", "--host", api.url, *REQUIRED]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sidflow pipeline submit: error: cannot reach the KFP API at {api.url}")
    assert "\n" not in err and "Traceback" not in err


def test_bad_overrides_stop_before_any_request(kfp_api, capsys):
    api = kfp_api()
    assert main(["pipeline", "submit", "--host", api.url, *REQUIRED, "tf32=maybe"]) == 2
    assert capsys.readouterr().err.strip() == "sidflow pipeline: error: tf32='maybe' is not a boolean (true/false)"
    assert main(["pipeline", "schedule", "--host", api.url, "--cron", "0 3 * * *", *REQUIRED]) == 2
    assert "has 5 fields" in capsys.readouterr().err
    assert main(["pipeline", "submit", "--host", api.url, *REQUIRED[1:]]) == 2
    assert capsys.readouterr().err.strip() == "sidflow pipeline: error: teachers is empty: pass teachers=<URI>"
    assert main(["pipeline", "submit", "--host", api.url, *REQUIRED, "finetune=true"]) == 2
    assert "finetune_data is empty" in capsys.readouterr().err
    assert api.requests == []


@pytest.mark.parametrize("pairs, message", [
    (["batch=0"], "batch=0 and micro_batch=1 must be at least 1"),
    (["kimg=-1"], "kimg=-1.0 must be a positive finite number"),
    (["t_init=0"], "t_init=0 must satisfy"),
    (["gpus=3"], "batch=512 is not divisible by GPUs × micro_batch = 3 × 1"),  # the given GPU count, not a preset's
    (["distill_nodes=2", "gpus=8", "micro_batch=64"], "= 16 × 64"),
    (["eval_batch=0"], "eval_batch=0 must be at least 1"),  # evaluate's field batch, named as the run names it
    (['overrides={"kappa_4": 99}'], "kappa_4=99.0 is outside"),
    (["finetune=true", "finetune_data=s3://b/pairs", "finetune_steps=9"], "finetune_steps=9 must be between 1 and 8"),
    (["finetune=true", "finetune_data=s3://b/pairs", "adv_weight=-1"], "adv_weight=-1.0 must be a finite number ≥ 0"),
])
def test_values_out_of_range_stop_before_any_request(kfp_api, capsys, pairs, message):
    # the stages' own value checks, on the run's parameters: found here, not in the distill pod after the download
    api = kfp_api()
    assert main(["pipeline", "submit", "--host", api.url, *REQUIRED, *pairs]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sidflow pipeline: error: ") and message in line
    assert api.requests == []
    if pairs[0] == "finetune=true":  # a finetune value is checked only when the finetune stage runs
        assert main(["pipeline", "submit", "--dry-run", *REQUIRED, *pairs[2:]]) == 0
        capsys.readouterr()


def test_dry_run_prints_the_typed_parameters(capsys):
    assert main(["pipeline", "submit", "--dry-run", *REQUIRED, "lr_fake=2e-6", "profile=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"]["lr_fake"] == 2e-6 and out["parameters"]["overrides"] == {"profile": True}
    assert out["package"] == DEFAULT_OUT


@pytest.mark.parametrize("pair, value", [
    ("finetune=false", False), ("finetune=False", False), ("finetune=0", False), ("grad_checkpointing=true", True),
    ("resume=yes", True),
    ("lr_g=1e-5", 1e-5), ("kimg=20", 20.0), ("kappa=-1.5", -1.5), ("batch=1024", 1024), ("batch=2.0", 2),
    ("seed=1e3", 1000), ("gpus=8", "8"), ("model_name=2024", "2024"), ('model_name="2024"', "2024"),
    ("model_name=null", "null"), ("registry=s3://b/k=v", "s3://b/k=v"), ("prompts=", ""),
    ('gpu_node_selector={"a": "b"}', {"a": "b"}), ("gpu_tolerations=[]", []), ("guidance=anti_cfg", "anti_cfg"),
])
def test_parser_types_values_as_the_pipeline_declares(pair, value):
    (parsed,) = submit.parse_overrides([pair], PARAMS).values()
    assert parsed == value and type(parsed) is type(value)


def test_a_setting_without_a_run_parameter_goes_into_overrides_typed():
    parsed = submit.parse_overrides(["tf32=false", 'overrides={"kappa_4": 3}', "norms=autocast", "eval_batch=8",
                                     "kimg=20"], PARAMS)
    assert parsed == {"kimg": 20.0, "overrides": {"kappa_4": 3.0, "tf32": False, "norms": "autocast", "eval_batch": 8}}
    assert type(parsed["overrides"]["tf32"]) is bool and "tf32" not in PARAMS and "kimg" in PARAMS


@pytest.mark.parametrize("pairs, message", [
    (["kapa=2"], "unknown sid-distill parameter(s): kapa (did you mean kappa?)"),
    (["bogus=1", "other=2"], "unknown sid-distill parameter(s): bogus, other"),
    (["tf32"], "'tf32' is not key=value"),
    (["=1"], "'=1' is not key=value"),
    (["tf32=maybe"], "tf32='maybe' is not a boolean (true/false)"),
    (["batch=2.5"], "batch='2.5' is not an integer"),
    (["batch=many"], "batch='many' is not a valid int"),
    (["lr_g=fast"], "lr_g='fast' is not a valid float"),
    (["lr_g=nan"], "lr_g='nan' is not a finite number"),
    (["kimg=inf"], "kimg='inf' is not a finite number"),
    (["gpu_node_selector=[1]"], "gpu_node_selector='[1]' is not a JSON object"),
    (["gpu_tolerations={bad"], "gpu_tolerations='{bad' is not a JSON array"),
    (["guidance=lgs"], "guidance='lgs' is not one of ['lsg', 'long', 'short', 'zero_cfg', 'anti_cfg']"),
    (["seed=1", "seed=2"], "seed is given twice"),
    (["norms=fp32", "norms=autocast"], "norms is given twice"),
    (["norms=bf16"], "norms='bf16' is not one of ['fp32', 'autocast']"),
    (["t_init=1", 'overrides={"t_init": 2}'], "t_init is given twice: as t_init=... and in overrides"),
    (["gpus=all"], "gpus='all' must be a count or auto here: the pod requests that many GPUs"),
    (["gpus=0"], "gpus='0' must be a count or auto here: the pod requests that many GPUs"),
    (["eval_gpus=all"], "eval_gpus='all' must be a count or auto here: the pod requests that many GPUs"),
    (["sharding=zero3"], "sharding='zero3' is not one of ['ddp', 'fsdp', 'auto']"),
])
def test_parser_errors_are_one_line(pairs, message):
    with pytest.raises(ValueError) as e:
        submit.parse_overrides(pairs, PARAMS)
    assert str(e.value) == message


@pytest.mark.parametrize("cron, ok", [
    ("0 0 3 * * *", True), ("0 */30 * * * 1-5", True), ("@daily", True), ("@every 24h", True),
    ("0 3 * * *", False), ("0 0 0 3 * * *", False), ("daily", False)])
def test_cron_must_have_six_fields(cron, ok):
    if ok:
        submit.check_cron(cron)
    else:
        with pytest.raises(ValueError, match="6 fields"):
            submit.check_cron(cron)


def test_parameters_come_from_the_compiled_package():
    assert PARAMS["resume"] == (bool, True) and PARAMS["batch"][0] is int and PARAMS["lr_g"] == (float, 1e-6)
    assert PARAMS["gpu_node_selector"] == (dict, {}) and PARAMS["gpu_tolerations"] == (list, [])
    assert PARAMS["gpus"] == (str, "auto")  # the teacher type's preset (sidflow.sizing)


def test_readme_pipeline_examples_are_complete_runs(capsys):
    # Every `sidflow pipeline submit|schedule` in README.md passes the same checks a real submit makes (required
    # inputs, evaluate's included), so a user can copy it.
    import shlex

    from sidflow.cli import main

    lines = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    examples = []
    for i, line in enumerate(lines):
        if line.startswith(("sidflow pipeline submit", "sidflow pipeline schedule")):
            command = line
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            examples.append(shlex.split(command))
    assert len(examples) >= 3
    for argv in examples:
        assert main([*argv[1:], "--dry-run"]) == 0, " ".join(argv)
        capsys.readouterr()


def test_submit_with_an_image_registry_compiles_a_package_naming_it(capsys):
    from sidflow.cli import main

    assert main(["pipeline", "submit", *REQUIRED, "--image-registry", "registry.example.com/ml", "--dry-run"]) == 0
    package = json.loads(capsys.readouterr().out)["package"]
    text = Path(package).read_text()
    assert "registry.example.com/ml/sidflow-trainer:0.1.0" in text and "ghcr.io/example" not in text
    assert main(["pipeline", "submit", *REQUIRED, "--image-registry", "Not A Registry", "--dry-run"]) == 2
    assert "is not a registry path" in capsys.readouterr().err
