"""Model registry and stage `register`, on a local directory and on S3 through a real HTTP endpoint (moto on loopback).

The concurrency tests run 8 threads at once. On S3 they rely on the server deciding conditional writes atomically,
as AWS S3 does; moto 5.2.5 honours If-None-Match and If-Match on PutObject but checks and stores without a lock, so
the `s3_server` fixture serialises its PutObject (CI once saw two threads through the check at once).
"""

import dataclasses
import json
import random
import threading

import pytest

from sidflow import registry, storage
from sidflow.cli import main
from sidflow.stages.register import RegisterConfig, RegisterResult, run, validate

THREADS = 8


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A registry root URI on each backend: a local path, an S3 prefix."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/registry"
    return str(tmp_path / "registry")


def add(root, fid, clip=0.3, run_id="run", fingerprint="fp-a", name="m"):
    """Register a version of model `name` with the given metrics; returns its Version."""
    return registry.register(root, name, f"{root}/models/{run_id}", {"fid": fid, "clip": clip}, fingerprint, run_id)


def champion_version(root, name="m"):
    held = registry.champion(root, name)
    return None if held is None else held.version


def on_threads(fn, n=THREADS) -> list:
    """Run fn(i) for i in range(n) on n threads released at once; return the results in order, re-raising errors."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def body(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:  # handed to the main thread, which fails the test with it
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# Storage primitives ----------------------------------------------------------------------------------------------


def test_write_bytes_if_absent_never_overwrites(root):
    uri = storage.join(root, "k", "x.json")
    assert storage.write_bytes_if_absent(uri, b"first")
    assert not storage.write_bytes_if_absent(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_write_bytes_if_absent_one_winner_among_threads(root):
    uri = storage.join(root, "race.bin")
    won = on_threads(lambda i: storage.write_bytes_if_absent(uri, f"writer {i}".encode()))
    assert won.count(True) == 1
    assert storage.read_bytes(uri) == f"writer {won.index(True)}".encode()


def test_write_bytes_if_match_is_compare_and_swap(root):
    uri = storage.join(root, "alias.json")
    assert storage.read_bytes_tagged(uri) is None
    assert storage.write_bytes_if_match(uri, b"v1", None)
    assert not storage.write_bytes_if_match(uri, b"v1 again", None)  # None means "only if absent"
    data, tag = storage.read_bytes_tagged(uri)
    assert data == b"v1"
    assert storage.write_bytes_if_match(uri, b"v2", tag)
    assert not storage.write_bytes_if_match(uri, b"v3", tag)  # stale tag: v2 landed since it was read
    assert storage.read_bytes(uri) == b"v2"


# Registry --------------------------------------------------------------------------------------------------------


def test_register_numbers_versions_and_reads_them_back(root):
    made = [add(root, fid, run_id=f"run-{i}") for i, fid in enumerate([10.0, 12.0, 8.0])]
    assert [v.version for v in made] == [1, 2, 3]
    assert registry.list_versions(root, "m") == made
    assert registry.get(root, "m", 2) == made[1]
    assert registry.get(root, "m", 2).run_id == "run-1" and registry.get(root, "m", 2).metrics["fid"] == 12.0
    record = json.loads(storage.read_text(f"{root}/m/versions/000002/version.json"))
    assert record["version"] == 2 and record["model_uri"] == f"{root}/models/run-1"
    assert [r["version"] for r in json.loads(storage.read_text(f"{root}/m/index.json"))["versions"]] == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="m has no version 7"):
        registry.get(root, "m", 7)
    assert registry.list_versions(root, "other") == [] and registry.champion(root, "other") is None


def test_gate_promotes_first_then_only_lower_fid(root):
    promoted = []
    for fid in [10.0, 12.0, 10.0, 8.0]:  # first; worse; a tie; better
        v = add(root, fid)
        promoted.append((registry.promote(root, "m", v.version, require_better=True), champion_version(root)))
    assert promoted == [(True, 1), (False, 1), (False, 1), (True, 4)]
    alias = json.loads(storage.read_text(f"{root}/m/champion.json"))
    assert alias["version"] == 4 and alias["metrics"] == {"fid": 8.0, "clip": 0.3}


def test_clip_floor_blocks_promotion_and_manual_promote_overrides(root):
    add(root, 10.0, clip=0.30)
    assert registry.promote(root, "m", 1, require_better=True, clip_floor=0.25)
    low_clip = add(root, 5.0, clip=0.20)  # far better FID, but under the floor
    assert not registry.promote(root, "m", low_clip.version, require_better=True, clip_floor=0.25)
    assert champion_version(root) == 1
    assert registry.promote(root, "m", low_clip.version)  # by hand: no gate
    assert champion_version(root) == 2
    with pytest.raises(FileNotFoundError, match="no version 9"):
        registry.promote(root, "m", 9)


@pytest.mark.parametrize("challenger, champion, floor, expected", [
    ({"fid": 9.0}, None, None, True),                           # no champion: the first model wins
    ({"fid": 9.0}, {"fid": 10.0}, None, True),
    ({"fid": 11.0}, {"fid": 10.0}, None, False),
    ({"fid": 10.0}, {"fid": 10.0}, None, False),                # a tie keeps the champion
    ({"fid": 9.0, "clip": 0.31}, {"fid": 10.0}, 0.3, True),
    ({"fid": 9.0, "clip": 0.29}, {"fid": 10.0}, 0.3, False),
    ({"fid": 9.0}, {"fid": 10.0}, 0.3, False),                  # a floor cannot be met without a CLIP score
    ({"fid": 9.0, "clip": 0.29}, None, 0.3, False),             # the floor holds for a first model too
    ({"fid": 9.0}, {"clip": 0.3}, None, True),                  # a champion without FID is beaten by one with
])
def test_beats(challenger, champion, floor, expected):
    assert registry.beats(challenger, champion, clip_floor=floor) is expected


def test_beats_needs_challenger_fid():
    with pytest.raises(ValueError, match="no numeric 'fid'"):
        registry.beats({"clip": 0.3}, None)


def test_concurrent_registrations_get_distinct_versions_and_the_best_champion(root):
    fids = random.Random(0).sample(range(10, 10 + THREADS), THREADS)

    def register_and_gate(i):
        v = add(root, float(fids[i]), run_id=f"run-{i}")
        registry.promote(root, "m", v.version, require_better=True)
        return v

    made = on_threads(register_and_gate)
    assert sorted(v.version for v in made) == list(range(1, THREADS + 1))
    for i, v in enumerate(made):  # each record on storage is the one its own thread wrote: none overwritten
        assert registry.get(root, "m", v.version).run_id == f"run-{i}"
    assert [v.version for v in registry.list_versions(root, "m")] == list(range(1, THREADS + 1))
    # Compare-and-swap on the alias: whatever the interleaving, the lowest FID ends up champion.
    assert registry.champion(root, "m").run_id == f"run-{fids.index(min(fids))}"


def test_concurrent_promotions_leave_the_best_champion(root):
    fids = random.Random(1).sample(range(10, 10 + THREADS), THREADS)
    made = [add(root, float(fid), run_id=f"run-{i}") for i, fid in enumerate(fids)]
    add(root, 99.0, run_id="old")
    assert registry.promote(root, "m", THREADS + 1)  # a weak champion every challenger beats at first sight
    # All threads read the same champion and all pass the gate; a plain overwrite would keep the last writer's.
    on_threads(lambda i: registry.promote(root, "m", made[i].version, require_better=True))
    assert champion_version(root) == made[fids.index(min(fids))].version


def test_corrupted_index_is_a_one_line_error_and_reindex_repairs_it(root):
    made = [add(root, 10.0, run_id="a"), add(root, 9.0, run_id="b")]
    index = f"{root}/m/index.json"
    storage.write_text(index, "{not json")
    with pytest.raises(ValueError) as err:
        registry.list_versions(root, "m")
    assert index in str(err.value) and "sidflow registry reindex" in str(err.value) and "\n" not in str(err.value)
    assert registry.list_versions(root, "m", reindex=True) == made
    assert registry.list_versions(root, "m") == made
    storage.write_text(index, "[]")  # valid JSON, wrong shape: the same error
    with pytest.raises(ValueError, match="corrupted"):
        registry.fingerprints(root, "m")
    assert add(root, 8.0).version == 3  # register rebuilds a corrupted index rather than failing
    assert [r["version"] for r in json.loads(storage.read_text(index))["versions"]] == [1, 2, 3]


def test_stale_index_is_completed_from_the_listing(root):
    add(root, 10.0)
    stale = storage.read_text(f"{root}/m/index.json")
    add(root, 9.0)
    storage.write_text(f"{root}/m/index.json", stale)  # as if a slower register wrote its index last
    assert [v.version for v in registry.list_versions(root, "m")] == [1, 2]


def test_fingerprints(root):
    add(root, 10.0, fingerprint="sha256:aaa")
    add(root, 9.0, fingerprint="hf:org/sd@123")
    add(root, 8.0, fingerprint="sha256:aaa")
    add(root, 7.0, fingerprint="")  # unknown teacher: not a fingerprint
    assert registry.fingerprints(root, "m") == {"sha256:aaa", "hf:org/sd@123"}
    assert registry.fingerprints(root, "other") == set()


@pytest.mark.parametrize("name", ["", "a/b", "../m", ".hidden"])
def test_bad_model_name(tmp_path, name):
    with pytest.raises(ValueError, match="one path segment"):
        add(str(tmp_path), 10.0, name=name)


# Stage -----------------------------------------------------------------------------------------------------------

CARD = "# sid-generator\n\nA one-step generator.\n"
INFO = {"teacher": "s3://t/sd15", "teacher_fingerprint": "sha256:teach", "steps": 1, "config": {"lr": 1e-5}}


@pytest.fixture
def model(root, tmp_path):
    """URI of a published fake model directory holding README.md, sidflow.json and a weights file."""
    src = tmp_path / "model-src"
    (src / "unet").mkdir(parents=True)
    (src / "README.md").write_text(CARD)
    (src / "sidflow.json").write_text(json.dumps(INFO))
    (src / "unet" / "weights.bin").write_bytes(b"\0" * 64)
    uri = storage.join(root.rsplit("/", 1)[0], "models", "run-1")
    storage.publish_dir(str(src), uri)
    return uri


def write_metrics(root, fid, clip=0.3, name="metrics.json") -> str:
    uri = storage.join(root.rsplit("/", 1)[0], "eval", name)
    storage.write_text(uri, json.dumps({"fid": fid, "clip": clip, "n": 1000}))
    return uri


def test_stage_registers_and_gates(root, model):
    cfg = RegisterConfig(registry=root, model=model, metrics=write_metrics(root, 20.0), run_id="run-1")
    assert run(cfg) == RegisterResult(version=1, promoted=True, champion_version=1)
    v = registry.get(root, "sid-generator", 1)
    assert (v.model_uri, v.model_card, v.run_id) == (model, CARD, "run-1")
    assert v.metrics == {"fid": 20.0, "clip": 0.3, "n": 1000}
    assert v.teacher_fingerprint == "sha256:teach" and v.config == {"lr": 1e-5}  # from the model's sidflow.json
    worse = dataclasses.replace(cfg, metrics=write_metrics(root, 25.0, name="worse.json"), run_id="run-2")
    assert run(worse) == RegisterResult(version=2, promoted=False, champion_version=1)
    assert run(dataclasses.replace(worse, promote="always")) == RegisterResult(3, True, 3)
    assert run(dataclasses.replace(cfg, promote="never")) == RegisterResult(4, False, 3)
    better_but_blurry = dataclasses.replace(cfg, metrics=write_metrics(root, 1.0, clip=0.1, name="b.json"),
                                            clip_floor=0.2)
    assert run(better_but_blurry) == RegisterResult(5, False, 3)
    assert registry.fingerprints(root, "sid-generator") == {"sha256:teach"}


def test_stage_errors(root, model, tmp_path):
    metrics = write_metrics(root, 20.0)
    unpublished = tmp_path / "unpublished"
    (unpublished / "unet").mkdir(parents=True)
    (unpublished / "README.md").write_text(CARD)
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        run(RegisterConfig(registry=root, model=str(unpublished), metrics=metrics))
    with pytest.raises(ValueError, match="^model is empty"):
        validate(RegisterConfig(registry=root, metrics=metrics))
    no_fid = storage.join(root.rsplit("/", 1)[0], "eval", "no-fid.json")
    storage.write_text(no_fid, json.dumps({"clip": 0.3}))
    with pytest.raises(ValueError, match="has no numeric 'fid'.*promote='always'"):
        run(RegisterConfig(registry=root, model=model, metrics=no_fid))
    with pytest.raises(ValueError, match="differs from 'sha256:teach'"):
        run(RegisterConfig(registry=root, model=model, metrics=metrics, teacher_fingerprint="sha256:other"))
    with pytest.raises(ValueError, match="one path segment"):
        run(RegisterConfig(registry=root, model=model, metrics=metrics, model_name="a/b"))
    assert registry.list_versions(root, "sid-generator") == []  # no error registered anything
    assert run(RegisterConfig(registry=root, model=model, metrics=no_fid, promote="never")).version == 1


def test_register_config_is_frozen_and_documented():
    cfg = RegisterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.registry = "x"  # type: ignore[misc]
    assert all(f.metadata.get("help") for f in dataclasses.fields(RegisterConfig))


# CLI -------------------------------------------------------------------------------------------------------------


def test_cli_list_show_promote_reindex(root, capsys):
    for fid, run_id in [(10.0, "a"), (12.0, "b")]:
        v = add(root, fid, run_id=run_id)
        registry.promote(root, "m", v.version, require_better=True)
    args = ["--registry", root, "--name", "m"]

    def cli(*argv):
        assert main(["registry", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    listed = cli("list", *args)
    assert [(r["version"], r["run_id"], r["champion"]) for r in listed] == [(1, "a", True), (2, "b", False)]
    assert cli("show", *args, "--version", "2")["metrics"] == {"fid": 12.0, "clip": 0.3}
    assert cli("show", *args)["version"] == 1  # no --version: the champion
    assert cli("promote", *args, "--version", "2") == {"champion": 2}
    assert champion_version(root) == 2
    storage.write_text(f"{root}/m/index.json", "garbage")
    assert main(["registry", "list", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sidflow registry reindex" in err
    assert cli("reindex", *args) == {"versions": [1, 2]}
    assert len(cli("list", *args)) == 2


def test_cli_register(root, model, capsys):
    metrics = write_metrics(root, 20.0)
    assert main(["registry", "register", "--registry", root, "--model", model, "--metrics", metrics,
                 "--run-id", "r1", "--clip-floor", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out) == {"version": 1, "promoted": False, "champion_version": None}
    assert registry.get(root, "sid-generator", 1).run_id == "r1"
    assert registry.champion(root, "sid-generator") is None  # the CLIP floor (0.3 < 0.5) held it back


# Nothing wrong crowned -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metrics, why", [
    ({"fid": float("nan"), "clip": 0.3}, "fid=nan"),
    ({"fid": -1.0, "clip": 0.3}, "fid=-1.0"),
    ({"fid": float("inf"), "clip": 0.3}, "fid=inf"),
    ({"fid": 10.0, "clip": float("nan")}, "clip=nan"),
    ({"fid": 10.0, "clip": 1.5}, "clip=1.5"),
    ({"fid": 10.0, "clip": 0.3, "images_per_s": float("nan")}, "images_per_s=nan"),
])
def test_impossible_metrics_are_refused_before_anything_is_written(root, model, metrics, why):
    with pytest.raises(ValueError, match=f"metric {why} is refused"):
        registry.register(root, "m", "s3://x/model", metrics, "fp", "run")
    uri = storage.join(root.rsplit("/", 1)[0], "eval", "bad.json")
    storage.write_text(uri, json.dumps(metrics))  # json writes NaN and Infinity, as a broken evaluator would
    with pytest.raises(ValueError, match=why):
        run(RegisterConfig(registry=root, model=model, metrics=uri))
    assert storage.listdir(root) == []  # no version, no champion, no index
    with pytest.raises(ValueError, match=why):
        registry.beats(metrics, {"fid": 20.0, "clip": 0.3}, clip_floor=0.2)


def test_a_champion_crowned_with_nan_before_the_check_is_replaced(root):
    v = add(root, 30.0)
    storage.write_text(f"{root}/m/champion.json", json.dumps({"version": v.version, "metrics": {"fid": float("nan")},
                                                              "promoted": "then"}))
    better = add(root, 25.0)
    assert registry.promote(root, "m", better.version, require_better=True)
    assert champion_version(root) == better.version


def test_nan_clip_does_not_pass_a_clip_floor():
    assert not registry.beats({"fid": 1.0, "clip": 0.1}, None, clip_floor=0.2)
    with pytest.raises(ValueError, match="clip=nan"):
        registry.beats({"fid": 1.0, "clip": float("nan")}, None, clip_floor=0.2)


def test_a_server_that_ignores_conditional_writes_is_refused_and_loses_nothing(juicefs_bucket, tmp_path, capsys):
    # The JuiceFS gateway (MinIO's S3 layer) accepts If-None-Match: * over an existing object. Before the probe, 8
    # concurrent registrations there all "won" version 1; now every one is refused in one line and nothing is written.
    root = juicefs_bucket + "/registry"
    errors = []

    def attempt(i):
        try:
            add(root, 10.0 + i, run_id=f"r{i}")
        except storage.StorageError as exc:
            errors.append(str(exc))

    on_threads(attempt)
    assert len(errors) == THREADS and all("ignores conditional writes" in e and "\n" not in e for e in errors)
    assert storage.list_files(root) == []
    metrics = storage.join(juicefs_bucket, "eval", "m.json")
    storage.write_text(metrics, json.dumps({"fid": 10.0, "clip": 0.3}))
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "w.bin").write_bytes(b"w")
    storage.publish_dir(str(src), juicefs_bucket + "/model")
    assert main(["registry", "register", "--registry", root, "--model", juicefs_bucket + "/model",
                 "--metrics", metrics]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ignores conditional writes" in err


def test_register_refuses_a_model_whose_files_differ_from_its_manifest(root, model):
    metrics = write_metrics(root, 20.0)
    storage.write_bytes(storage.join(model, "unet", "weights.bin"), b"\1" * 65)  # replaced after publishing
    with pytest.raises((ValueError, OSError), match="differs from the manifest|the manifest says 64"):
        run(RegisterConfig(registry=root, model=model, metrics=metrics))
    assert registry.list_versions(root, "sid-generator") == []
