"""Fixtures for the cache tests. Each states its scope and cost."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pytest


@pytest.fixture()
def memory_store() -> Iterator[str]:
    """A clean ``memory://`` URL; fsspec's global memory store is emptied after. Free."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield "memory://tierflow-test"
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3-compatible server and the environment variables holding its keys."""

    endpoint_url: str
    key_var: str = "TF_TEST_S3_KEY"
    secret_var: str = "TF_TEST_S3_SECRET"
    key: str = "tierflow-test-key"
    secret: str = "tierflow-test-secret-d0n0tl0g"

    def storage_options(self) -> dict[str, str]:
        """Options as a user writes them: credentials only as ``${VAR}``."""
        return {
            "key": "${" + self.key_var + "}",
            "secret": "${" + self.secret_var + "}",
            "endpoint_url": self.endpoint_url,
        }

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing) and return ``s3://name``."""
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.key, secret=self.secret, endpoint_url=self.endpoint_url,
            skip_instance_cache=True,
        )
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


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


def free_port() -> int:
    """A TCP port with nothing listening on it (for unreachable-store tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
