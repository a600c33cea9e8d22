"""Fixtures for the cache tests. Each states its scope and cost."""

from __future__ import annotations

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
