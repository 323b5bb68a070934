"""Stage download_teacher: local and S3 sources to local and S3 destinations, fingerprints, no-op reruns, errors."""

import dataclasses
import filecmp
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from sidflow import storage
from sidflow.cli import main
from sidflow.stages.download_teacher import DownloadTeacherConfig, parse_hf, run, validate
from sidflow.teacher import INFO_FILE, TeacherError, fingerprint, load_teacher


def digest_of_dir(path) -> str:
    """Independent fingerprint of a local teacher: "sha256:" + digest of its (path, size, sha256) rows."""
    return "sha256:" + storage.manifest_digest(storage.build_manifest(str(path)))


def same_tree(a, b) -> bool:
    files = storage.list_files(str(a))
    if [f for f in storage.list_files(str(b)) if f != storage.MANIFEST] != files:
        return False
    return all(filecmp.cmp(Path(a, f), Path(b, f), shallow=False) for f in files)


def unet_state(uri: str) -> dict:
    return load_teacher(uri).unet.state_dict()


def assert_same_unet(uri: str, reference: str) -> None:
    got, want = unet_state(uri), unet_state(reference)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


# Local -> local -------------------------------------------------------------------------------------------------


def test_local_to_local_publish_skip_and_change(tiny_teacher, tmp_path):
    src = Path(shutil.copytree(tiny_teacher, tmp_path / "src"))
    dest = str(tmp_path / "dest")
    cfg = DownloadTeacherConfig(source=str(src), dest=dest)

    first = run(cfg)
    manifest = storage.read_manifest(dest)
    assert manifest is not None
    assert first.uri == dest and first.skipped is False
    assert first.fingerprint == "sha256:" + storage.manifest_digest(manifest) == digest_of_dir(tiny_teacher)
    assert same_tree(src, dest)
    assert sorted(f["path"] for f in manifest["files"]) == storage.list_files(tiny_teacher)

    second = run(cfg)
    assert second == dataclasses.replace(first, skipped=True)
    assert storage.read_manifest(dest)["created"] == manifest["created"]  # not rewritten

    sched = src / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "steps_offset": 0}))
    third = run(cfg)
    assert third.skipped is False
    assert third.fingerprint != first.fingerprint
    assert third.fingerprint == digest_of_dir(src) == "sha256:" + storage.manifest_digest(storage.read_manifest(dest))
    assert json.loads(Path(dest, "scheduler", "scheduler_config.json").read_text())["steps_offset"] == 0
    assert run(cfg).skipped is True


def test_file_uri_source(tiny_teacher, tmp_path):
    result = run(DownloadTeacherConfig(source="file://" + tiny_teacher, dest=str(tmp_path / "dest")))
    assert result.fingerprint == digest_of_dir(tiny_teacher)
    assert same_tree(tiny_teacher, tmp_path / "dest")


# S3 -------------------------------------------------------------------------------------------------------------


def test_local_to_s3(tiny_teacher, s3_bucket, sidflow_cache):
    dest = s3_bucket + "/teachers/a"
    cfg = DownloadTeacherConfig(source=tiny_teacher, dest=dest)
    first = run(cfg)
    assert first.skipped is False and first.fingerprint == digest_of_dir(tiny_teacher)
    created = storage.read_manifest(dest)["created"]
    assert storage.list_files(dest) == sorted(storage.list_files(tiny_teacher) + ["manifest.json"])

    second = run(cfg)
    assert second.skipped is True and second.fingerprint == first.fingerprint
    assert storage.read_manifest(dest)["created"] == created
    assert_same_unet(dest, tiny_teacher)


def test_s3_published_to_s3(tiny_teacher, s3_bucket, sidflow_cache):
    src, dest = s3_bucket + "/teachers/src", s3_bucket + "/teachers/copy"
    storage.publish_dir(tiny_teacher, src)
    cfg = DownloadTeacherConfig(source=src, dest=dest)
    first = run(cfg)
    assert first.skipped is False and first.fingerprint == digest_of_dir(tiny_teacher)
    created = storage.read_manifest(dest)["created"]

    second = run(cfg)
    assert second.skipped is True and second.fingerprint == first.fingerprint
    assert storage.read_manifest(dest)["created"] == created
    assert_same_unet(dest, tiny_teacher)


def test_s3_bare_upload_to_local(tiny_teacher, s3_bucket, tmp_path):
    src, dest = s3_bucket + "/teachers/bare", str(tmp_path / "dest")
    storage.upload_dir(tiny_teacher, src)  # `aws s3 sync`-style upload: no manifest
    assert storage.read_manifest(src) is None
    first = run(DownloadTeacherConfig(source=src, dest=dest))
    # Without a manifest the fingerprint is the listing's: (path, size, ETag) per object, read without a download.
    listing = sorted((rel, (Path(tiny_teacher) / rel).stat().st_size, hashlib.md5((Path(tiny_teacher) / rel)
                      .read_bytes()).hexdigest()) for rel in storage.list_files(tiny_teacher))  # single-part ETag
    expected = "s3-listing:sha256:" + hashlib.sha256(json.dumps([list(r) for r in listing]).encode()).hexdigest()
    assert (first.skipped, first.fingerprint) == (False, expected)
    assert fingerprint(dest) == expected  # the copy carries it in sidflow-teacher.json
    assert [f for f in storage.list_files(dest) if f not in (INFO_FILE, storage.MANIFEST)] == \
        storage.list_files(tiny_teacher)
    assert_same_unet(dest, tiny_teacher)
    created = storage.read_manifest(dest)["created"]
    second = run(DownloadTeacherConfig(source=src, dest=dest))  # same listing: nothing copied
    assert (second.skipped, second.fingerprint) == (True, expected)
    assert storage.read_manifest(dest)["created"] == created

    sched = Path(shutil.copytree(tiny_teacher, tmp_path / "changed")) / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "steps_offset": 0}))
    storage.upload_file(str(sched), src + "/scheduler/scheduler_config.json")  # a re-upload of one file
    third = run(DownloadTeacherConfig(source=src, dest=dest))
    assert third.skipped is False and third.fingerprint not in (expected, None) and third.fingerprint == \
        fingerprint(dest)
    assert json.loads(Path(dest, "scheduler", "scheduler_config.json").read_text())["steps_offset"] == 0


def test_published_hub_teacher_keeps_its_fingerprint_and_skips(tiny_teacher, s3_bucket, tmp_path):
    # What an hf:// download publishes: the teacher plus sidflow-teacher.json carrying the hub commit fingerprint.
    hub = Path(shutil.copytree(tiny_teacher, tmp_path / "hub"))
    fp = "hf:org/tiny@" + "0" * 40
    (hub / INFO_FILE).write_text(json.dumps({"source": "hf://org/tiny", "fingerprint": fp}))
    src, dest = s3_bucket + "/teachers/hub", s3_bucket + "/teachers/hub-copy"
    storage.publish_dir(str(hub), src)

    first = run(DownloadTeacherConfig(source=src, dest=dest))
    assert (first.skipped, first.fingerprint) == (False, fp)
    created = storage.read_manifest(dest)["created"]
    second = run(DownloadTeacherConfig(source=src, dest=dest))
    assert (second.skipped, second.fingerprint) == (True, fp)
    assert storage.read_manifest(dest)["created"] == created

    local_dest = str(tmp_path / "local-copy")
    assert run(DownloadTeacherConfig(source=str(hub), dest=local_dest)) == type(first)(local_dest, fp, False)
    assert run(DownloadTeacherConfig(source=str(hub), dest=local_dest)).skipped is True


# Bad inputs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, dest, error, match",
    [
        ("", "/tmp/x", ValueError, "source is empty"),
        ("/nonexistent/sidflow-teacher", "DEST", FileNotFoundError, "no such directory"),
        ("hf://bad", "DEST", ValueError, "hf://org/name"),
        ("TINY", "", ValueError, "dest is empty"),
    ],
)
def test_bad_config(tiny_teacher, tmp_path, source, dest, error, match):
    source = source.replace("TINY", tiny_teacher)
    dest = dest.replace("DEST", str(tmp_path / "dest"))
    cfg = DownloadTeacherConfig(source=source, dest=dest)
    with pytest.raises(error, match=match) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(error, match=match):
        run(cfg)
    assert not (tmp_path / "dest").exists()


def test_not_a_teacher_publishes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    dest = str(tmp_path / "dest")
    with pytest.raises(TeacherError, match="model_index.json"):
        run(DownloadTeacherConfig(source=str(tmp_path / "empty"), dest=dest))
    assert storage.read_manifest(dest) is None
    assert storage.list_files(dest) == []


def test_s3_not_a_teacher_publishes_nothing(tiny_teacher, s3_bucket, tmp_path):
    src, dest = s3_bucket + "/teachers/partial", s3_bucket + "/teachers/out"
    broken = Path(shutil.copytree(tiny_teacher, tmp_path / "broken"))
    shutil.rmtree(broken / "vae")
    storage.upload_dir(str(broken), src)
    with pytest.raises(TeacherError, match="missing vae"):
        run(DownloadTeacherConfig(source=src, dest=dest))
    assert storage.read_manifest(dest) is None
    assert storage.list_files(dest) == []
    with pytest.raises(FileNotFoundError, match="no files"):
        run(DownloadTeacherConfig(source=s3_bucket + "/teachers/nothing-here", dest=dest))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("hf://org/name", ("org/name", "main")),
        ("hf://stable-diffusion-v1-5/stable-diffusion-v1-5", ("stable-diffusion-v1-5/stable-diffusion-v1-5", "main")),
        ("hf://org/name@v1.0", ("org/name", "v1.0")),
        ("hf://org/name@" + "ab" * 20, ("org/name", "ab" * 20)),
    ],
)
def test_parse_hf(source, expected):
    assert parse_hf(source) == expected


@pytest.mark.parametrize("source", ["hf://bad", "hf://", "hf://org/", "hf:///name", "hf://a/b/c", "hf://@main"])
def test_parse_hf_rejects(source):
    with pytest.raises(ValueError, match="hf://org/name") as err:
        parse_hf(source)
    assert repr(source) in str(err.value) and "\n" not in str(err.value)


# CLI ------------------------------------------------------------------------------------------------------------


def test_cli_download_teacher(tiny_teacher, tmp_path, capsys):
    dest = str(tmp_path / "dest")
    assert main(["download-teacher", "--source", tiny_teacher, "--dest", dest]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"uri": dest, "fingerprint": digest_of_dir(tiny_teacher), "skipped": False}
    assert main(["download-teacher", "--source", tiny_teacher, "--dest", dest]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True


@pytest.mark.parametrize("source", ["/nonexistent/sidflow-teacher", "hf://bad", "EMPTY"])
def test_cli_download_teacher_bad_source(tmp_path, capsys, source):
    (tmp_path / "empty").mkdir()
    source = source.replace("EMPTY", str(tmp_path / "empty"))
    assert main(["download-teacher", "--source", source, "--dest", str(tmp_path / "dest")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidflow download-teacher: error:")
    assert source in lines[0]
    assert storage.read_manifest(str(tmp_path / "dest")) is None
