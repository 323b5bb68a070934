"""Local copies of the files evaluators load by path (Inception TorchScript, OpenCLIP weights, toy evaluator).

A local path is used where it is; an s3:// URI is fetched once into $SIDFLOW_CACHE/eval/ (a temp directory by
default), keyed by the URI, through a temp name and a rename so concurrent ranks never read half a file.
Delete the cache entry to fetch a changed object again.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from sidflow import storage


def cache_root() -> Path:
    """The directory remote evaluator files are fetched into."""
    return Path(os.environ.get("SIDFLOW_CACHE", Path(tempfile.gettempdir()) / "sidflow-cache")) / "eval"


def _slot(uri: str) -> Path:
    return cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16]


def local_file(uri: str, what: str) -> str:
    """Return a local path holding the file at `uri`; FileNotFoundError naming `what` if there is none."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"{what}: no file at {uri}")
    if not storage.is_s3(uri):
        return storage.local_path(uri)
    dst = _slot(uri) / uri.rstrip("/").rsplit("/", 1)[-1]
    if not dst.is_file():
        storage.download_file(uri, str(dst))  # boto3 writes a temp name and renames it into place
    return str(dst)


def local_dir(uri: str, what: str) -> str:
    """Return a local directory holding the directory at `uri` (published or plain); FileNotFoundError if empty."""
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{what}: no directory at {uri}")
        return path
    dst = _slot(uri)
    if not dst.is_dir():
        published = storage.read_manifest(uri) is not None
        if not published and not storage.list_files(uri):
            raise FileNotFoundError(f"{what}: no files under {uri}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dst.parent))
        if published:
            storage.fetch_dir(uri, str(tmp))  # verified against the manifest
        else:
            storage.download_dir(uri, str(tmp))
        try:
            os.replace(tmp, dst)
        except OSError:  # another rank won the race; its copy is complete
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dst)


def file_sha256(path: str) -> str:
    """sha256 hex of a local file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()
