"""Shared pytest fixtures."""

import uuid

import pytest

# S3 fixtures: a real HTTP endpoint on loopback (moto's ThreadedMotoServer), never patched boto3. ----------------


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1, on a free port, for the whole test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3's standard variables at the moto server, hermetically, and rebuild sidflow's S3 client."""
    from sidflow import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy set on the host must not see loopback calls
    # A developer's own AWS setup must not leak in.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3", "AWS_S3_ADDRESSING_STYLE"):
        monkeypatch.delenv(name, raising=False)
    storage.reset_client()
    yield s3_server
    storage.reset_client()


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, uniquely named bucket as "s3://<bucket>"; emptied and removed afterwards to free the server's memory."""
    import boto3

    name = f"sidflow-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


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
