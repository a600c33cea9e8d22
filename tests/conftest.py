"""Shared pytest fixtures. Add new fixtures below; keep each one's scope and cost stated."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

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
    from tierflow.triton.server import TritonServer, tritonserver_binary

    try:
        tritonserver_binary()
    except FileNotFoundError as exc:
        pytest.skip(f"tritonserver not available: {exc}")
    with TritonServer(TRITON_MODELS, startup_timeout_s=120.0) as server:
        yield server
