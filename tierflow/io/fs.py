"""fsspec filesystems for sources and sinks, with ``${VAR}`` secrets resolved late.

Secrets are written in manifests as ``${VAR}``; they are resolved from the environment
only here, when a filesystem is built, and never stored, logged or journaled (the same
rule and the same resolver as the cache's durable store).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from tierflow.cache.settings import resolve_storage_options
from tierflow.faults import crash_point


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for ``url``."""
    fs, path = fsspec.core.url_to_fs(url, **resolve_storage_options(storage_options or {}))
    return fs, path


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes, crash: str = "") -> None:
    """Readers see all of ``data`` at ``path`` or the previous content, never a part.

    Local disks: a hidden temp file in the same directory, fsynced, then renamed (atomic
    on POSIX). Object stores: one PUT, which they make visible all at once.
    """
    if "file" in fs.protocol or "local" in fs.protocol:
        head, _, base = path.rpartition("/")
        tmp = f"{head}/.{base}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if crash:
            crash_point(crash)  # fault tests: die with the temp file written, not renamed
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)
