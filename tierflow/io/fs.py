"""fsspec filesystems for sources and sinks, with ``${VAR}`` secrets resolved late.

Secrets are written in manifests as ``${VAR}``; they are resolved from the environment
only here, when a filesystem is built, and never stored, logged or journaled (the same
rules and the same resolver as the cache's durable store: :mod:`tierflow.credentials`).
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from fsspec import AbstractFileSystem

from tierflow.credentials import scrub, secret_values
from tierflow.errors import StoreError, TierflowError, medium_failures
from tierflow.faults import crash_point
from tierflow.stores import open_store

_F = TypeVar("_F", bound=Callable[..., Any])


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for ``url`` (networked stores bounded in time:
    :func:`tierflow.stores.open_store`)."""
    return open_store(url, storage_options)


@contextmanager
def fs_errors(role: str, url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Translate a store failure inside the block into :class:`StoreError` naming ``role``
    (``source``, ``sink``, ``journal``) and ``url``: the edge where fsspec, botocore,
    aiohttp and OS errors of the stores outside the cache become tierflow errors (the
    same classification as the cache tiers'; resolved secrets scrubbed from the reason).
    tierflow's own errors pass through."""
    try:
        yield
    except TierflowError:
        raise
    except medium_failures() as exc:
        reason = scrub(f"{type(exc).__name__}: {exc}", secret_values(storage_options or {}))
        raise StoreError(role, url, reason) from exc


def store_op(role: str) -> Callable[[_F], _F]:
    """Method decorator: :func:`fs_errors` around a method of an object with ``url`` and
    ``storage_options`` (or ``config.storage_options``)."""

    def wrap(method: _F) -> _F:
        @functools.wraps(method)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            options = getattr(self, "storage_options", None)
            if options is None and hasattr(self, "config"):
                options = self.config.storage_options
            with fs_errors(role, self.url, options):
                return method(self, *args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


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
