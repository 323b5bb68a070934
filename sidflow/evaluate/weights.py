"""Stage the evaluator's weights once, from a machine with internet, for clusters without it.

Evaluate loads two weight files: clean-fid's TF-Inception TorchScript (`inception_weights`, always a URI) and the
OpenCLIP checkpoint (`clip_weights`: a pretrained tag, which open_clip downloads from the Hugging Face hub at run time,
or a URI). `sidflow data stage-weights --dest s3://bucket/weights` copies both to `dest` and prints the two URIs to
pass as `inception_weights` and `clip_weights`; with them nothing is downloaded at run time. The OpenCLIP file comes
through huggingface_hub, so HF_ENDPOINT (a mirror) and HF_TOKEN apply; the Inception file from `inception_url`.
"""

import json
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sidflow import storage
from sidflow.config import param
from sidflow.evaluate.features import INCEPTION_FILE, INCEPTION_URL


@dataclass(frozen=True)
class StageWeightsConfig:
    dest: str = param("", "URI (s3://... or a local directory) the weight files are copied to", required=True)
    clip_model: str = param("ViT-g-14", "OpenCLIP architecture whose pretrained weights are staged")
    clip_weights: str = param("laion2b_s12b_b42k", "OpenCLIP pretrained tag of clip_model to stage")
    inception_url: str = param(INCEPTION_URL, f"where {INCEPTION_FILE} (clean-fid's TF-Inception) is downloaded from")


def validate(cfg: StageWeightsConfig) -> None:
    """Raise a one-line ValueError for a config that cannot work, before anything is downloaded."""
    import open_clip

    if not cfg.dest:
        raise ValueError("dest is empty: give the URI to copy the weight files to (s3://... or a local directory)")
    if cfg.clip_model not in open_clip.list_models():
        raise ValueError(f"clip_model={cfg.clip_model!r} is not an OpenCLIP architecture")
    tags = open_clip.list_pretrained_tags_by_model(cfg.clip_model)
    if cfg.clip_weights not in tags:
        raise ValueError(f"clip_weights={cfg.clip_weights!r} is not a pretrained tag of {cfg.clip_model} ({tags})")


def stage(cfg: StageWeightsConfig) -> dict:
    """Copy the OpenCLIP checkpoint and the Inception TorchScript to cfg.dest; return {"clip_weights",
    "inception_weights"}: the URIs evaluate takes."""
    import open_clip

    validate(cfg)
    with tempfile.TemporaryDirectory(prefix="sidflow-weights-") as tmp:
        clip = open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(cfg.clip_model, cfg.clip_weights),
                                                        cache_dir=tmp)
        # open_clip_pytorch_model.bin or open_clip_model.safetensors: the name keeps the format open_clip reads it by
        clip_uri = storage.join(cfg.dest, f"{cfg.clip_model}-{cfg.clip_weights}", Path(clip).name)
        storage.upload_file(clip, clip_uri)
        inception = Path(tmp) / INCEPTION_FILE
        with urllib.request.urlopen(cfg.inception_url, timeout=60) as answer, open(inception, "wb") as f:
            shutil.copyfileobj(answer, f)
        inception_uri = storage.join(cfg.dest, INCEPTION_FILE)
        storage.upload_file(str(inception), inception_uri)
    return {"clip_weights": clip_uri, "inception_weights": inception_uri}


def summary(staged: dict) -> str:
    """Return the staged URIs as one JSON line."""
    return json.dumps(staged)
