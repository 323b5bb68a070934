"""Stage `watch_teachers` on a tiny teacher: local, in an S3 folder on the loopback S3 (moto), and on a loopback
stand-in of the Hugging Face Hub (tests/loopback.py HubStub); a local registry."""

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sidflow import registry, storage
from sidflow.stages import download_teacher
from sidflow.stages.watch_teachers import WatchTeachersConfig, run, slug
from sidflow.teacher import INFO_FILE, fingerprint


def _cfg(tmp_path, teachers, **kw):
    return WatchTeachersConfig(**{"teachers": teachers, "registry": str(tmp_path / "registry"),
                                  "artifact_root": str(tmp_path / "artifacts"), **kw})


def test_unregistered_teacher_is_new_and_registered_one_is_skipped(tiny_teacher, tmp_path):
    cfg = _cfg(tmp_path, f" {tiny_teacher} ,")
    digest = "sha256:" + storage.manifest_digest(storage.build_manifest(tiny_teacher))
    assert run(cfg).new == [{"source": tiny_teacher, "fingerprint": digest,
                             "dest": str(tmp_path / "artifacts" / "teachers" / slug(tiny_teacher))}]

    # The fingerprint is the one download_teacher records for the same teacher.
    published = download_teacher.run(download_teacher.DownloadTeacherConfig(tiny_teacher, run(cfg).new[0]["dest"]))
    assert published.fingerprint == digest

    registry.register(cfg.registry, "other-model", "m", {"fid": 1.0}, digest, "r0")
    assert len(run(cfg).new) == 1  # registered for another model name: still new for this one
    registry.register(cfg.registry, cfg.model_name, "m", {"fid": 1.0}, digest, "r1")
    assert run(cfg).new == []


def test_published_teacher_keeps_its_fingerprint(tiny_teacher, tmp_path):
    dest = str(tmp_path / "published")
    fp = download_teacher.run(download_teacher.DownloadTeacherConfig(tiny_teacher, dest)).fingerprint
    cfg = _cfg(tmp_path, dest)
    assert [e["fingerprint"] for e in run(cfg).new] == [fp]
    registry.register(cfg.registry, cfg.model_name, "m", {"fid": 1.0}, fp, "r1")
    assert run(cfg).new == []


def test_slug_is_one_path_segment():
    assert slug("hf://org/name@abc") == "org--name@abc"
    assert slug("s3://bucket/teachers/sd15/") == "bucket--teachers--sd15"
    assert "/" not in slug("/tmp/a b/teacher")


@pytest.mark.parametrize("change, match", [
    (dict(teachers=" , "), "teachers is empty"),
    (dict(registry=""), "registry is empty"),
    (dict(artifact_root=""), "artifact_root is empty"),
    (dict(model_name="a/b"), "model name 'a/b'"),
    (dict(teachers="hf://justaname"), "is not hf://org/name"),
    (dict(teachers="/no/such/teacher"), "is not a directory"),
])
def test_bad_inputs_fail_in_one_line(tiny_teacher, tmp_path, change, match):
    kw = dict(teachers=tiny_teacher, registry=str(tmp_path / "r"), artifact_root=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=match) as err:
        run(WatchTeachersConfig(**{**kw, **change}))
    assert "\n" not in str(err.value)


# Hub teachers: fingerprinted by their weight and config files, through a stand-in of the hub (HF_ENDPOINT) ----------


def _files(teacher) -> dict[str, bytes]:
    root = Path(teacher)
    return {rel: (root / rel).read_bytes() for rel in storage.list_files(teacher)}


def test_hub_teacher_changes_with_its_weights_not_its_readme(hub, tiny_teacher, tmp_path):
    files = {**_files(tiny_teacher), "README.md": b"# tiny\n", ".gitattributes": b"*.safetensors filter=lfs\n"}
    hub.commit("org/tiny", files)
    cfg = _cfg(tmp_path, "hf://org/tiny")
    (item,) = run(cfg).new
    fp = item["fingerprint"]
    # Independent value: sha256 over the sorted (path, sha256 of an LFS file | git blob id) of the files downloaded.
    rows = []
    for path, data in sorted(files.items()):
        if path in ("README.md", ".gitattributes"):
            continue
        lfs = path.endswith(".safetensors")
        rows.append([path, hashlib.sha256(data).hexdigest() if lfs
                     else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()])
    assert fp == "hf:org/tiny:sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    # One model_info call with files_metadata (blobs=true), no file read. (huggingface_hub may also fetch its
    # /api/agent-harnesses list for its user agent: not ours to count.)
    asked = [r for r in hub.requests if r[1] != "/api/agent-harnesses"]
    assert asked == [("GET", "/api/models/org/tiny/revision/main", {"blobs": ["true"]})]

    hub.commit("org/tiny", {**files, "README.md": b"# tiny, now with a model card\n"})
    assert run(cfg).new == [item]  # a README-only commit: same fingerprint
    registry.register(cfg.registry, cfg.model_name, "m", {"fid": 1.0}, fp, "r1")
    assert run(cfg).new == []

    unet = "unet/diffusion_pytorch_model.safetensors"
    hub.commit("org/tiny", {**files, unet: files[unet][:-1] + bytes([files[unet][-1] ^ 1])})
    (changed,) = run(cfg).new  # new weights: a new fingerprint, to distill
    assert changed["fingerprint"] not in (fp, None)
    sched = "scheduler/scheduler_config.json"
    hub.commit("org/tiny", {**files, sched: files[sched].replace(b"}", b', "steps_offset": 0}', 1)})
    assert run(cfg).new[0]["fingerprint"] not in (fp, changed["fingerprint"])  # a config that changes the model


def test_download_teacher_records_the_hub_fingerprint_watch_computes(hub, tiny_teacher, tmp_path):
    files = {**_files(tiny_teacher), "README.md": b"# tiny\n"}
    sha = hub.commit("org/tiny", files)
    cfg = _cfg(tmp_path, "hf://org/tiny@main")
    (item,) = run(cfg).new
    published = download_teacher.run(download_teacher.DownloadTeacherConfig(item["source"], item["dest"]))
    assert (published.fingerprint, published.skipped) == (item["fingerprint"], False)
    assert fingerprint(item["dest"]) == item["fingerprint"]
    info = json.loads(storage.read_text(storage.join(item["dest"], INFO_FILE)))
    assert info == {"source": "hf://org/tiny@main", "fingerprint": item["fingerprint"], "commit": sha}
    got = {f for f in storage.list_files(item["dest"])} - {storage.MANIFEST, INFO_FILE}
    assert got == set(storage.list_files(tiny_teacher))  # the diffusers files, no README, no hub cache
    assert all(storage.read_bytes(storage.join(item["dest"], f)) == files[f] for f in got)

    hub.commit("org/tiny", {**files, "README.md": b"# tiny v2\n"})
    again = download_teacher.run(download_teacher.DownloadTeacherConfig(item["source"], item["dest"]))
    assert (again.fingerprint, again.skipped) == (item["fingerprint"], True)  # README-only: nothing copied


def test_watch_reads_the_hub_at_hf_endpoint_in_a_fresh_process(hub, tiny_teacher, tmp_path):
    hub.commit("org/tiny", _files(tiny_teacher))
    expected = run(_cfg(tmp_path, "hf://org/tiny")).new
    cli = "import sys; from sidflow.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", cli, "watch-teachers", "--teachers", "hf://org/tiny",
                          "--registry", str(tmp_path / "registry"), "--artifact-root", str(tmp_path / "artifacts")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["new"] == expected  # HF_ENDPOINT alone, read at import, reached the stand-in


# Folders of teachers on S3, teachers uploaded without a manifest, failing sources, tried fingerprints ---------------


@pytest.fixture(params=["s3", "juicefs"])
def bucket(request):
    """A fresh bucket on moto (ETags in listings) and on the JuiceFS gateway (none: LastModified stands in)."""
    return request.getfixturevalue(f"{request.param}_bucket")


def test_s3_folder_new_teacher_appears_unchanged_ones_stay_quiet(tiny_teacher, bucket, tmp_path, hub):
    s3_bucket = bucket
    folder = s3_bucket + "/incoming"
    storage.upload_dir(tiny_teacher, folder + "/sd-a")  # `aws s3 sync`: no manifest
    storage.publish_dir(tiny_teacher, folder + "/sd-b")
    storage.write_text(folder + "/notes/readme.txt", "not a teacher")
    cfg = _cfg(tmp_path, folder + "/*", artifact_root=s3_bucket + "/art")
    first = run(cfg)
    assert [t["source"] for t in first.new] == [folder + "/sd-a", folder + "/sd-b"]
    assert first.failed == [{"source": folder + "/notes", "reason": "no model_index.json: not a teacher (or still "
                                                                   "uploading)"}]
    bare, published = first.new
    assert bare["fingerprint"].startswith("s3-listing:sha256:")
    assert published["fingerprint"] == "sha256:" + storage.manifest_digest(storage.build_manifest(tiny_teacher))
    assert run(cfg).new == first.new  # nothing changed: the same fingerprints (no download, no "new" every tick)

    # download_teacher records the listing's fingerprint, so registering that distillation quiets the teacher.
    copied = download_teacher.run(download_teacher.DownloadTeacherConfig(bare["source"], bare["dest"]))
    assert copied.fingerprint == bare["fingerprint"]
    for t in first.new:
        registry.register(cfg.registry, cfg.model_name, "m", {"fid": 1.0}, t["fingerprint"], "r1")
    assert run(cfg).new == []

    other = Path(shutil.copytree(tiny_teacher, tmp_path / "other"))
    sched = other / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "steps_offset": 0}))
    storage.upload_dir(str(other), folder + "/sd-c")  # another teacher dropped into the folder (sd-a's bytes again
    # would be sd-a's fingerprint, registered already)
    (item,) = run(cfg).new
    assert item == {"source": folder + "/sd-c", "dest": s3_bucket + "/art/teachers/" + slug(folder + "/sd-c"),
                    "fingerprint": storage_listing_fp(folder + "/sd-c")}


def storage_listing_fp(uri: str) -> str:
    rows = [[r["path"], r["size"], r["etag"] or r["modified"]] for r in storage.list_stats(uri)]
    return "s3-listing:sha256:" + hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


@pytest.mark.parametrize("status", [401, 404, 429])
def test_a_failing_hub_source_is_reported_and_the_others_run(hub, tiny_teacher, tmp_path, status):
    hub.commit("org/tiny", _files(tiny_teacher))
    hub.fail = status
    result = run(_cfg(tmp_path, f"hf://org/tiny, {tiny_teacher}"))
    assert [t["source"] for t in result.new] == [tiny_teacher]
    ((failed),) = result.failed
    assert failed["source"] == "hf://org/tiny" and f"(HTTP {status})" in failed["reason"]
    assert "\n" not in failed["reason"]


def test_unreachable_hub_and_missing_bucket_are_reported_and_skipped(tiny_teacher, s3_bucket, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    gone = "s3://sidflow-no-such-bucket-0/teachers/*"
    result = run(_cfg(tmp_path, f"hf://org/tiny,{gone},{tiny_teacher}"))
    assert [t["source"] for t in result.new] == [tiny_teacher]
    reasons = {f["source"]: f["reason"] for f in result.failed}
    assert set(reasons) == {"hf://org/tiny", gone}
    assert reasons["hf://org/tiny"].startswith("ConnectError") and "does not exist" in reasons[gone]
    assert all("\n" not in r for r in reasons.values())


def test_a_tried_fingerprint_waits_for_a_change_unless_retry_failed(tiny_teacher, tmp_path):
    from sidflow.kfp.report import record_attempts

    src = Path(shutil.copytree(tiny_teacher, tmp_path / "teacher"))
    cfg = _cfg(tmp_path, str(src))
    (item,) = run(cfg).new
    record_attempts(cfg.artifact_root, "run-1", [item], [{"status": "gated", "detail": "not registered: fid=9.0"}])
    result = run(cfg)
    assert result.new == []
    assert result.skipped == [{"source": str(src), "fingerprint": item["fingerprint"], "reason":
                               "tried in run run-1: gated (not registered: fid=9.0); retry_failed=true tries it again"}]
    assert run(dataclasses.replace(cfg, retry_failed=True)).new == [item]

    sched = src / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "steps_offset": 0}))
    (changed,) = run(cfg).new  # a new version of the teacher is tried again
    assert changed["fingerprint"] != item["fingerprint"] and changed["dest"] == item["dest"]


def test_watch_component_logs_failed_sources_and_returns_the_rest(hub, tiny_teacher, tmp_path, capsys):
    from sidflow.kfp.components.watch_teachers import watch_teachers

    hub.fail = 429
    out = watch_teachers.python_func(teachers=f"hf://org/tiny,{tiny_teacher}", registry=str(tmp_path / "r"),
                                     artifact_root=str(tmp_path / "a"))
    assert [t["source"] for t in out] == [tiny_teacher]
    log = capsys.readouterr().out.splitlines()
    assert log[0] == f"1 new teacher(s): [{tiny_teacher!r}]"
    (failed,) = [line for line in log if line.startswith("FAILED ")]  # one line per failed source
    assert failed.startswith("FAILED hf://org/tiny: HfHubHTTPError (HTTP 429)")
