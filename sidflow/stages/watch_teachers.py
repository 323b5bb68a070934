"""Stage `watch_teachers`: list the teachers whose current version has no registered distillation yet.

A teacher's fingerprint is computed without downloading it where possible, exactly as `download_teacher` will
record it: the hub commit sha for `hf://` sources, the stored fingerprint of a published directory, or the content
digest ("sha256:" + manifest digest) of a local directory. A teacher whose fingerprint is already registered for
`model_name` is skipped; one whose fingerprint cannot be known without downloading (an S3 prefix without a
manifest) is reported as new with fingerprint None.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sidflow import registry, storage
from sidflow.config import param
from sidflow.stages.download_teacher import parse_hf
from sidflow.teacher import INFO_FILE, fingerprint


@dataclass(frozen=True)
class WatchTeachersConfig:
    teachers: str = param("", "comma-separated teacher sources: hf://org/name@rev, s3://..., or local paths")
    registry: str = param("", "registry URI holding <model_name>: s3://bucket/prefix or a path, mlflow+http(s)://"
                              "host:port, kubeflow-mr+http(s)://host:port")
    model_name: str = param("sid-generator", "registered model name whose teacher fingerprints are skipped")
    artifact_root: str = param("", "artifact root URI; a new teacher is published to <artifact_root>/teachers/<slug>")


@dataclass(frozen=True)
class WatchTeachersResult:
    new: list[dict]  # {"source", "dest", "fingerprint" (None if unknown without a download)}


def sources(cfg: WatchTeachersConfig) -> list[str]:
    """Return the teacher sources of cfg.teachers, stripped, empty entries dropped."""
    return [s.strip() for s in cfg.teachers.split(",") if s.strip()]


def slug(source: str) -> str:
    """Return a one-segment name for a teacher source: `hf://org/name@rev` -> `org--name@rev`."""
    ref = re.sub(r"^[a-z0-9]+://", "", source.strip()).strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", ref).strip("-") or "teacher"


def validate(cfg: WatchTeachersConfig) -> None:
    """Raise a one-line ValueError for a config that cannot work, before anything is read."""
    if not sources(cfg):
        raise ValueError("teachers is empty: give comma-separated hf://org/name@rev, s3://... or local paths")
    for name in ("registry", "artifact_root"):
        if not getattr(cfg, name):
            raise ValueError(f"{name} is empty: {WatchTeachersConfig.__dataclass_fields__[name].metadata['help']}")
    registry.check_name(cfg.model_name)
    for source in sources(cfg):
        if source.startswith("hf://"):
            parse_hf(source)
        elif not storage.is_s3(source) and not Path(storage.local_path(source)).is_dir():
            raise ValueError(f"teachers: source={source!r} is not a directory, hf://org/name[@rev] or s3:// URI")


def current_fingerprint(source: str) -> str | None:
    """Return the fingerprint download_teacher would record for `source`, None if only a download can tell."""
    if source.startswith("hf://"):
        from huggingface_hub import HfApi

        repo, revision = parse_hf(source)
        return f"hf:{repo}@{HfApi().model_info(repo, revision=revision).sha}"
    if storage.is_s3(source):
        return fingerprint(source)  # None for a prefix without a manifest (uploaded by hand)
    src = Path(storage.local_path(source))
    if (src / INFO_FILE).is_file():
        return json.loads((src / INFO_FILE).read_text())["fingerprint"]
    return "sha256:" + storage.manifest_digest(storage.build_manifest(str(src)))


def run(cfg: WatchTeachersConfig) -> WatchTeachersResult:
    """Return the teachers of cfg.teachers whose fingerprint is not registered yet for cfg.model_name."""
    validate(cfg)
    done = registry.fingerprints(cfg.registry, cfg.model_name)
    new = []
    for source in sources(cfg):
        fp = current_fingerprint(source)
        if fp is None or fp not in done:
            new.append({"source": source, "dest": storage.join(cfg.artifact_root, "teachers", slug(source)),
                        "fingerprint": fp})
    return WatchTeachersResult(new)
