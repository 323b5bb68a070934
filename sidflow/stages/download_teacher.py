"""Stage `download_teacher`: copy a teacher once into the artifact store, fingerprinted.

Sources: `hf://org/name@revision` (huggingface_hub, honouring HF_TOKEN / HF_ENDPOINT), `s3://...`, or a local
path. The fingerprint is what `watch_teachers` computes from the source without a download, so the registry's
record of a distilled teacher matches the next watch's answer:
- a hub teacher: sha256 over the sorted (path, sha256) of the files downloaded (HF_ALLOW less HF_IGNORE: weights,
  configs, tokenizer files), read from the hub's file metadata; a commit that touches only the README keeps it;
- an S3 directory without a manifest (uploaded by hand): sha256 over its listing's (path, size, ETag) rows;
- a published directory or a local one: the content digest (sha256 over the manifest's path/size/sha256 rows), or
  the fingerprint its sidflow-teacher.json carries.
A destination that already holds that fingerprint makes the stage a no-op.
"""

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sidflow import storage
from sidflow.config import param
from sidflow.teacher import INFO_FILE, TeacherError, check_teacher_dir, fingerprint, listing_fingerprint

# Diffusers weights only: no fp16/non-EMA variants, no single-file .ckpt (SD1.5's repo holds ~40 GB of those).
HF_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
HF_IGNORE = ["*.fp16.*", "*non_ema*", "*.ckpt", "*.bin", "*.onnx*", "*.msgpack"]


@dataclass(frozen=True)
class DownloadTeacherConfig:
    source: str = param("", "teacher to fetch: hf://org/name[@revision], s3://bucket/key or a local directory",
                        required=True)
    dest: str = param("", "URI the teacher is published to (s3://... or a local path); a manifest is written last",
                      required=True)


@dataclass(frozen=True)
class DownloadTeacherResult:
    uri: str
    fingerprint: str
    skipped: bool


def parse_hf(source: str) -> tuple[str, str]:
    """Return (repo_id, revision) of an `hf://org/name[@revision]` source."""
    ref = source.removeprefix("hf://")
    repo, _, revision = ref.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"source={source!r} is not hf://org/name[@revision]")
    return repo, revision or "main"


def hub_version(source: str) -> tuple[str, str]:
    """Return (commit sha, fingerprint) of an hf:// source from one model_info call (files_metadata: each file's
    LFS sha256, or its git blob id for a small file), reading nothing else."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    repo, revision = parse_hf(source)
    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    kept = filter_repo_objects(sorted(siblings), allow_patterns=HF_ALLOW, ignore_patterns=HF_IGNORE)
    rows = [(path, siblings[path].lfs.sha256 if siblings[path].lfs else siblings[path].blob_id) for path in kept]
    if not rows:
        raise TeacherError(f"{source}: the hub lists no diffusers files (model_index.json, */*.safetensors) at "
                           f"{revision}")
    return info.sha, f"hf:{repo}:sha256:" + hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()


def validate(cfg: DownloadTeacherConfig) -> None:
    """Raise a one-line ValueError for a config that cannot work, before anything is fetched."""
    if not cfg.source:
        raise ValueError("source is empty: give hf://org/name[@revision], s3://bucket/key or a local directory")
    if not cfg.dest:
        raise ValueError("dest is empty: give the URI to publish the teacher to")
    if cfg.source.startswith("hf://"):
        parse_hf(cfg.source)
    elif not storage.is_s3(cfg.source) and not Path(storage.local_path(cfg.source)).is_dir():
        raise FileNotFoundError(f"source={cfg.source!r}: no such directory")


def run(cfg: DownloadTeacherConfig) -> DownloadTeacherResult:
    """Publish the teacher at cfg.source to cfg.dest unless cfg.dest already holds the same fingerprint."""
    validate(cfg)
    existing = fingerprint(cfg.dest)
    with tempfile.TemporaryDirectory(prefix="sidflow-teacher-") as tmp:
        if cfg.source.startswith("hf://"):
            from huggingface_hub import snapshot_download

            sha, fp = hub_version(cfg.source)  # the commit the files are then taken from: a branch may move
            if fp == existing:
                return DownloadTeacherResult(cfg.dest, fp, skipped=True)
            src = Path(tmp) / "teacher"
            snapshot_download(parse_hf(cfg.source)[0], revision=sha, local_dir=src, allow_patterns=HF_ALLOW,
                              ignore_patterns=HF_IGNORE)
            shutil.rmtree(src / ".cache", ignore_errors=True)  # huggingface_hub's locks and metadata, not the teacher's
            _write_info(src, cfg.source, fp, commit=sha)
        elif storage.is_s3(cfg.source):
            manifest = storage.read_manifest(cfg.source)
            src = Path(tmp) / "teacher"
            if manifest is not None:
                if fingerprint(cfg.source) == existing:  # a hub teacher keeps its hub fingerprint
                    return DownloadTeacherResult(cfg.dest, existing, skipped=True)
                storage.fetch_dir(cfg.source, str(src))
            else:  # a teacher uploaded by hand (aws s3 sync): no manifest to verify against; its listing names it
                rows = storage.list_stats(cfg.source)
                if not rows:
                    raise FileNotFoundError(f"{cfg.source}: no files to download")
                fp = listing_fingerprint(rows)
                if fp == existing:
                    return DownloadTeacherResult(cfg.dest, fp, skipped=True)
                storage.download_dir(cfg.source, str(src))
                _write_info(src, cfg.source, fp)
        else:
            src = Path(storage.local_path(cfg.source))
            if (src / INFO_FILE).is_file():  # a hub teacher keeps its hub commit, as fingerprint(dest) will say
                digest = json.loads((src / INFO_FILE).read_text())["fingerprint"]
            else:
                digest = "sha256:" + storage.manifest_digest(storage.build_manifest(str(src)))
            if digest == existing:
                return DownloadTeacherResult(cfg.dest, digest, skipped=True)
        check_teacher_dir(src)
        storage.publish_dir(str(src), cfg.dest)
    fp = fingerprint(cfg.dest)
    assert fp is not None, "publish_dir returned without a manifest"
    return DownloadTeacherResult(cfg.dest, fp, skipped=False)


def _write_info(src: Path, source: str, fp: str, **extra) -> None:
    (src / INFO_FILE).write_text(json.dumps({"source": source, "fingerprint": fp, **extra}))
