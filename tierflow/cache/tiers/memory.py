"""Tier 0: an in-process, capacity-bounded LRU of frames.

Why in-process and not the Ray object store: a Ray task that reads a block it (or an
earlier task in the same worker) wrote gets it back with no copy and no IPC, the tier
works and is testable without Ray, and node-wide sharing is already provided by the LMDB
tier, whose reads are served from the page cache at close to memcpy speed.

The memory tier never holds the only copy of a committed block: the tiered cache writes
it together with (after) a copy on LMDB or the durable store. Values are kept as the
immutable ``bytes`` they were stored as, and ``get`` returns that same object (no copy).
They are not re-verified on read: they never left this process's memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import ClassVar

from tierflow.cache.base import Counters, TierStats
from tierflow.cache.keys import validate_key

__all__ = ["MemoryTier"]


class MemoryTier:
    """An LRU dict of frames bounded by total bytes. Thread-safe.

    Usage::

        tier = MemoryTier(capacity_bytes=1 << 30)
        tier.put("demo/f00/clean/000001", frame)
        tier.get("demo/f00/clean/000001")   # the same bytes object, or None

    Args:
        capacity_bytes: Upper bound on the sum of stored value sizes. A value larger than
            the whole capacity is not stored (a silent no-op; the tier is a cache).
        name: Name used in stats.
    """

    kind: ClassVar[str] = "memory"

    def __init__(self, capacity_bytes: int, *, name: str = "memory") -> None:
        self.name = name
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._counters = Counters()

    def get(self, key: str) -> bytes | None:
        """Return the stored frame (not a copy) and mark it recently used, or ``None``."""
        validate_key(key)
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
        if value is None:
            self._counters.add(misses=1)
        else:
            self._counters.hit(len(value))
        return value

    def put(self, key: str, value: bytes) -> None:
        """Store ``value``, evicting least recently used entries to stay under capacity."""
        validate_key(key)
        value = value if isinstance(value, bytes) else bytes(value)
        size = len(value)
        evicted = evicted_bytes = 0
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= len(old)
            if size > self.capacity_bytes:
                return
            while self._used + size > self.capacity_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._used -= len(dropped)
                evicted += 1
                evicted_bytes += len(dropped)
            self._items[key] = value
            self._used += size
        self._counters.add(puts=1, bytes_written=size, evictions=evicted, bytes_evicted=evicted_bytes)

    def delete(self, key: str) -> bool:
        """Drop ``key``; returns whether it was held."""
        validate_key(key)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= len(old)
        if old is not None:
            self._counters.add(deletes=1)
        return old is not None

    def contains(self, key: str) -> bool:
        """Whether ``key`` is held (does not refresh its LRU position)."""
        validate_key(key)
        with self._lock:
            return key in self._items

    def list(self, prefix: str = "") -> Iterator[str]:
        """Held keys starting with ``prefix``, sorted."""
        with self._lock:
            keys = sorted(k for k in self._items if k.startswith(prefix))
        return iter(keys)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._used = 0

    def stats(self) -> TierStats:
        """Counters plus current entries and bytes held."""
        with self._lock:
            entries, used = len(self._items), self._used
        return self._counters.snapshot(
            self.name, self.kind, entries=entries, bytes_used=used,
            capacity_bytes=self.capacity_bytes,
        )

    def close(self) -> None:
        """Drop everything (idempotent)."""
        self.clear()
