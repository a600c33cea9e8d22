"""fsspec filesystems for sources and sinks, with ``${VAR}`` secrets resolved late.

Secrets are written in manifests as ``${VAR}``; they are resolved from the environment
only here, when a filesystem is built, and never stored, logged or journaled (the same
rule and the same resolver as the cache's durable store).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from tierflow.cache.settings import resolve_storage_options


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for ``url``."""
    fs, path = fsspec.core.url_to_fs(url, **resolve_storage_options(storage_options or {}))
    return fs, path
