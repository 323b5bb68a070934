"""Stage `watch_teachers` on a tiny local teacher and a local registry."""

import pytest

from sidflow import registry, storage
from sidflow.stages import download_teacher
from sidflow.stages.watch_teachers import WatchTeachersConfig, run, slug


def _cfg(tmp_path, teachers, **kw):
    return WatchTeachersConfig(teachers=teachers, registry=str(tmp_path / "registry"),
                               artifact_root=str(tmp_path / "artifacts"), **kw)


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
