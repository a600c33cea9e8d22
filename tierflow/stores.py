"""Opening an fsspec store: ``${VAR}`` secrets resolved at that moment, networked stores
bounded in time.

The cache's durable tier, the sources, the sink and the journal all open their stores here,
so they resolve credentials the same way (:mod:`tierflow.credentials`) and none of them
inherits botocore's and s3fs's default retry loops: with those, a request to a store that
is down stalls its caller for 8-9 s before it fails (measured on the journal during an
outage), where the engine's own retries (:data:`tierflow.engine.policy.RETRY`, the cache's
durable catch-up) are the ones that should decide when to try again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec import AbstractFileSystem

from tierflow.credentials import resolve_storage_options

__all__ = ["STORE_TIMEOUT_S", "open_store"]

STORE_TIMEOUT_S = 30.0  # connect (at most 10 s) and each socket read
_S3 = ("s3", "s3a")


def open_store(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = STORE_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for ``url``. Raises ``KeyError`` naming an unset
    ``${VAR}``; options the manifest sets win over the bounds set here."""
    options = resolve_storage_options(dict(storage_options or {}), environ)
    s3 = (urlsplit(url).scheme or "file") in _S3
    if s3:
        options.setdefault("use_listings_cache", False)  # the journal's deltas, another writer's blocks
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", min(timeout_s, 10.0))
        config.setdefault("read_timeout", timeout_s)
        config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        options["config_kwargs"] = config
    fs, path = fsspec.core.url_to_fs(url, **options)
    if s3:
        fs.retries = 2  # s3fs's own retry loop, on top of botocore's
    return fs, path
