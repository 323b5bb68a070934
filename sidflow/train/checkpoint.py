"""Checkpoints: the whole resume state, published under `<output>/checkpoints/checkpoint-<kimg>/`.

A checkpoint is written to a local staging directory and published with `storage.publish_dir`, which writes
the manifest last; "latest" is the newest directory that has a manifest, so a torn write is never resumed.
"""

import re
import tempfile
from pathlib import Path

import torch

from sidflow import storage

NAME = re.compile(r"^checkpoint-(\d{9})$")


def name_for(nimg: int) -> str:
    """Return the directory name of a checkpoint taken after `nimg` generator images (kimg-sortable)."""
    return f"checkpoint-{nimg:09d}"


def latest(output: str) -> str | None:
    """Return the URI of the newest complete checkpoint under output/checkpoints, or None."""
    root = storage.join(output, "checkpoints")
    names = sorted((n for n in storage.listdir(root) if NAME.match(n.rstrip("/"))), reverse=True)
    for n in names:
        uri = storage.join(root, n.rstrip("/"))
        if storage.read_manifest(uri) is not None:
            return uri
    return None


def save(output: str, nimg: int, state: dict) -> str:
    """Publish `state` (a dict of tensors/state dicts/plain values) as a checkpoint; return its URI."""
    uri = storage.join(output, "checkpoints", name_for(nimg))
    with tempfile.TemporaryDirectory(prefix="sidflow-ckpt-") as tmp:
        torch.save(state, Path(tmp) / "state.pt")
        storage.publish_dir(tmp, uri)
    return uri


def load(uri: str, map_location="cpu") -> dict:
    """Return the state dict of the checkpoint at `uri`, verified against its manifest."""
    with tempfile.TemporaryDirectory(prefix="sidflow-ckpt-") as tmp:
        storage.fetch_dir(uri, tmp)
        return torch.load(Path(tmp) / "state.pt", map_location=map_location, weights_only=False)
