"""Stage `download_teacher`: copy a teacher once into the artifact store, fingerprinted.

Sources: `hf://org/name@revision` (huggingface_hub, honouring HF_TOKEN / HF_ENDPOINT), `s3://...`, or a local
path. The fingerprint is the hub commit sha for hub sources and the content digest (sha256 over the manifest's
path/size/sha256 list) otherwise; a destination that already holds that fingerprint makes the stage a no-op.
"""

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sidflow import storage
from sidflow.config import param
from sidflow.teacher import INFO_FILE, check_teacher_dir, fingerprint

# Diffusers weights only: no fp16/non-EMA variants, no single-file .ckpt (SD1.5's repo holds ~40 GB of those).
HF_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
HF_IGNORE = ["*.fp16.*", "*non_ema*", "*.ckpt", "*.bin", "*.onnx*", "*.msgpack"]


@dataclass(frozen=True)
class DownloadTeacherConfig:
    source: str = param("", "teacher to fetch: hf://org/name[@revision], s3://bucket/key or a local directory")
    dest: str = param("", "URI the teacher is published to (s3://... or a local path); a manifest is written last")


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
            from huggingface_hub import HfApi, snapshot_download

            repo, revision = parse_hf(cfg.source)
            sha = HfApi().model_info(repo, revision=revision).sha  # resolve a branch to its commit before copying
            fp = f"hf:{repo}@{sha}"
            if fp == existing:
                return DownloadTeacherResult(cfg.dest, fp, skipped=True)
            src = Path(tmp) / "teacher"
            snapshot_download(repo, revision=sha, local_dir=src, allow_patterns=HF_ALLOW, ignore_patterns=HF_IGNORE)
            (src / INFO_FILE).write_text(json.dumps({"source": cfg.source, "fingerprint": fp}))
        elif storage.is_s3(cfg.source):
            manifest = storage.read_manifest(cfg.source)
            if manifest is not None and fingerprint(cfg.source) == existing:  # a hub teacher keeps its hub commit
                return DownloadTeacherResult(cfg.dest, existing, skipped=True)
            src = Path(tmp) / "teacher"
            if manifest is not None:
                storage.fetch_dir(cfg.source, str(src))
            else:  # a teacher uploaded by hand (aws s3 sync): no manifest to verify against
                storage.download_dir(cfg.source, str(src))
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
