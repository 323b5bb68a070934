"""sidflow.storage on local paths, file:// URIs and S3 through two real HTTP servers on loopback: moto, and the JuiceFS
gateway (MinIO's S3 layer: no conditional writes, Content-MD5 required on DeleteObjects)."""

import filecmp
import hashlib
import json
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest

from sidflow import storage

TREE = {
    "a.txt": b"alpha\n",
    "empty": b"",
    "sub/b.bin": bytes(range(256)) * 3,
    "sub/deep/c.json": b'{"k": 1}',
    "subway.txt": b"a sibling whose name starts like the directory sub/",
}


@pytest.fixture(params=["local", "file", "s3", "juicefs"])
def root(request, tmp_path):
    """A directory URI on each backend: plain path, file:// URI, S3 prefix on moto and on the JuiceFS gateway."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/root"
    if request.param == "juicefs":
        return request.getfixturevalue("juicefs_bucket") + "/root"
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return str(tmp_path / "root")


def make_tree(base: Path, files: dict) -> Path:
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return base


@pytest.mark.parametrize(
    "uri, parts, expected",
    [
        ("s3://b", ("x", "y"), "s3://b/x/y"),
        ("s3://b/", ("/x/",), "s3://b/x"),
        ("s3://b/k", ("", "z/w"), "s3://b/k/z/w"),
        ("s3://b/k", (), "s3://b/k"),
        ("/tmp/a/", ("b",), "/tmp/a/b"),
        ("file:///tmp/a", ("b/c",), "file:///tmp/a/b/c"),
        ("rel", ("x/", "/y"), "rel/x/y"),
    ],
)
def test_join(uri, parts, expected):
    assert storage.join(uri, *parts) == expected


def test_uri_kinds():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3("file:///tmp/x")
    assert storage.local_path("file:///tmp/x") == "/tmp/x"
    assert storage.local_path("/tmp/x") == "/tmp/x"
    with pytest.raises(ValueError, match="s3://b/k"):
        storage.local_path("s3://b/k")


def test_read_write_exists(root):
    storage.write_bytes(storage.join(root, "x/y.bin"), b"\x00\x01payload")
    storage.write_text(storage.join(root, "t.txt"), "σ-distillation ✓")
    assert storage.read_bytes(storage.join(root, "x/y.bin")) == b"\x00\x01payload"
    assert storage.read_text(storage.join(root, "t.txt")) == "σ-distillation ✓"
    assert storage.exists(storage.join(root, "x/y.bin"))
    assert not storage.exists(storage.join(root, "x/nope.bin"))
    assert not storage.exists(storage.join(root, "x"))  # a directory prefix is not a file
    storage.write_bytes(storage.join(root, "x/y.bin"), b"new")  # overwrite
    assert storage.read_bytes(storage.join(root, "x/y.bin")) == b"new"


def test_listdir_and_list_files(root, tmp_path):
    storage.upload_dir(str(make_tree(tmp_path / "src", TREE)), root)
    assert storage.listdir(root) == ["a.txt", "empty", "sub", "subway.txt"]
    assert storage.listdir(storage.join(root, "sub")) == ["b.bin", "deep"]
    assert storage.listdir(storage.join(root, "sub") + "/") == ["b.bin", "deep"]
    assert storage.list_files(root) == sorted(TREE)
    assert storage.list_files(storage.join(root, "sub")) == ["b.bin", "deep/c.json"]  # not ../subway.txt
    assert storage.listdir(storage.join(root, "missing")) == []
    assert storage.list_files(storage.join(root, "missing")) == []


def test_list_stats_gives_sizes_and_etags_without_reading(root, tmp_path, request):
    storage.upload_dir(str(make_tree(tmp_path / "src", TREE)), root)
    rows = storage.list_stats(storage.join(root, "sub"))
    assert [(r["path"], r["size"]) for r in rows] == [(rel[len("sub/"):], len(TREE[rel])) for rel in sorted(TREE)
                                                       if rel.startswith("sub/")]  # not ../subway.txt
    backend = request.node.callspec.params["root"]
    if backend == "s3":  # moto, as AWS: a single-part upload's ETag is the MD5 of its bytes, quotes stripped
        assert [r["etag"] for r in rows] == [hashlib.md5(TREE["sub/" + r["path"]]).hexdigest() for r in rows]
    elif backend == "juicefs":  # the gateway keeps no ETag (HEAD has none either): LastModified is what a listing tells
        assert {r["etag"] for r in rows} == {""}
    else:
        assert {r["etag"] for r in rows} == {None}
    time.sleep(0.01)  # LastModified and mtime have millisecond (or finer) resolution
    storage.write_bytes(storage.join(root, "sub", rows[0]["path"]), b"changed")
    after = storage.list_stats(storage.join(root, "sub"))[0]
    assert (after["etag"] or after["modified"]) != (rows[0]["etag"] or rows[0]["modified"])  # the change is seen
    assert storage.list_stats(storage.join(root, "missing")) == []


def test_upload_download_dir(root, tmp_path):
    src = make_tree(tmp_path / "src", TREE)
    storage.upload_dir(str(src), root)
    storage.download_dir(root, str(tmp_path / "dst"))
    for rel, data in TREE.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.download_dir(storage.join(root, "missing"), str(tmp_path / "dst2"))


def test_missing_key(root, tmp_path):
    storage.write_bytes(storage.join(root, "present"), b"x")  # the directory / bucket exists; only the key is missing
    missing = storage.join(root, "no/such.bin")
    with pytest.raises(FileNotFoundError, match="no/such.bin"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match="no/such.bin"):
        storage.download_file(missing, str(tmp_path / "out.bin"))
    assert not (tmp_path / "out.bin").exists()


def test_publish_fetch_roundtrip(root, tmp_path):
    src = make_tree(tmp_path / "src", {**TREE, "manifest.json": b"stale, must not be published"})
    manifest = storage.publish_dir(str(src), root)
    assert manifest["version"] == 1 and manifest["created"].endswith("+00:00")
    expected = [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in sorted(TREE.items())]
    assert manifest["files"] == expected
    assert storage.read_manifest(root) == manifest
    assert json.loads(storage.read_text(storage.join(root, "manifest.json"))) == manifest
    assert storage.fetch_dir(root, str(tmp_path / "dst")) == manifest
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*") if p.is_file()) == [
        e["path"] for e in expected
    ]
    for rel, data in TREE.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data


def test_publish_files_joins_parts_published_by_others_under_one_manifest(root, tmp_path):
    # What the ranks of a sharded pairs encoding do: each publishes its part; one process then publishes the whole.
    for r in (0, 1):
        part = storage.join(root, f"p{r}")
        storage.publish_dir(str(make_tree(tmp_path / f"p{r}", {f"x{r}.bin": bytes([r]) * 5})), part)
    entries = [{**e, "path": f"p{r}/{e['path']}"} for r in (0, 1)
               for e in storage.read_manifest(storage.join(root, f"p{r}"))["files"]]
    manifest = storage.publish_files(root, entries, {"index.json": "{}"})
    assert [e["path"] for e in manifest["files"]] == ["p0/x0.bin", "p1/x1.bin", "index.json"]
    assert storage.fetch_dir(root, str(tmp_path / "dst")) == manifest  # every size and digest checks out
    assert (tmp_path / "dst" / "p1" / "x1.bin").read_bytes() == b"\x01" * 5
    with pytest.raises(storage.StorageError):  # a part that is not there is refused before the manifest lands
        storage.publish_files(storage.join(root, "other"), entries, {})
    assert storage.read_manifest(storage.join(root, "other")) is None


def test_big_file_multipart_roundtrip(s3_bucket, tmp_path):
    src = make_tree(tmp_path / "src", {"nested/deeper/small.txt": b"small", "top.txt": b"top"})
    big = src / "weights" / "unet.bin"
    big.parent.mkdir()
    big.write_bytes(np.random.default_rng(0).bytes(100 * 2**20))
    uri = storage.join(s3_bucket, "models/m1")
    manifest = storage.publish_dir(str(src), uri)
    assert [e["path"] for e in manifest["files"]] == ["nested/deeper/small.txt", "top.txt", "weights/unet.bin"]

    client = boto3.session.Session().client("s3")
    head = client.head_object(Bucket=s3_bucket[len("s3://") :], Key="models/m1/weights/unet.bin")
    assert "-" in head["ETag"] and head["ContentLength"] == 100 * 2**20  # "<md5>-<parts>": a multipart upload

    storage.fetch_dir(uri, str(tmp_path / "dst"))
    for rel in ("nested/deeper/small.txt", "top.txt", "weights/unet.bin"):
        assert filecmp.cmp(src / rel, tmp_path / "dst" / rel, shallow=False), rel


@pytest.mark.parametrize("how", ["files_only", "manifest_write_fails"])
def test_interrupted_publish_is_invisible(root, tmp_path, monkeypatch, how):
    src = make_tree(tmp_path / "src", TREE)
    if how == "files_only":
        storage.upload_dir(str(src), root)
    else:

        def fail(uri, text):
            raise OSError("killed before the manifest")

        monkeypatch.setattr(storage, "write_text", fail)
        with pytest.raises(OSError, match="killed"):
            storage.publish_dir(str(src), root)
        monkeypatch.undo()
    assert storage.list_files(root) == sorted(TREE)  # the files are all there ...
    assert storage.read_manifest(root) is None  # ... but the directory does not exist to readers
    with pytest.raises(FileNotFoundError, match="has no manifest.json: not a published directory"):
        storage.fetch_dir(root, str(tmp_path / "dst"))


def test_republish_deletes_old_manifest_first(root, tmp_path, monkeypatch):
    storage.publish_dir(str(make_tree(tmp_path / "v1", TREE)), root)
    assert storage.read_manifest(root) is not None
    v2 = make_tree(tmp_path / "v2", {rel: data + b"v2" for rel, data in TREE.items()})

    real_upload, lock, calls = storage.upload_file, threading.Lock(), []

    def upload_then_die(local_path, uri):
        with lock:
            calls.append(uri)
            n = len(calls)
        if n > 2:
            raise OSError("disk pulled midway")
        real_upload(local_path, uri)

    monkeypatch.setattr(storage, "upload_file", upload_then_die)
    with pytest.raises(OSError, match="midway"):
        storage.publish_dir(str(v2), root)
    monkeypatch.undo()
    assert storage.read_manifest(root) is None  # the old manifest must not describe the half-new files
    with pytest.raises(FileNotFoundError, match="no manifest"):
        storage.fetch_dir(root, str(tmp_path / "dst"))


@pytest.mark.parametrize(
    "new_bytes, why",
    [(b"X" * len(TREE["sub/b.bin"]), "sha256 differs"), (b"shorter", "7 bytes, manifest says 768")],
    ids=["same_size", "other_size"],
)
def test_corrupted_file_is_refused(root, tmp_path, new_bytes, why):
    storage.publish_dir(str(make_tree(tmp_path / "src", TREE)), root)
    storage.write_bytes(storage.join(root, "sub/b.bin"), new_bytes)
    with pytest.raises(ValueError, match=f"sub/b.bin is corrupted: {why}") as info:
        storage.fetch_dir(root, str(tmp_path / "dst"))
    assert "\n" not in str(info.value)


def test_missing_bucket_is_one_clear_line(s3_env, monkeypatch, tmp_path):
    secret = "Zq9-sidflow-very-secret-7f3"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.reset_client()
    src = make_tree(tmp_path / "src", {"f.txt": b"f"})
    uri = "s3://sidflow-no-such-bucket-4242/dir"
    calls = {
        "read_bytes": lambda: storage.read_bytes(storage.join(uri, "f.txt")),
        "write_bytes": lambda: storage.write_bytes(storage.join(uri, "f.txt"), b"x"),
        "exists": lambda: storage.exists(storage.join(uri, "f.txt")),
        "listdir": lambda: storage.listdir(uri),
        "upload_file": lambda: storage.upload_file(str(src / "f.txt"), storage.join(uri, "f.txt")),
        "download_file": lambda: storage.download_file(storage.join(uri, "f.txt"), str(tmp_path / "o")),
        "publish_dir": lambda: storage.publish_dir(str(src), uri),
        "fetch_dir": lambda: storage.fetch_dir(uri, str(tmp_path / "dst")),
    }
    for name, call in calls.items():
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        assert "s3 bucket 'sidflow-no-such-bucket-4242' does not exist" in msg, name
        assert "\n" not in msg and secret not in msg, name


def test_manifest_digest(root, tmp_path):
    src = make_tree(tmp_path / "src", TREE)
    first = storage.publish_dir(str(src), root)
    again = storage.publish_dir(str(src), root)
    assert storage.manifest_digest(first) == storage.manifest_digest(again)
    assert storage.manifest_digest(first) == storage.manifest_digest({**first, "files": first["files"][::-1]})
    (src / "sub/b.bin").write_bytes(b"changed")
    changed = storage.publish_dir(str(src), root)
    assert storage.manifest_digest(changed) != storage.manifest_digest(first)
    assert len(storage.manifest_digest(first)) == 64


def test_delete_tree(root, tmp_path):
    storage.publish_dir(str(make_tree(tmp_path / "src", TREE)), root)
    storage.write_bytes(root + "x/keep.txt", b"a sibling prefix survives")
    storage.delete_tree(root)
    assert storage.list_files(root) == [] and storage.read_manifest(root) is None
    assert storage.read_bytes(root + "x/keep.txt") == b"a sibling prefix survives"
    storage.delete_tree(root)  # idempotent


def test_delete_tree_refuses_a_whole_bucket(s3_bucket):
    with pytest.raises(ValueError, match="whole bucket"):
        storage.delete_tree(s3_bucket)


def test_fetch_refuses_paths_outside_destination(tmp_path):
    pub = make_tree(tmp_path / "pub", {"ok.txt": b"ok"})
    entry = {"path": "../escaped.txt", "size": 2, "sha256": hashlib.sha256(b"ok").hexdigest()}
    (pub / "manifest.json").write_text(json.dumps({"version": 1, "files": [entry], "created": "x"}))
    with pytest.raises(ValueError, match="leaves the directory"):
        storage.fetch_dir(str(pub), str(tmp_path / "dst"))
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize(
    "env, expected",
    [({}, "path"), ({"AWS_S3_ADDRESSING_STYLE": "virtual"}, "virtual"), ({"AWS_ENDPOINT_URL": None}, None)],
)
def test_addressing_style(s3_env, monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name)
    storage.reset_client()
    s3_config = storage._s3().meta.config.s3 or {}
    assert s3_config.get("addressing_style") == expected


def test_bad_addressing_style_is_one_line(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_S3_ADDRESSING_STYLE", "sideways")
    storage.reset_client()
    with pytest.raises(ValueError, match="AWS_S3_ADDRESSING_STYLE='sideways'"):
        storage.exists("s3://b/k")


@pytest.mark.parametrize("code", ["403", "AccessDenied"])
def test_access_denied_becomes_permission_error(code):
    # moto's server does not enforce IAM, so the translation is fed the error botocore would raise.
    from botocore.exceptions import ClientError

    with pytest.raises(PermissionError, match="s3://b/k: access denied"):
        with storage._s3_errors("s3://b/k"):
            raise ClientError({"Error": {"Code": code, "Message": "Forbidden"}}, "GetObject")
    with pytest.raises(ClientError):  # an error no user causes passes through untouched
        with storage._s3_errors("s3://b/k"):
            raise ClientError({"Error": {"Code": "InternalError"}}, "GetObject")


# Faults of real servers and networks: each a one-line error naming the URI, nothing half-written. ----------------


def test_delete_tree_sends_content_md5_that_minio_class_servers_require(juicefs_bucket, tmp_path):
    # The JuiceFS gateway answers DeleteObjects without Content-MD5 with MissingContentMD5, as MinIO does
    # (botocore >= 1.36 sends a CRC32 checksum instead); sidflow adds the header itself.
    import boto3
    from botocore.exceptions import ClientError

    name = juicefs_bucket.removeprefix("s3://")
    boto3.session.Session().client("s3").put_object(Bucket=name, Key="bare/x", Body=b"x")
    with pytest.raises(ClientError, match="MissingContentMD5"):  # the server's rule, shown with a plain client
        boto3.session.Session().client("s3").delete_objects(Bucket=name, Delete={"Objects": [{"Key": "bare/x"}]})
    uri = juicefs_bucket + "/tree"
    storage.publish_dir(str(make_tree(tmp_path / "src", TREE)), uri)
    storage.delete_tree(uri)
    assert storage.list_files(uri) == []


def _framed(data: bytes) -> bytes:
    # What a server that does not understand aws-chunked uploads keeps: the chunk framing around the payload.
    return f"{len(data):x};chunk-signature={'0' * 64}\r\n".encode() + data + b"\r\n0\r\n\r\n"


def test_publish_detects_stored_chunk_framing_and_names_the_remedy(s3_bucket, tmp_path, monkeypatch):
    # Stand-in for a server that stores boto3's streaming-checksum framing inside objects (the object bytes are what
    # such a server returns on GET); the real upload path runs against moto with framed bodies.
    real_put = storage._s3().put_object
    monkeypatch.setattr(storage, "upload_file",
                        lambda path, uri: storage.write_bytes(uri, _framed(Path(path).read_bytes())))
    uri = s3_bucket + "/framed"
    with pytest.raises(storage.StorageError, match="AWS_REQUEST_CHECKSUM_CALCULATION=when_required") as info:
        storage.publish_dir(str(make_tree(tmp_path / "src", TREE)), uri)
    assert "\n" not in str(info.value) and storage.read_manifest(uri) is None  # nothing visible to readers
    bucket, key = uri[5:].split("/", 1)
    real_put(Bucket=bucket, Key=key + "/manifest.json", Body=_framed(b'{"version": 1, "files": []}'))
    with pytest.raises(ValueError, match="AWS_REQUEST_CHECKSUM_CALCULATION"):
        storage.read_manifest(uri)


def test_publish_aborts_multipart_uploads_a_killed_publish_left(root, tmp_path):
    if not storage.is_s3(root):
        pytest.skip("multipart uploads exist on S3 only")
    import boto3

    client = boto3.session.Session().client("s3")
    bucket, key = root[5:].split("/", 1)
    client.create_multipart_upload(Bucket=bucket, Key=f"{key}/unet/weights.bin")
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=key + "/").get("Uploads")
    storage.publish_dir(str(make_tree(tmp_path / "src", TREE)), root)
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix=key + "/").get("Uploads")


def test_fetch_once_leaves_no_temp_copy_when_verification_fails(root, tmp_path):
    storage.publish_dir(str(make_tree(tmp_path / "src", TREE)), root)
    storage.write_bytes(storage.join(root, "a.txt"), b"tampered")
    with pytest.raises(ValueError, match="corrupted"):
        storage.fetch_dir_once(root, tmp_path / "cache" / "teacher")
    assert list((tmp_path / "cache").iterdir()) == []  # no .fetch-* directory left


def test_conditional_write_probe_passes_on_a_server_that_honours_them(s3_bucket):
    storage.check_conditional_writes(s3_bucket + "/registry")  # moto honours If-None-Match and If-Match
    assert storage.listdir(s3_bucket + "/registry") == []  # the probe object is gone


def test_conditional_write_probe_refuses_a_server_that_ignores_them(juicefs_bucket):
    with pytest.raises(storage.StorageError, match="ignores conditional writes .If-None-Match and If-Match") as info:
        storage.check_conditional_writes(juicefs_bucket + "/registry")
    assert "\n" not in str(info.value) and storage.listdir(juicefs_bucket + "/registry") == []


def test_no_credentials_and_bad_credentials_are_one_line(juicefs_bucket, monkeypatch):
    uri = juicefs_bucket + "/x.txt"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-123")
    storage.reset_client()
    with pytest.raises(PermissionError, match="refused the credentials|access denied") as info:
        storage.read_bytes(uri)
    assert "wrong-secret-123" not in str(info.value) and "\n" not in str(info.value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup on a CI machine
    storage.reset_client()
    with pytest.raises(PermissionError, match="no S3 credentials found"):
        storage.write_bytes(uri, b"x")


def test_unreachable_endpoint_is_one_line_after_bounded_retries(s3_env, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage.reset_client()
    with pytest.raises(storage.StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}") as info:
        storage.read_bytes("s3://b/k")
    assert "\n" not in str(info.value)


def test_server_errors_are_one_line_after_retries(s3_env, monkeypatch):
    from tests.loopback import JsonServer

    server = JsonServer(lambda *_: (503, {"error": "down"}))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        storage.reset_client()
        with pytest.raises(storage.StorageError, match="s3://b/k: the S3 server keeps failing"):
            storage.read_bytes("s3://b/k")
        assert 1 < len(server.requests) <= 6  # botocore retried a bounded number of times, then the one line
    finally:
        server.close()


def test_parquet_is_read_without_arrow_thread_pools(tmp_path):
    # A thread of Arrow's pools that is still running at exit aborts the interpreter (exit code 134, "terminate
    # called without an active exception"; apache/arrow#34314 and #39862, the latter after a dataset scan). CI saw it
    # under load when the read went through pq.read_table, whose dataset scanner starts a worker even with
    # use_threads=False. sidflow reads its small tables on the calling thread: in a fresh process that imports torch
    # first, the read starts no native thread at all.
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"] * 50}), tmp_path / "p.parquet")
    code = f"""
import os, torch
from sidflow import storage
data = open({str(tmp_path / "p.parquet")!r}, "rb").read()
import pyarrow.parquet as pq
threads = lambda: len(os.listdir("/proc/self/task"))
n0 = threads(); storage.parquet_table(data); n1 = threads()
print(n1 - n0)
"""
    started = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert started == 0
