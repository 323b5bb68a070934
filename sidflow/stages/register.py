"""Stage `register`: record an evaluated model as a new registry version, and promote it if it passes the gate.

Registration always happens; promotion to `champion` depends on `promote`: "auto" promotes only a model whose FID
is lower than the champion's (and whose CLIP score meets `clip_floor`, if set), "always" promotes, "never" does not.
The model card (README.md) and the training info (sidflow.json) are read from the published model directory.
"""

import json
import math
from dataclasses import dataclass
from typing import Literal

from sidflow import registry, storage
from sidflow.config import param

MODEL_CARD, MODEL_INFO = "README.md", "sidflow.json"  # written by sidflow.generator.export_generator


@dataclass(frozen=True)
class RegisterConfig:
    """Where to register which model, with which metrics, and how to decide its promotion."""

    registry: str = param("", "registry URI: s3://bucket/prefix or a path (sidflow's own), mlflow+http(s)://host:port "
                              "(MLflow), kubeflow-mr+http(s)://host:port (Kubeflow Model Registry)", required=True)
    model_name: str = param("sid-generator", "registered model name: one path segment (letters, digits, . _ -)")
    model: str = param("", "URI of the published model directory (has manifest.json), e.g. the distill output's model/",
                       required=True)
    metrics: str = param("", "URI of the evaluation metrics.json: a JSON object with at least 'fid' (and 'clip')",
                         required=True)
    teacher_fingerprint: str = param("", "fingerprint of the distilled teacher; empty: the one in the model's "
                                         "sidflow.json (watch_teachers skips teachers registered with it)")
    run_id: str = param("", "pipeline run id recorded with the version")
    clip_floor: float | None = param(None, "minimum CLIP score a model needs to be promoted; None: no floor")
    promote: Literal["auto", "always", "never"] = param(
        "auto", "auto: promote only if FID beats the champion's (and CLIP meets clip_floor); always; never")


@dataclass(frozen=True)
class RegisterResult:
    """The version number given, whether it became champion, and the champion's version afterwards."""

    version: int
    promoted: bool
    champion_version: int | None


def _read_metrics(uri: str) -> dict:
    try:
        metrics = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"metrics={uri!r} is not valid JSON ({exc})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics={uri!r} must hold a JSON object of metric names to numbers")
    return metrics


def validate(cfg: RegisterConfig) -> None:
    """Raise a one-line error for a config that cannot work, before anything is registered."""
    for field in ("registry", "model", "metrics"):
        if not getattr(cfg, field):
            raise ValueError(f"{field} is empty: {RegisterConfig.__dataclass_fields__[field].metadata['help']}")
    registry.check_name(cfg.model_name)
    try:  # an unpublished, half-published or altered directory is no model
        storage.verify_published(cfg.model)
    except FileNotFoundError:
        raise FileNotFoundError(f"model={cfg.model!r} has no manifest.json: not a published model directory") from None
    metrics = _read_metrics(cfg.metrics)
    try:
        registry.check_metrics(metrics)
    except ValueError as exc:
        raise ValueError(f"metrics={cfg.metrics!r}: {exc}") from None
    if cfg.clip_floor is not None and not math.isfinite(cfg.clip_floor):
        raise ValueError(f"clip_floor={cfg.clip_floor} must be a finite number (None: no floor)")
    if cfg.promote == "auto" and not isinstance(metrics.get("fid"), (int, float)):
        raise ValueError(f"metrics={cfg.metrics!r} has no numeric 'fid' (keys: {sorted(metrics)}); "
                         "promote='auto' compares FID: give it, or use promote='always' or 'never'")
    registry.check(cfg.registry)  # last: it asks the server (reachable, credentials accepted)


def run(cfg: RegisterConfig) -> RegisterResult:
    """Register the model at cfg.model with its metrics; promote it to champion as cfg.promote says."""
    validate(cfg)
    published = {f["path"] for f in storage.read_manifest(cfg.model)["files"]}  # readers take only listed files
    card = storage.read_text(storage.join(cfg.model, MODEL_CARD)) if MODEL_CARD in published else ""
    info = json.loads(storage.read_text(storage.join(cfg.model, MODEL_INFO))) if MODEL_INFO in published else {}
    trained_on = info.get("teacher_fingerprint")
    if trained_on == "unpublished":  # the training loop's word for a teacher it could not fingerprint
        trained_on = None
    if cfg.teacher_fingerprint and trained_on not in (None, cfg.teacher_fingerprint):
        raise ValueError(f"teacher_fingerprint={cfg.teacher_fingerprint!r} differs from {trained_on!r}, the teacher "
                         f"{cfg.model}/{MODEL_INFO} was distilled from")
    version = registry.register(cfg.registry, cfg.model_name, cfg.model, _read_metrics(cfg.metrics),
                                cfg.teacher_fingerprint or trained_on or "", cfg.run_id, model_card=card,
                                config=info.get("config"))
    promoted = cfg.promote != "never" and registry.promote(
        cfg.registry, cfg.model_name, version.version, require_better=cfg.promote == "auto", clip_floor=cfg.clip_floor)
    held = registry.champion(cfg.registry, cfg.model_name)
    return RegisterResult(version.version, promoted, held.version if held else None)
