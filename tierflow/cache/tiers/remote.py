"""Tier 2: the durable store, any fsspec URL (``s3://``, ``file://``, ``memory://``).

Layout: the frame of key ``K`` is the object ``<url>/K.tfb``; nothing else is written
under ``<url>`` except, on local filesystems, short-lived temporary files named
``.<name>.tmp-<pid>-<random>`` next to their target (keys can never start with ``.``, so
they never collide with a block and :meth:`RemoteTier.list` skips them).

Promises:

* Reads verify the frame checksum (:class:`~tierflow.errors.CorruptObject` otherwise).
* Writes are atomic: one ``PUT`` on object stores; temp file + ``fsync`` + ``rename`` on a
  local filesystem (``fsync`` can be turned off, e.g. for benchmarks).
* An unreachable store fails within about ``timeout_s`` with
  :class:`~tierflow.errors.TierUnavailable` naming the store (``remote:s3://bucket/prefix``)
  and never a credential: ``${VAR}`` references in ``storage_options`` are resolved only
  when the filesystem is built, in the process that uses it, and every resolved value is
  scrubbed from error messages.
* The filesystem is rebuilt after ``fork`` (aiohttp sessions do not survive it).
"""

from __future__ import annotations

import os
import secrets as _random
import threading
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem

from tierflow.cache import codec
from tierflow.cache.base import Counters, TierStats, tier_errors
from tierflow.cache.keys import validate_key
from tierflow.credentials import secret_values
from tierflow.errors import CorruptObject, TierUnavailable
from tierflow.stores import open_store

__all__ = ["SUFFIX", "RemoteTier", "redact_url"]

SUFFIX = ".tfb"


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment (which may carry credentials).

    >>> redact_url("s3://AKIA:secret@bucket/cache?X-Amz-Signature=abc")
    's3://bucket/cache'
    """
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class RemoteTier:
    """Frames stored as objects under an fsspec URL. Thread-safe.

    Usage::

        tier = RemoteTier("s3://bucket/cache", {"key": "${AWS_ACCESS_KEY_ID}",
                                               "secret": "${AWS_SECRET_ACCESS_KEY}"})
        tier.put(key, frame)
        tier.get(key)   # verified frame, or None

    Args:
        url: Root of the store.
        storage_options: fsspec keyword arguments; values may contain ``${VAR}``.
        timeout_s: Bound on connecting to a networked store and on each read from it; a
            whole object transfer may take up to 4x this (get) or this plus 1 s per MiB
            (put). An unreachable store fails within about this long.
        verify: Verify checksums on read (only the benchmark turns this off).
        fsync: On local filesystems, ``fsync`` each file before renaming it into place.
        environ: Where ``${VAR}`` is resolved from (default ``os.environ``), for tests.
    """

    kind: ClassVar[str] = "remote"

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = 30.0,
        verify: bool = True,
        fsync: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = f"remote:{redact_url(self.url)}"
        self.timeout_s = timeout_s
        self.verify = verify
        self.fsync = fsync
        self._options = dict(storage_options or {})
        self._environ = environ
        self._lock = threading.Lock()
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root = ""
        self._secrets: list[str] = []
        self._pid = -1
        self._counters = Counters()

    # -- plumbing ---------------------------------------------------------------------

    def _filesystem(self) -> fsspec.AbstractFileSystem:
        with self._lock:
            if self._fs is not None and self._pid == os.getpid():
                return self._fs
            self._secrets = secret_values(self._options, self._environ)
            options = {"skip_instance_cache": True, **self._options}  # this tier's own client and timeouts
            try:
                with tier_errors(self.name, self._secrets):
                    fs, root = open_store(self.url, options, timeout_s=self.timeout_s, environ=self._environ)
            except KeyError as exc:
                raise TierUnavailable(self.name, str(exc.args[0])) from None
            self._fs, self._root, self._pid = fs, root.rstrip("/"), os.getpid()
            return fs

    def _call(
        self, fs: fsspec.AbstractFileSystem, method: str, *args: Any, deadline_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        # Async filesystems (s3fs, http) accept an overall deadline through fsspec's sync().
        # Connecting and every socket read are bounded by timeout_s already (botocore's
        # connect/read timeouts); the overall deadline is a safety net that must leave room
        # for a large block on a slow link.
        if isinstance(fs, AsyncFileSystem):
            kwargs["timeout"] = deadline_s if deadline_s is not None else self.timeout_s
        return getattr(fs, method)(*args, **kwargs)

    def path(self, key: str) -> str:
        """The object path of ``key`` (inside the filesystem, without protocol)."""
        self._filesystem()
        return f"{self._root}/{validate_key(key)}{SUFFIX}"

    def _errors(self) -> Any:
        return tier_errors(self.name, self._secrets)

    # -- Tier -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """Return the verified frame under ``key``, or ``None``.

        Raises:
            CorruptObject: The stored frame fails verification.
            TierUnavailable: The store cannot be reached (within ``timeout_s``).
        """
        path = self.path(key)
        fs = self._filesystem()
        with self._errors():
            try:
                if isinstance(fs, LocalFileSystem):
                    # Plain unbuffered read: one copy from the page cache, without the
                    # wrapper objects fsspec's cat_file builds for a local file.
                    with open(path, "rb", buffering=0) as f:
                        data = f.read()
                else:
                    data = self._call(fs, "cat_file", path, deadline_s=4 * self.timeout_s)
            except FileNotFoundError:
                data = None
        if data is None:
            self._counters.add(misses=1)
            return None
        if self.verify:
            try:
                codec.verify(data, key)
            except CorruptObject:
                self._counters.add(corrupt=1)
                raise
        self._counters.hit(len(data))
        return bytes(data)

    def put(self, key: str, value: bytes) -> None:
        """Store a frame atomically (one object PUT, or temp + rename locally).

        Raises:
            TierUnavailable: The store cannot be reached or refuses the write.
        """
        path = self.path(key)
        fs = self._filesystem()
        with self._errors():
            if isinstance(fs, LocalFileSystem):
                self._put_local(path, value)
            else:
                # At least 1 MiB/s on top of the base timeout.
                deadline = self.timeout_s + len(value) / (1 << 20)
                self._call(fs, "pipe_file", path, value, deadline_s=deadline)
        self._counters.add(puts=1, bytes_written=len(value))

    def _put_local(self, path: str, value: bytes) -> None:
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{_random.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                f.write(value)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def delete(self, key: str) -> bool:
        """Remove ``key``'s object. Returns whether it existed."""
        path = self.path(key)
        fs = self._filesystem()
        with self._errors():
            if not self._call(fs, "exists", path):
                return False
            try:
                self._call(fs, "rm_file", path)
            except FileNotFoundError:
                return False
        self._counters.add(deletes=1)
        return True

    def contains(self, key: str) -> bool:
        """Whether ``key``'s object exists (no read, no verification)."""
        path = self.path(key)
        fs = self._filesystem()
        with self._errors():
            return bool(self._call(fs, "exists", path))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Stored keys starting with ``prefix``, sorted."""
        fs = self._filesystem()
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = f"{self._root}/{directory}".rstrip("/")
        with self._errors():
            try:
                paths = self._call(fs, "find", base)
            except FileNotFoundError:
                paths = []
        keys = []
        start = len(self._root) + 1
        for p in paths:
            rel = p[start:] if p.startswith(self._root + "/") else p.lstrip("/")
            if not rel.endswith(SUFFIX):
                continue
            key = rel[: -len(SUFFIX)]
            if key.startswith(prefix) and not any(s.startswith(".") for s in key.split("/")):
                keys.append(key)
        return iter(sorted(keys))

    def stats(self) -> TierStats:
        """Counters of this process's operations (store size is not computed)."""
        return self._counters.snapshot(self.name, self.kind)

    def close(self) -> None:
        """Forget the filesystem instance. Idempotent."""
        with self._lock:
            self._fs = None
