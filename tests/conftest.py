"""Shared pytest fixtures. Add new fixtures below; keep each one's scope and cost stated."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from s3_endpoint import S3Endpoint

if TYPE_CHECKING:
    from tierflow.triton.server import TritonServer

# Ray's token auth off for every Ray this process starts, before the first one: the tests
# start several sessions, and a session started with it on breaks actor creation in a
# later one that turns it off (seen as actors "cancelled before they started running").
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
TRITON_MODELS = ROOT / "triton_models"


@pytest.fixture(scope="session")
def triton_server() -> Iterator[TritonServer]:
    """The real tritonserver (nvidia-pytriton wheel) serving ``triton_models/`` on free ports.

    One per test session (~2.5 s to start, ~3 s to stop); every model is ready when yielded.
    Skips where the bundled binary is not installed.
    """
    from tierflow.triton.bundle import tritonserver_binary
    from tierflow.triton.server import TritonServer

    try:
        tritonserver_binary()
    except FileNotFoundError as exc:
        pytest.skip(f"tritonserver not available: {exc}")
    with TritonServer(TRITON_MODELS, startup_timeout_s=120.0) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """A real S3 endpoint: moto's ``ThreadedMotoServer`` on a free port (as s3fs's own
    tests do). Session scope, ~1 s to start.

    With ``TIERFLOW_TEST_S3_ENDPOINT`` set (e.g. a local SeaweedFS on
    ``http://127.0.0.1:8333``, see ``storage/README.md``) that server is used instead, with
    ``TIERFLOW_TEST_S3_KEY`` / ``TIERFLOW_TEST_S3_SECRET`` as its key pair.
    """
    external = os.environ.get("TIERFLOW_TEST_S3_ENDPOINT")
    if external:
        yield S3Endpoint(
            endpoint_url=external,
            key=os.environ.get("TIERFLOW_TEST_S3_KEY", "tierflow-test-key"),
            secret=os.environ.get("TIERFLOW_TEST_S3_SECRET", "tierflow-test-secret-d0n0tl0g"),
        )
        return
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """``s3_server`` with its key variables set in the environment. Free."""
    monkeypatch.setenv(s3_server.key_var, s3_server.key)
    monkeypatch.setenv(s3_server.secret_var, s3_server.secret)
    return s3_server
