"""What every registry backend shares: the version record, the name and metric checks, and the promotion rule.

A backend stores these records its own way (S3 objects, MLflow model versions, Kubeflow Model Registry versions);
which model is crowned is decided here, by `beats`, the same for all of them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from sidflow.storage import StorageError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Version:
    """One registered model version: the content of versions/<n>/version.json."""

    version: int
    model_uri: str
    metrics: dict
    teacher_fingerprint: str
    run_id: str
    created: str
    model_card: str = ""
    config: dict | None = None

    def to_dict(self) -> dict:
        """Return the record as a JSON-ready dict."""
        return dataclasses.asdict(self)


def from_record(record: dict) -> Version:
    # Unknown keys (the claim token, fields of a newer sidflow) are ignored, so old readers keep working.
    return Version(**{f.name: record[f.name] for f in dataclasses.fields(Version) if f.name in record})


def check_name(name: str) -> None:
    """Raise a one-line ValueError unless `name` can be a registered model name (one path segment)."""
    if not _NAME.fullmatch(name or ""):
        raise ValueError(f"model name {name!r} must be one path segment of letters, digits, '.', '_', '-'")


# What a metric can be: FID is a squared distance (≥ 0); CLIP score is a cosine and prompt accuracy a fraction.
_BOUNDS = {"fid": (0.0, math.inf), "clip": (-1.0, 1.0)}


def check_metrics(metrics: dict) -> None:
    """Raise a one-line ValueError if a metric is not a finite number, or outside what it can be (FID < 0, CLIP
    outside [-1, 1]): such a record would be crowned, or could never be replaced."""
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if key in _BOUNDS:
                raise ValueError(f"metric {key}={value!r} is not a number")
            continue
        lo, hi = _BOUNDS.get(key, (-math.inf, math.inf))
        if not math.isfinite(value) or not lo <= value <= hi:
            allowed = "a finite number" if key not in _BOUNDS else f"finite and within [{lo}, {hi}]"
            raise ValueError(f"metric {key}={value!r} is refused: it must be {allowed}")




def beats(challenger: dict, champion: dict | None, fid_key: str = "fid", clip_key: str = "clip",
          clip_floor: float | None = None) -> bool:
    """True if metrics `challenger` should replace `champion`: CLIP at least clip_floor (if set), then lower FID."""
    if not isinstance(challenger.get(fid_key), (int, float)):
        raise ValueError(f"challenger metrics have no numeric {fid_key!r} (keys: {sorted(challenger)})")
    check_metrics(challenger)
    if clip_floor is not None:
        clip = challenger.get(clip_key)
        if not isinstance(clip, (int, float)) or not clip >= clip_floor:  # absolute: it holds for a first model too
            return False
    held = champion.get(fid_key) if champion else None
    # A champion crowned with an impossible FID (NaN, negative: before sidflow refused them) never blocks a real one.
    if not isinstance(held, (int, float)) or not math.isfinite(held) or held < 0:
        return True
    return challenger[fid_key] < champion[fid_key]  # a tie keeps the champion




class RegistryError(StorageError):
    """A registry server or network fault a user must fix (unreachable, refused credentials, server error): one
    line naming the registry. A StorageError, so the CLI reports it as it reports an S3 fault."""
