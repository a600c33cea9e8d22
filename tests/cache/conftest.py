"""Fixtures for the cache tests. Each states its scope and cost."""

from __future__ import annotations

import socket
from collections.abc import Iterator

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


def free_port() -> int:
    """A TCP port with nothing listening on it (for unreachable-store tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
