"""The registry on the platform's servers: a real MLflow tracking server (sqlite store) started on loopback, and
the Kubeflow Model Registry's REST API as its OpenAPI document specifies it (tests/kubeflow_mr_stub.py, v0.3.8).

Each test runs on both. The concurrency test registers and promotes from 8 threads at once and checks the promise
of sidflow.registry: 8 distinct versions, one champion, and it is the best FID among those that passed the gate;
the champion the server shows (MLflow alias, Kubeflow property) is that one too, read back over plain REST.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from sidflow import registry, storage
from sidflow.cli import main
from sidflow.stages.register import RegisterConfig, RegisterResult, run
from sidflow.stages.watch_teachers import WatchTeachersConfig
from sidflow.stages.watch_teachers import run as watch
from sidflow.teacher import INFO_FILE
from tests import kubeflow_mr_stub
from tests.test_registry import CARD, INFO, THREADS, on_threads


def _mlflow_binary() -> str | None:
    # SIDFLOW_TEST_MLFLOW: an mlflow CLI from another environment, where this one cannot take mlflow's pins.
    return os.environ.get("SIDFLOW_TEST_MLFLOW") or shutil.which("mlflow") or \
        (str(Path(sys.executable).parent / "mlflow") if (Path(sys.executable).parent / "mlflow").exists() else None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """http://127.0.0.1:<port> of an `mlflow server` with a sqlite backend store, for the whole session."""
    binary = _mlflow_binary()
    if binary is None:
        pytest.skip("no mlflow CLI: pip install '.[test]' (or set SIDFLOW_TEST_MLFLOW to one)")
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([binary, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)  # its own session: the server and the workers it forked
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@pytest.fixture
def kubeflow_stub():
    server, state = kubeflow_mr_stub.serve()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()


@pytest.fixture(params=["mlflow", "kubeflow-mr"])
def server(request):
    """(registry URI, a fresh model name, reader of the champion version the server's UI shows)."""
    name = f"gen-{uuid.uuid4().hex[:8]}"
    if request.param == "mlflow":
        base = request.getfixturevalue("mlflow_server")
        return f"mlflow+{base}", name, lambda: _mlflow_alias(base, name)
    base, _ = request.getfixturevalue("kubeflow_stub")
    return f"kubeflow-mr+{base}", name, lambda: _kubeflow_property(base, name)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _mlflow_alias(base: str, name: str) -> int | None:
    # The registered model's aliases (MLflow keys an alias by (model, alias): one version holds it at most).
    aliases = _get(f"{base}/api/2.0/mlflow/registered-models/get?name={name}")["registered_model"].get("aliases", [])
    holders = [int(a["version"]) for a in aliases if a["alias"] == "champion"]
    assert len(holders) <= 1, holders
    return holders[0] if holders else None


def _kubeflow_property(base: str, name: str) -> int | None:
    model = _get(f"{base}{kubeflow_mr_stub.BASE}/registered_model?name={name}")
    held = model.get("customProperties", {}).get("champion")
    return int(held["string_value"]) if held else None


def test_register_and_read_back(server):
    uri, name, _ = server
    v = registry.register(uri, name, "s3://bucket/run-1/model", {"fid": 12.5, "clip": 0.31, "n": 1000}, "fp-a",
                          "run-1", model_card=CARD, config={"lr": 1e-5})
    assert v.version == 1
    assert registry.get(uri, name, 1) == v
    assert (v.model_uri, v.metrics, v.teacher_fingerprint, v.run_id, v.model_card, v.config) == \
        ("s3://bucket/run-1/model", {"fid": 12.5, "clip": 0.31, "n": 1000}, "fp-a", "run-1", CARD, {"lr": 1e-5})
    registry.register(uri, name, "s3://bucket/run-2/model", {"fid": 11.0, "clip": 0.3}, "fp-b", "run-2")
    assert [x.version for x in registry.list_versions(uri, name)] == [1, 2]
    assert registry.fingerprints(uri, name) == {"fp-a", "fp-b"}
    assert registry.champion(uri, name) is None
    with pytest.raises(FileNotFoundError, match="no version 3"):
        registry.get(uri, name, 3)
    if uri.startswith("mlflow"):  # the server takes no local source outside its runs: refused before any write
        with pytest.raises(ValueError, match="remote model URI"):
            registry.register(uri, name + "-local", "/tmp/model", {"fid": 1.0}, "fp", "r")
        assert registry.list_versions(uri, name + "-local") == []
        long = registry.register(uri, name, "s3://b/long", {"fid": 1.0}, "fp", "r", model_card="x" * 6000,
                                 config={"k": "y" * 6000})
        assert len(long.model_card) == 5000 and long.model_card.endswith("README.md of the model]")
        assert long.config is None  # a config over MLflow's 5000 characters is left out, not cut into bad JSON


def test_promotion_gate(server):
    uri, name, shown = server
    first = registry.register(uri, name, "s3://b/1", {"fid": 20.0, "clip": 0.3}, "fp", "r1")
    assert registry.promote(uri, name, first.version, require_better=True)
    worse = registry.register(uri, name, "s3://b/2", {"fid": 25.0, "clip": 0.3}, "fp", "r2")
    assert not registry.promote(uri, name, worse.version, require_better=True)  # gate refusal
    blurry = registry.register(uri, name, "s3://b/3", {"fid": 5.0, "clip": 0.1}, "fp", "r3")
    assert not registry.promote(uri, name, blurry.version, require_better=True, clip_floor=0.2)
    assert registry.champion(uri, name).version == first.version == shown()
    assert registry.promote(uri, name, worse.version)  # unconditional, as `sidflow registry promote` does
    assert registry.champion(uri, name).version == worse.version == shown()
    assert registry.promote(uri, name, blurry.version, require_better=True)  # no floor: the lowest FID wins
    assert registry.champion(uri, name).version == blurry.version == shown()


def test_concurrent_registrations_crown_one_champion(server):
    uri, name, shown = server
    rng = random.Random(23)
    fids = [round(rng.uniform(5.0, 50.0), 3) for _ in range(THREADS)]
    clips = [0.1 if i % 3 == 0 else 0.3 for i in range(THREADS)]  # every third one fails the CLIP floor

    def one(i):
        v = registry.register(uri, name, f"s3://b/run-{i}", {"fid": fids[i], "clip": clips[i]}, f"fp-{i}", f"r{i}")
        return v.version, registry.promote(uri, name, v.version, require_better=True, clip_floor=0.2)

    results = on_threads(one)
    versions = sorted(v for v, _ in results)
    assert versions == list(range(1, THREADS + 1))  # 8 distinct numbers, none lost
    by_run = {v.run_id: v for v in registry.list_versions(uri, name)}
    assert sorted(by_run) == sorted(f"r{i}" for i in range(THREADS))
    best = min((i for i in range(THREADS) if clips[i] >= 0.2), key=lambda i: fids[i])
    assert registry.champion(uri, name).run_id == f"r{best}"
    assert shown() == by_run[f"r{best}"].version
    assert any(promoted for v, promoted in results if v == by_run[f"r{best}"].version)
    assert not any(promoted for i, (v, promoted) in enumerate(results) if clips[i] < 0.2)


def test_stage_registers_on_the_server(server, s3_bucket, tmp_path):
    uri, name, shown = server
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text(CARD)
    (src / "sidflow.json").write_text(json.dumps(INFO))
    model = f"{s3_bucket}/runs/{name}/model"  # MLflow takes only a remote source
    storage.publish_dir(str(src), model)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"fid": 20.0, "clip": 0.3}))
    cfg = RegisterConfig(registry=uri, model_name=name, model=model, metrics=str(metrics), run_id="run-1")
    assert run(cfg) == RegisterResult(version=1, promoted=True, champion_version=1)
    assert shown() == 1
    v = registry.get(uri, name, 1)
    assert (v.model_uri, v.model_card, v.teacher_fingerprint, v.config) == (model, CARD, "sha256:teach", {"lr": 1e-5})

    # watch_teachers reads the fingerprints from the same server.
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / INFO_FILE).write_text(json.dumps({"fingerprint": "sha256:teach"}))
    other = tmp_path / "other-teacher"
    other.mkdir()
    (other / INFO_FILE).write_text(json.dumps({"fingerprint": "sha256:new"}))
    found = watch(WatchTeachersConfig(teachers=f"{teacher},{other}", registry=uri, model_name=name,
                                      artifact_root=str(tmp_path / "artifacts"))).new
    assert [t["fingerprint"] for t in found] == ["sha256:new"]


def test_unreachable_registry_is_one_line_before_anything(tmp_path, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text(CARD)
    storage.publish_dir(str(src), str(tmp_path / "model"))
    (tmp_path / "m.json").write_text(json.dumps({"fid": 1.0, "clip": 0.3}))
    for scheme in ("mlflow+http", "kubeflow-mr+http"):
        rc = main(["registry", "register", "--registry", f"{scheme}://127.0.0.1:{port}", "--model",
                   str(tmp_path / "model"), "--metrics", str(tmp_path / "m.json")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "no answer" in err, err
    with pytest.raises(ValueError, match="unknown scheme"):
        registry.check("mlflow://127.0.0.1:5000")


def test_kubeflow_credentials(monkeypatch):
    server, state = kubeflow_mr_stub.serve(token="s3cret")
    uri = f"kubeflow-mr+http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("MODEL_REGISTRY_TOKEN", raising=False)
        monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", "/nonexistent")
        with pytest.raises(registry.RegistryError, match="401 credentials refused"):
            registry.check(uri)
        assert state.models == {}  # refused before anything was written
        monkeypatch.setenv("MODEL_REGISTRY_TOKEN", "s3cret")
        assert registry.register(uri, "m", "s3://b/m", {"fid": 1.0}, "fp", "r").version == 1
    finally:
        server.shutdown()


def test_kubeflow_objects_as_the_spec_has_them(kubeflow_stub):
    base, state = kubeflow_stub
    uri = f"kubeflow-mr+{base}"
    v = registry.register(uri, "gen", "s3://bucket/run-9/model", {"fid": 7.25, "clip": 0.3}, "fp-9", "run-9")
    assert registry.promote(uri, "gen", v.version)
    (model,) = state.models.values()
    (version,) = state.versions.values()
    artifacts = {a["name"]: a for a in state.artifacts.values()}
    assert version["name"] == "1" and version["registeredModelId"] == model["id"]
    assert version["customProperties"]["fid"] == {"metadataType": "MetadataDoubleValue", "double_value": 7.25}
    assert version["customProperties"]["teacher_fingerprint"]["string_value"] == "fp-9"
    art = artifacts["gen"]
    assert (art["_parent"], art["uri"], art["modelFormatName"], art["modelSourceId"]) == \
        (version["id"], "s3://bucket/run-9/model", "diffusers", "run-9")
    claim = artifacts[f"sidflow.champion.{model['id']}.000001"]
    assert claim["_parent"] is None and claim["customProperties"]["version"]["int_value"] == "1"
    assert model["customProperties"]["champion"]["string_value"] == "1"


def test_kubeflow_promoter_with_a_stale_champion_decides_again(kubeflow_stub, monkeypatch):
    """Promoter A read the champion before B's promotion landed: its claim of the same epoch is refused (409), it
    reads again, and its worse model stays out (the interleaving forced by handing A a stale first read)."""
    from sidflow.registry import kubeflow_mr

    base, state = kubeflow_stub
    uri = f"kubeflow-mr+{base}"
    good = registry.register(uri, "gen", "s3://b/good", {"fid": 10.0, "clip": 0.3}, "fp", "r1")
    worse = registry.register(uri, "gen", "s3://b/worse", {"fid": 20.0, "clip": 0.3}, "fp", "r2")
    assert registry.promote(uri, "gen", good.version, require_better=True)  # B: epoch 1
    real_head, calls = kubeflow_mr._head, []

    def stale_first(registry_uri, model, start=None):
        calls.append(start)
        return (0, None) if len(calls) == 1 else real_head(registry_uri, model, start)  # A's read from before B

    monkeypatch.setattr(kubeflow_mr, "_head", stale_first)
    assert not registry.promote(uri, "gen", worse.version, require_better=True)
    assert len(calls) == 2  # the 409 on epoch 1 sent A back to read
    monkeypatch.undo()
    assert registry.champion(uri, "gen").version == good.version
    assert [a["externalId"] for a in state.artifacts.values() if a.get("externalId")] == \
        [f"sidflow.champion.{next(iter(state.models))}.000001"]


def test_mlflow_champion_is_the_ledger_not_a_stale_alias(mlflow_server):
    """A slow promoter's stale alias write (simulated over REST) never changes what `champion` answers, and the
    next promotion's mirror puts the alias back on the fold's champion."""
    uri, name = f"mlflow+{mlflow_server}", f"gen-{uuid.uuid4().hex[:8]}"
    good = registry.register(uri, name, "s3://b/good", {"fid": 10.0, "clip": 0.3}, "fp", "r1")
    worse = registry.register(uri, name, "s3://b/worse", {"fid": 20.0, "clip": 0.3}, "fp", "r2")
    assert registry.promote(uri, name, good.version, require_better=True)
    request = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/registered-models/alias", method="POST",
                                     data=json.dumps({"name": name, "alias": "champion", "version": "2"}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
    assert _mlflow_alias(mlflow_server, name) == worse.version  # the stale write landed
    assert registry.champion(uri, name).version == good.version
    assert not registry.promote(uri, name, worse.version, require_better=True)  # its mirror repairs the alias
    assert _mlflow_alias(mlflow_server, name) == good.version


def test_cli_lists_shows_and_promotes_on_a_server(kubeflow_stub, capsys):
    base, _ = kubeflow_stub
    uri = f"kubeflow-mr+{base}"
    for i, fid in enumerate((12.0, 9.0)):
        registry.register(uri, "gen", f"s3://b/{i}", {"fid": fid, "clip": 0.3}, f"fp-{i}", f"r{i}")
    assert main(["registry", "promote", "--registry", uri, "--name", "gen", "--version", "1"]) == 0
    capsys.readouterr()
    assert main(["registry", "list", "--registry", uri, "--name", "gen", "--reindex"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["champion"], v["run_id"]) for v in listed] == [(1, True, "r0"), (2, False, "r1")]
    assert main(["registry", "show", "--registry", uri, "--name", "gen"]) == 0
    assert json.loads(capsys.readouterr().out)["model_uri"] == "s3://b/0"
