"""Fixtures shared by the whole test-suite."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def model_cache() -> Path:
    """Where built models are kept between runs: $PIPELINE_CACHE (relative: to the repository),
    else the repository's .cache/ (as conf/model/tiny.yaml has it)."""
    cache = Path(os.environ.get("PIPELINE_CACHE", ".cache"))
    return (cache if cache.is_absolute() else ROOT / cache) / "models"


def compose(config_name: str, overrides=()):
    """The project's real Hydra config `config_name` (this checkout's conf/), composed with `overrides`."""
    from pipeline.cli import compose as compose_config

    return compose_config(config_name, overrides, config_dir=ROOT / "conf")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The project's tiny model (seed 0), built on first use and reused across runs."""
    from pipeline.models.tiny_model import ensure_tiny_model

    return ensure_tiny_model(model_cache() / "tiny-llama-3.1", seed=0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3_server(log=None, **server_env):
    """moto's S3 server on a free port of 127.0.0.1, stopped on exit; yields its endpoint URL.
    `log`: a file its request lines go to (one per request: method, path, status), to count the
    requests a client made; `server_env`: the server's own settings (INITIAL_NO_AUTH_ACTION_COUNT
    turns its IAM on)."""
    import subprocess
    import sys
    import time

    import httpx

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    sink = subprocess.DEVNULL if log is None else open(log, "ab")  # noqa: SIM115 - the server keeps its own copy
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **server_env},
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    finally:
        if log is not None:
            sink.close()
    try:
        for _ in range(200):
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1.0)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise RuntimeError("moto's S3 server exited at start")
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto's S3 server did not answer on {endpoint}")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto's server mode) on 127.0.0.1, for the whole session.

    Clients find it the way a user's S3-compatible store is found: `AWS_ENDPOINT_URL` and the
    standard `AWS_*` credentials in the environment, set here for this process and the Ray
    workers it starts afterwards. Yields the endpoint URL; `s3_bucket` makes buckets on it."""
    with moto_s3_server() as endpoint:
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new, empty bucket on the session's S3 server; yields its name."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
