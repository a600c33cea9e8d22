"""The in-process memory tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tierflow.cache.tiers.memory import MemoryTier

from .conformance import TierConformance, frame_of


class TestMemoryTier(TierConformance):
    verifies_checksums = False

    @pytest.fixture()
    def tier(self) -> Iterator[MemoryTier]:
        t = MemoryTier(capacity_bytes=64 << 20)
        yield t
        t.close()


def test_lru_eviction_by_bytes() -> None:
    value = frame_of(b"x" * 1000)  # 1040 bytes
    tier = MemoryTier(capacity_bytes=3 * len(value))
    for i in range(3):
        tier.put(f"p/f/s/{i:06d}", value)
    tier.get("p/f/s/000000")  # now most recently used
    tier.put("p/f/s/000003", value)
    assert list(tier.list()) == ["p/f/s/000000", "p/f/s/000002", "p/f/s/000003"]
    stats = tier.stats()
    assert stats.evictions == 1 and stats.bytes_used == 3 * len(value)
    assert stats.bytes_evicted == len(value)  # the bytes of what was dropped


def test_value_larger_than_capacity_is_not_kept() -> None:
    tier = MemoryTier(capacity_bytes=100)
    tier.put("p/f/s/000000", frame_of(b"x" * 200))
    assert tier.get("p/f/s/000000") is None
    assert tier.stats().bytes_used == 0


def test_get_returns_the_stored_object_without_copy() -> None:
    tier = MemoryTier(capacity_bytes=1 << 20)
    value = frame_of(b"abc")
    tier.put("p/f/s/000000", value)
    assert tier.get("p/f/s/000000") is value
