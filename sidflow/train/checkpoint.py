"""Checkpoints: the whole resume state, published under `<output>/checkpoints/checkpoint-<nimg>/`.

A checkpoint is written to a local staging directory and published with `storage.publish_dir`, which writes
the manifest last; "latest" is the newest directory that has a manifest, so a torn write is never resumed. A checkpoint
is loaded with `weights_only=True`: tensors, state dicts and plain values pass, anything else in the pickle (code an
attacker with write access to the output prefix planted) is refused instead of run.
"""

import pickle
import re
import sys
import tempfile
from pathlib import Path

import torch

from sidflow import storage

NAME = re.compile(r"^checkpoint-(\d{9})$")


def name_for(nimg: int) -> str:
    """Return the directory name of a checkpoint taken after `nimg` generator images (kimg-sortable)."""
    return f"checkpoint-{nimg:09d}"


def complete(output: str) -> list[str]:
    """Return the URIs of the complete (manifest-bearing) checkpoints under output/checkpoints, newest first."""
    root = storage.join(output, "checkpoints")
    names = sorted((n.rstrip("/") for n in storage.listdir(root) if NAME.match(n.rstrip("/"))), reverse=True)
    out = []
    for uri in (storage.join(root, n) for n in names):
        try:
            if storage.read_manifest(uri) is not None:
                out.append(uri)
        except ValueError as exc:  # a damaged manifest: that checkpoint is not complete
            print(f"sidflow: {exc}; ignoring that checkpoint", file=sys.stderr)
    return out


def latest(output: str) -> str | None:
    """Return the URI of the newest complete checkpoint under output/checkpoints, or None."""
    found = complete(output)
    return found[0] if found else None


RUN_FILE = "run.json"  # what the checkpoint belongs to (config, teacher fingerprint, nimg): read without state.pt


def save(output: str, nimg: int, state: dict, run: dict, keep: int | None = None) -> str:
    """Publish `state` (a dict of tensors/state dicts/plain values) and `run` (JSON) as a checkpoint; return its URI.
    With `keep`, then delete all but the newest `keep` complete checkpoints (the new one is published first)."""
    import json

    uri = storage.join(output, "checkpoints", name_for(nimg))
    with tempfile.TemporaryDirectory(prefix="sidflow-ckpt-") as tmp:
        torch.save(state, Path(tmp) / "state.pt")
        (Path(tmp) / RUN_FILE).write_text(json.dumps(run, indent=1, sort_keys=True))
        storage.publish_dir(tmp, uri)
    if keep:
        for old in complete(output)[keep:]:
            storage.delete_tree(old)  # manifest first: readers stop seeing it before its state goes
    return uri


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose pickle holds more than tensors and plain values: refused, and never skipped silently."""


def load(uri: str, map_location="cpu") -> dict:
    """Return the state dict of the checkpoint at `uri`, verified against its manifest. Raise UnsafeCheckpoint for a
    pickle that would run code, a one-line ValueError for a damaged checkpoint."""
    with tempfile.TemporaryDirectory(prefix="sidflow-ckpt-") as tmp:
        storage.fetch_dir(uri, tmp)
        try:
            return torch.load(Path(tmp) / "state.pt", map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():
                raise UnsafeCheckpoint(f"checkpoint {uri} is refused: its state.pt holds objects other than tensors "
                                       "and plain values, which loading would execute; delete it if you did not "
                                       "write it") from None
            raise ValueError(f"checkpoint {uri} is damaged ({str(exc).splitlines()[0][:120]})") from None
        except (RuntimeError, EOFError) as exc:
            raise ValueError(f"checkpoint {uri} is damaged ({str(exc).splitlines()[0][:120]})") from None


def run_info(uri: str) -> dict | None:
    """Return the run.json of the checkpoint at `uri` (None for checkpoints written before sidflow kept one)."""
    import json

    manifest = storage.read_manifest(uri)
    if manifest is None or RUN_FILE not in {f["path"] for f in manifest["files"]}:
        return None
    return json.loads(storage.read_text(storage.join(uri, RUN_FILE)))


def load_latest(output: str, map_location="cpu") -> tuple[str, dict] | None:
    """Return (uri, state) of the newest checkpoint that loads, falling back past damaged ones (each one said on
    stderr); None if there is no complete checkpoint. An unsafe checkpoint stops the search: UnsafeCheckpoint."""
    for uri in complete(output):
        try:
            return uri, load(uri, map_location)
        except UnsafeCheckpoint:
            raise
        except ValueError as exc:
            print(f"sidflow: {exc}; resuming from the checkpoint before it", file=sys.stderr)
    return None
