"""One API over `s3://bucket/key` URIs and local paths (plain or `file://`); nothing else in sidflow calls boto3.

Published directories. `publish_dir` writes every file first and `manifest.json` (paths, sizes, sha256) last.
A directory without a manifest does not exist to readers: `fetch_dir` refuses it, `read_manifest` returns None.
A re-publish deletes the old manifest before it writes any file, so no reader ever sees an old manifest over
new files; a killed publish leaves files without a manifest, which readers ignore. Files left over from an
older publish are harmless: readers take exactly the files the manifest lists, and verify each one.

S3 settings come from boto3's standard sources (AWS_ENDPOINT_URL[_S3], AWS_REGION / AWS_DEFAULT_REGION,
credentials, ~/.aws/config), so MinIO, SeaweedFS and moto work unchanged. Path-style addressing is used when an
endpoint override is set in the environment; AWS_S3_ADDRESSING_STYLE (auto|path|virtual) forces a style. A server
that rejects boto3's default CRC checksums wants AWS_REQUEST_CHECKSUM_CALCULATION=when_required (boto3's own).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from sidflow import failpoints

MANIFEST = "manifest.json"
_MiB = 2**20
_TRANSFER = TransferConfig(multipart_threshold=8 * _MiB, multipart_chunksize=8 * _MiB, max_concurrency=8)
_WORKERS = 8  # files in flight in upload_dir / download_dir / publish_dir / fetch_dir
_client = None
_client_lock = threading.Lock()


class _MissingKey(FileNotFoundError):
    """A missing file or object (the bucket itself exists), so exists() and read_manifest() can say no."""


class StorageError(OSError):
    """An S3 server or network fault a user must fix (credentials, endpoint, server errors); one line naming the URI."""


# URIs -----------------------------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    """True for an `s3://bucket/key` URI, False for a local path or `file://` URI."""
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI or path with exactly one `/` between them."""
    out = str(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def local_path(uri: str) -> str:
    """The local filesystem path of a plain path or `file://` URI."""
    return str(_local(uri))


def _local(uri) -> Path:
    uri = str(uri)
    if is_s3(uri):
        raise ValueError(f"{uri} is an s3 URI, not a local path")
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: an s3 URI needs a bucket (s3://bucket/key)")
    return bucket, key


def _dir_key(key: str) -> str:
    # "a/b" must list "a/b/x", never "a/bc": a directory prefix always ends in "/".
    return key.rstrip("/") + "/" if key.strip("/") else ""


# S3 client and errors -------------------------------------------------------------------------------------------


def _addressing_style() -> str | None:
    style = os.environ.get("AWS_S3_ADDRESSING_STYLE")
    if style:
        if style not in ("auto", "path", "virtual"):
            raise ValueError(f"AWS_S3_ADDRESSING_STYLE={style!r}: expected one of auto, path, virtual")
        return style
    # Local S3 servers (MinIO, SeaweedFS, moto) rarely resolve bucket.host names; AWS itself wants "auto".
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return "path"
    return None  # leave botocore's default, or an addressing_style set in ~/.aws/config, in force


def _s3():
    global _client
    if _client is None:
        with _client_lock:  # threads of one transfer pool may race to build the first client
            if _client is None:
                style = _addressing_style()
                config = Config(
                    # Bounded: an unreachable endpoint fails within ~30 s, not minutes ("adaptive" is experimental).
                    retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    s3={"addressing_style": style} if style else None,
                    # _WORKERS files at once, each in up to max_concurrency parts: one connection per part.
                    max_pool_connections=_WORKERS * _TRANSFER.max_concurrency,
                )
                # A fresh Session re-reads the environment, which reset_client() relies on.
                client = boto3.session.Session().client("s3", config=config)
                client.meta.events.register("before-sign.s3.DeleteObjects", _content_md5)
                _client = client
    return _client


def _content_md5(request, **_) -> None:
    # MinIO-class servers (and the JuiceFS gateway) refuse DeleteObjects without Content-MD5, which botocore
    # stopped sending in 1.36 (it sends a CRC32 checksum instead); S3 itself accepts either.
    import base64

    body = request.body.encode() if isinstance(request.body, str) else request.body
    if isinstance(body, bytes) and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def reset_client() -> None:
    """Forget the cached S3 client so the next call rebuilds it from the current environment."""
    global _client
    with _client_lock:
        _client = None
        _PROBED.clear()


@contextlib.contextmanager
def _s3_errors(uri: str):
    """Turn S3 faults into one-line OSErrors naming the URI and the cause: a missing bucket or key, refused access or
    credentials, an unreachable endpoint or a failing server (after botocore's bounded retries)."""
    try:
        yield
    except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
        # boto3 wraps upload failures in S3UploadFailedError; the botocore error is its __context__.
        err = exc.__context__ if isinstance(exc, S3UploadFailedError) else exc
        out = _one_line(uri, err) if isinstance(err, (ClientError, BotoCoreError)) else err
        if out is err:
            raise
        raise out from None


def _one_line(uri: str, err: Exception) -> OSError | Exception:
    if isinstance(err, NoCredentialsError):
        return PermissionError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                               "or a profile or role)")
    if isinstance(err, BotoCoreError):  # endpoint unreachable, timeouts: botocore has already retried
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint} after retries ({type(err).__name__})")
    code = str(err.response.get("Error", {}).get("Code", ""))
    status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    bucket = _split(uri)[0]
    if code == "NoSuchBucket" or (code in ("404", "NotFound") and not _bucket_exists(bucket)):
        return FileNotFoundError(f"s3 bucket '{bucket}' does not exist (uri {uri})")
    if code in ("NoSuchKey", "404", "NotFound"):
        return _MissingKey(f"{uri}: no such object")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
        return PermissionError(f"{uri}: the S3 server refused the credentials ({code}); check AWS_ACCESS_KEY_ID, "
                               "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN")
    if code in ("403", "AccessDenied", "Forbidden"):
        return PermissionError(f"{uri}: access denied")
    if status >= 500:
        return StorageError(f"{uri}: the S3 server keeps failing ({code or status}) after retries")
    return err  # anything else (a 412 the caller asked for, a 409 conflict) is the caller's to read


def _bucket_exists(bucket: str) -> bool:
    # HEAD answers carry no error body, so a 404 from head_object cannot tell a missing bucket from a missing key.
    try:
        _s3().head_bucket(Bucket=bucket)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket", "NotFound"):
            return False
        return True  # 403 and the like: the bucket is there, the caller's error says what is wrong
    return True


# Files ----------------------------------------------------------------------------------------------------------


def read_bytes(uri: str) -> bytes:
    """The whole content of a file or object."""
    if not is_s3(uri):
        try:
            return _local(uri).read_bytes()
        except FileNotFoundError as exc:
            raise _MissingKey(f"{uri}: no such file") from exc
    bucket, key = _split(uri)
    with _s3_errors(uri):
        return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file or object whole; a local file is replaced atomically, creating parent directories."""
    if is_s3(uri):
        bucket, key = _split(uri)
        with _s3_errors(uri):
            _s3().put_object(Bucket=bucket, Key=key, Body=data)
        return
    _replace_atomically(_local(uri), lambda tmp: tmp.write_bytes(data))


def parquet_table(data: bytes):
    """The pyarrow Table of parquet bytes, read on this thread. Arrow's thread pools, once started, can abort the
    process at exit (exit code 134, "terminate called without an active exception") when a worker is still winding
    down as the interpreter tears down. `pq.read_table` goes through Arrow's dataset scanner, which starts a worker
    even with use_threads=False; `ParquetFile.read` starts none. sidflow's tables (prompts, captions, shapes) are
    small enough to read without threads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(use_threads=False)


def read_text(uri: str) -> str:
    """The content of a UTF-8 text file or object."""
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a UTF-8 text file or object whole."""
    write_bytes(uri, text.encode("utf-8"))


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to a URI (multipart above 8 MiB on S3; temp name + rename locally)."""
    if not Path(local_path).is_file():
        raise FileNotFoundError(f"{local_path}: no such file to upload to {uri}")
    if not is_s3(uri):
        _replace_atomically(_local(uri), lambda tmp: shutil.copy2(local_path, tmp))
        return
    bucket, key = _split(uri)
    with _s3_errors(uri):
        _s3().upload_file(str(local_path), bucket, key, Config=_TRANSFER)


def download_file(uri: str, local_path: str) -> None:
    """Copy a file or object at a URI to a local path, creating parent directories."""
    dst = Path(local_path)
    if not is_s3(uri):
        src = _local(uri)
        if not src.is_file():
            raise _MissingKey(f"{uri}: no such file")
        _replace_atomically(dst, lambda tmp: shutil.copy2(src, tmp))
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    bucket, key = _split(uri)
    with _s3_errors(uri):  # boto3 downloads into a temp name and renames it into place itself
        _s3().download_file(bucket, key, str(dst), Config=_TRANSFER)


def exists(uri: str) -> bool:
    """True if a file or object (not a directory prefix) exists at the URI; a missing bucket is an error."""
    if not is_s3(uri):
        return _local(uri).is_file()
    bucket, key = _split(uri)
    try:
        with _s3_errors(uri):
            _s3().head_object(Bucket=bucket, Key=key)
    except _MissingKey:
        return False
    return True


def _replace_atomically(dst: Path, fill) -> None:
    # Fill a temp name, then rename: a reader sees the old file or the new one, never half of one.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        fill(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def delete_file(uri: str) -> None:
    """Remove one file or object; a missing one is fine."""
    if is_s3(uri):
        bucket, key = _split(uri)
        with _s3_errors(uri):
            _s3().delete_object(Bucket=bucket, Key=key)
    else:
        _local(uri).unlink(missing_ok=True)


# Directories ----------------------------------------------------------------------------------------------------


def _s3_list(uri: str, delimiter: str = ""):
    """Yield list_objects_v2 pages under the directory prefix of an s3 URI."""
    bucket, key = _split(uri)
    paginator = _s3().get_paginator("list_objects_v2")
    with _s3_errors(uri):
        yield from paginator.paginate(Bucket=bucket, Prefix=_dir_key(key), Delimiter=delimiter)


def listdir(uri: str) -> list[str]:
    """Sorted names of the files and subdirectories directly under a URI; [] if there are none."""
    if not is_s3(uri):
        path = _local(uri)
        return sorted(os.listdir(path)) if path.is_dir() else []
    prefix = _dir_key(_split(uri)[1])
    names = set()
    for page in _s3_list(uri, delimiter="/"):
        names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
    names.discard("")  # a "directory marker" object named like the prefix itself
    return sorted(names)


def list_files(uri: str) -> list[str]:
    """Sorted posix paths, relative to the URI, of every file below it; [] if there are none."""
    if not is_s3(uri):
        root = _local(uri)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    prefix = _dir_key(_split(uri)[1])
    keys = (o["Key"] for page in _s3_list(uri) for o in page.get("Contents", []))
    return sorted(k[len(prefix) :] for k in keys if not k.endswith("/"))


def list_stats(uri: str) -> list[dict]:
    """Sorted {"path", "size", "etag", "modified"} of every file below a URI (one listing, nothing read); [] if none.

    On S3 the ETag is the server's, quotes stripped (an MD5 for a plain upload, "<md5>-<parts>" for a multipart one),
    "" from a server that keeps none (the JuiceFS gateway lists and HEADs objects without one); "modified" is the
    object's LastModified (ISO 8601), which every upload renews. A local file has no ETag (None) and its mtime.
    """
    if not is_s3(uri):
        root = _local(uri)
        rows = []
        for rel in list_files(uri):
            st = (root / rel).stat()
            rows.append({"path": rel, "size": st.st_size, "etag": None,
                         "modified": datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat()})
        return rows
    prefix = _dir_key(_split(uri)[1])
    rows = [{"path": o["Key"][len(prefix) :], "size": o["Size"], "etag": o.get("ETag", "").strip('"'),
             "modified": o["LastModified"].astimezone(timezone.utc).isoformat()}
            for page in _s3_list(uri) for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return sorted(rows, key=lambda r: r["path"])


def _parallel(fn, items) -> list:
    """Run fn over items in a thread pool, results in order; the first error cancels what has not started."""
    with ThreadPoolExecutor(_WORKERS) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under a local directory to the same relative paths under a URI."""
    if not Path(local_dir).is_dir():
        raise FileNotFoundError(f"{local_dir}: no such directory to upload to {uri}")
    _parallel(lambda rel: upload_file(str(Path(local_dir, rel)), join(uri, rel)), list_files(str(local_dir)))


def download_dir(uri: str, local_dir: str) -> None:
    """Copy every file below a URI into a local directory; an empty or missing source is an error."""
    rels = list_files(uri)
    if not rels:
        raise FileNotFoundError(f"{uri}: no files to download")
    _parallel(lambda rel: download_file(join(uri, rel), str(Path(local_dir, rel))), rels)


def delete_tree(uri: str) -> None:
    """Remove everything under a directory URI, manifest first; a missing directory is fine."""
    if is_s3(uri) and not _dir_key(_split(uri)[1]):
        raise ValueError(f"{uri}: refusing to delete a whole bucket; name a prefix under it")
    delete_file(join(uri, MANIFEST))  # readers stop seeing the directory before its files go
    if not is_s3(uri):
        if _local(uri).is_dir():
            shutil.rmtree(_local(uri))
        return
    bucket, key = _split(uri)
    keys = [join(_dir_key(key), rel) for rel in list_files(uri)]
    for start in range(0, len(keys), 1000):  # delete_objects takes at most 1000 keys a call
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        with _s3_errors(uri):
            errors = _s3().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}).get("Errors", [])
        if errors:
            raise OSError(f"{uri}: {len(errors)} objects not deleted, e.g. {errors[0]['Key']} ({errors[0]['Code']})")


# Published directories ------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """sha256 hex of a local file (the digest manifests record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_MiB), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(src_local_dir: str) -> dict:
    """The manifest a publish of this local directory would write (hashes every file; nothing is written)."""
    src = Path(src_local_dir)
    rels = [rel for rel in list_files(str(src)) if rel != MANIFEST]
    files = _parallel(lambda rel: {"path": rel, "size": (src / rel).stat().st_size, "sha256": sha256_file(src / rel)},
                      rels)
    return {"version": 1, "files": files, "created": datetime.now(timezone.utc).isoformat()}


def publish_dir(src_local_dir: str, uri: str) -> dict:
    """Write every file of a local directory to a URI, then its manifest last; returns the manifest."""
    src = Path(src_local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src_local_dir}: no such directory to publish to {uri}")
    rels = [rel for rel in list_files(str(src)) if rel != MANIFEST]
    delete_file(join(uri, MANIFEST))  # before any file: never an old manifest over new files
    _abort_uploads(uri)  # parts of a killed earlier publish: the server keeps (and bills) them until aborted

    def put(rel: str) -> dict:
        path = src / rel
        entry = {"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)}
        upload_file(str(path), join(uri, rel))
        failpoints.hit("publish:file")
        return entry

    return _write_manifest(uri, _parallel(put, rels))


def publish_files(uri: str, files: list[dict], texts: dict[str, str]) -> dict:
    """Publish a directory whose files were uploaded already (by other processes): `files` are their manifest
    entries (path relative to uri, size, sha256); `texts` small files written here. The manifest goes last, after
    every size is checked; returns it."""
    delete_file(join(uri, MANIFEST))
    entries = list(files)
    if not is_s3(uri):  # on S3, _write_manifest's listing checks every size
        for e in entries:
            path = _local(join(uri, e["path"]))
            if not path.is_file() or path.stat().st_size != e["size"]:
                raise StorageError(f"{join(uri, e['path'])} is missing or not {e['size']} bytes: nothing published")
    for rel, text in texts.items():
        data = text.encode()
        write_bytes(join(uri, rel), data)
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return _write_manifest(uri, entries)


def _write_manifest(uri: str, files: list[dict]) -> dict:
    manifest = {"version": 1, "files": files, "created": datetime.now(timezone.utc).isoformat()}
    _check_written(uri, manifest)
    failpoints.hit("publish:before-manifest")
    text = json.dumps(manifest, indent=1)
    write_text(join(uri, MANIFEST), text)  # last; atomic locally and on S3
    if read_text(join(uri, MANIFEST)) != text:
        delete_file(join(uri, MANIFEST))
        raise StorageError(f"{join(uri, MANIFEST)} reads back different from what was written: {_CHECKSUM_HINT}")
    return manifest


# A server that does not understand boto3's streaming checksums (aws-chunked bodies) stores the chunk framing
# inside the object; boto3's own switch turns them off.
_CHECKSUM_HINT = ("the S3 server stored the upload's chunk framing (it does not support boto3's default checksums); "
                  "set AWS_REQUEST_CHECKSUM_CALCULATION=when_required")


def _check_written(uri: str, manifest: dict, why: str = _CHECKSUM_HINT) -> None:
    # One listing checks every size before the manifest makes the files visible to readers.
    if not is_s3(uri):
        return
    bucket, key = _split(uri)
    sizes = {o["Key"][len(_dir_key(key)) :]: o["Size"] for page in _s3_list(uri) for o in page.get("Contents", [])}
    for entry in manifest["files"]:
        if sizes.get(entry["path"]) != entry["size"]:
            raise StorageError(f"{join(uri, entry['path'])}: {sizes.get(entry['path'])} bytes stored, the manifest "
                               f"says {entry['size']}: {why}")


def _abort_uploads(uri: str) -> None:
    if not is_s3(uri):
        return
    bucket, key = _split(uri)
    with _s3_errors(uri):
        pages = _s3().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=_dir_key(key))
        for upload in (u for page in pages for u in page.get("Uploads", [])):
            _s3().abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def read_manifest(uri: str) -> dict | None:
    """The manifest of a published directory, or None if it has none (never published, or interrupted)."""
    try:
        data = read_bytes(join(uri, MANIFEST))
    except _MissingKey:
        return None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        hint = _CHECKSUM_HINT if is_s3(uri) else "publish the directory again"
        raise ValueError(f"{join(uri, MANIFEST)} is not valid JSON ({str(exc).split(':')[0]}); {hint}") from None
    if manifest.get("version") != 1:
        raise ValueError(f"{join(uri, MANIFEST)}: unknown manifest version {manifest.get('version')!r}")
    return manifest


def fetch_dir(uri: str, dst_local_dir: str) -> dict:
    """Download exactly the files a published directory's manifest lists, verify each, return the manifest."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"{uri} has no manifest.json: not a published directory (an interrupted publish?)")
    dst = Path(dst_local_dir)

    def get(entry: dict) -> None:
        rel = entry["path"]
        if Path(rel).is_absolute() or ".." in Path(rel).parts:  # a manifest must not write outside dst
            raise ValueError(f"{uri}: manifest path {rel!r} leaves the directory")
        download_file(join(uri, rel), str(dst / rel))
        size = (dst / rel).stat().st_size
        if size != entry["size"]:
            raise ValueError(f"{uri}: {rel} is corrupted: {size} bytes, manifest says {entry['size']}")
        if sha256_file(dst / rel) != entry["sha256"]:
            raise ValueError(f"{uri}: {rel} is corrupted: sha256 differs from the manifest")

    _parallel(get, manifest["files"])
    return manifest


def verify_published(uri: str) -> dict:
    """Return the manifest of the published directory at `uri` after checking its files in place: sizes and sha256
    locally, sizes on S3 (one listing; fetch_dir checks digests as it downloads). Raise a one-line error if the
    directory has no manifest or a file differs from it."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"{uri} has no manifest.json: not a published directory (an interrupted publish?)")
    if is_s3(uri):
        _check_written(uri, manifest, "missing or altered since it was published; publish it again")
        return manifest
    root = _local(uri)
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{uri}: {entry['path']} is missing or differs from the manifest; publish it again")
    return manifest


def cache_root() -> Path:
    """Where remote directories and files are fetched to: $SIDFLOW_CACHE, else sidflow-cache in the temp directory."""
    return Path(os.environ.get("SIDFLOW_CACHE", Path(tempfile.gettempdir()) / "sidflow-cache"))


def fetch_dir_once(uri: str, dst: Path) -> str:
    """Fetch the directory at `uri` into `dst` unless `dst` exists; return `dst`.

    Published directories are verified against their manifest (fetch_dir), plain ones copied (download_dir). The copy
    is made beside `dst` and renamed into place, so processes fetching at once never see half a directory.
    """
    if not dst.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dst.parent))
        try:
            if read_manifest(uri) is not None:
                fetch_dir(uri, str(tmp))
            else:
                download_dir(uri, str(tmp))
            os.replace(tmp, dst)
        except OSError:
            if not dst.is_dir():  # a failed fetch, not a race another process won with a complete copy
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gigabytes for a real teacher: never left behind
    return str(dst)


def manifest_digest(manifest: dict) -> str:
    """sha256 hex over the sorted (path, size, sha256) rows: the content's fingerprint, blind to "created"."""
    rows = sorted((f["path"], f["size"], f["sha256"]) for f in manifest["files"])
    return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()


# Conditional writes: the registry's version numbers and champion alias ---------------------------------------------

_CONFLICT_TRIES = 6  # S3 answers 409 ConditionalRequestConflict while another conditional write to the key is in flight


_PROBED: set[tuple[str, str]] = set()  # (endpoint, bucket) pairs whose server honours conditional writes


def check_conditional_writes(uri: str) -> None:
    """Raise a one-line StorageError unless the server behind `uri` honours conditional PUTs; probed once a process.

    The registry's version numbers and champion alias rely on `If-None-Match: *` and `If-Match` (AWS S3 honours
    both; s3rver, older MinIO releases and the JuiceFS gateway's MinIO layer ignore them). A server that ignores the
    headers accepts every write, so concurrent registrations would silently overwrite each other.
    """
    if not is_s3(uri):
        return  # local writes use a hard link and a file lock
    bucket = _split(uri)[0]
    key = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "", bucket)
    if key in _PROBED:
        return
    probe = join(uri, f".conditional-write-probe-{uuid.uuid4().hex}")
    try:
        first = _s3_put_if(probe, b"1", IfNoneMatch="*")
        again = _s3_put_if(probe, b"2", IfNoneMatch="*")  # must be refused: the object exists
        stale = _s3_put_if(probe, b"3", IfMatch='"00000000000000000000000000000000"')  # must be refused: wrong ETag
    finally:
        delete_file(probe)
    missing = [h for h, ok in (("If-None-Match", first and not again), ("If-Match", not stale)) if not ok]
    if missing:
        raise StorageError(f"{uri}: the S3 server ignores conditional writes ({' and '.join(missing)} headers), which "
                           "the registry needs so that concurrent registrations cannot overwrite each other; use a "
                           "server that honours them (AWS S3 does) or a registry on a local or shared filesystem")
    _PROBED.add(key)


def write_bytes_if_absent(uri: str, data: bytes) -> bool:
    """Create a file or object only if none exists; True if this call created it, False if one was already there."""
    if is_s3(uri):
        return _s3_put_if(uri, data, IfNoneMatch="*")
    dst = _local(uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.link(tmp, dst)  # fails if dst exists (exclusive), and dst appears complete or not at all (atomic)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def read_bytes_tagged(uri: str) -> tuple[bytes, str] | None:
    """The content of a file or object and a tag that changes with it (S3 ETag, local sha256); None if absent."""
    if is_s3(uri):
        bucket, key = _split(uri)
        try:
            with _s3_errors(uri):
                obj = _s3().get_object(Bucket=bucket, Key=key)
        except _MissingKey:
            return None
        return obj["Body"].read(), obj["ETag"]
    try:
        data = _local(uri).read_bytes()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def write_bytes_if_match(uri: str, data: bytes, tag: str | None) -> bool:
    """Replace a file or object only if its tag is still `tag` (None: only if absent); False if it changed meanwhile."""
    if tag is None:
        return write_bytes_if_absent(uri, data)
    if is_s3(uri):
        return _s3_put_if(uri, data, IfMatch=tag)
    import fcntl  # POSIX only, like the rest of sidflow's local runs; imported here so storage still imports elsewhere

    dst = _local(uri)
    with open(dst.with_name(f".{dst.name}.lock"), "a") as lock:
        # Every local compare-and-swap of dst holds this lock; the OS drops it if the process dies.
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_bytes_tagged(uri)
        if current is None or current[1] != tag:
            return False
        _replace_atomically(dst, lambda tmp: tmp.write_bytes(data))
    return True


def _s3_put_if(uri: str, data: bytes, **condition) -> bool:
    import time  # local import keeps this appended section self-contained

    bucket, key = _split(uri)
    for attempt in range(_CONFLICT_TRIES):
        try:
            with _s3_errors(uri):
                _s3().put_object(Bucket=bucket, Key=key, Body=data, **condition)
            return True
        except _MissingKey:  # If-Match on an object that is gone: the tag cannot match any more
            return False
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "PreconditionFailed" or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                return False
            if code != "ConditionalRequestConflict":
                raise
            time.sleep(0.05 * 2**attempt)  # the other write settles within milliseconds; then 412 or success
    raise OSError(f"{uri}: conditional write still conflicting after {_CONFLICT_TRIES} tries")
