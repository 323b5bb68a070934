"""Local copies of the files evaluators load by path (Inception TorchScript, OpenCLIP weights, toy evaluator).

A local path is used where it is; an s3:// URI is fetched once into $SIDFLOW_CACHE/eval/ (a temp directory by
default), keyed by the URI, through a temp name and a rename so concurrent ranks never read half a file.
Delete the cache entry to fetch a changed object again.
"""

import hashlib
from pathlib import Path

from sidflow import storage


def _slot(uri: str) -> Path:
    return storage.cache_root() / "eval" / hashlib.sha256(uri.encode()).hexdigest()[:16]


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
    if storage.read_manifest(uri) is None and not storage.list_files(uri):
        raise FileNotFoundError(f"{what}: no files under {uri}")
    return storage.fetch_dir_once(uri, _slot(uri))
