"""Fault injection helpers for cache tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from tierflow.cache.base import Tier, TierStats
from tierflow.errors import TierUnavailable


class FaultyTier:
    """Wrap a tier and make it fail on demand.

    Args:
        inner: The real tier.
        unavailable: Every call raises ``TierUnavailable``.
        fail_puts_every: Every n-th ``put`` raises ``TierUnavailable`` (0 = never).
    """

    kind: ClassVar[str] = "remote"

    def __init__(self, inner: Tier, *, unavailable: bool = False, fail_puts_every: int = 0) -> None:
        self.inner = inner
        self.name = inner.name
        self.kind = inner.kind  # type: ignore[misc]
        self.unavailable = unavailable
        self.fail_puts_every = fail_puts_every
        self.calls = 0
        self._puts = 0
        self._lock = threading.Lock()

    def _gate(self) -> None:
        with self._lock:
            self.calls += 1
        if self.unavailable:
            raise TierUnavailable(self.name, "injected outage")

    def get(self, key: str) -> bytes | None:
        self._gate()
        return self.inner.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._gate()
        with self._lock:
            self._puts += 1
            fail = self.fail_puts_every and self._puts % self.fail_puts_every == 0
        if fail:
            raise TierUnavailable(self.name, "injected put failure")
        self.inner.put(key, value)

    def delete(self, key: str) -> bool:
        self._gate()
        return self.inner.delete(key)

    def contains(self, key: str) -> bool:
        self._gate()
        return self.inner.contains(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        self._gate()
        return self.inner.list(prefix)

    def stats(self) -> TierStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def flip_byte_in_file(path: Path, needle: bytes, offset: int = 10) -> None:
    """Flip one byte of ``path`` at ``offset`` past the first occurrence of ``needle``.

    Simulates bit rot in place: the file keeps its length and every other byte.
    """
    raw = bytearray(path.read_bytes())
    at = raw.find(needle)
    assert at >= 0, f"{needle[:16]!r} not found in {path}"
    assert raw.count(needle) == 1, f"{needle[:16]!r} occurs {raw.count(needle)} times in {path}"
    raw[at + offset] ^= 0xFF
    path.write_bytes(bytes(raw))
