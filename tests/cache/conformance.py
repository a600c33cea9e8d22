"""The contract every cache tier passes. Subclass and provide a ``tier`` fixture.

Usage::

    class TestMyTier(TierConformance):
        verifies_checksums = True

        @pytest.fixture()
        def tier(self, tmp_path):
            t = MyTier(tmp_path)
            yield t
            t.close()
"""

from __future__ import annotations

import threading
from typing import ClassVar

import pyarrow as pa
import pytest

from tierflow.cache import codec
from tierflow.cache.base import Tier, TierStats
from tierflow.errors import CorruptObject, InvalidKey

KEY = "demo/3f9a1c0e/clean/000042"

BAD_KEYS = [
    "",
    "/abs/path",
    "../escape",
    "demo/../../etc/passwd",
    "demo//double",
    "demo/trailing/",
    ".hidden",
    "demo/./x",
    "demo/sp ace",
    "demo/back\\slash",
    "demo/caf\u00e9",
    "demo/nul\x00byte",
    "x" * 401,
    "/".join(["a"] * 9),
]


def frame_of(payload: bytes) -> bytes:
    """An opaque-bytes frame around ``payload``."""
    return codec.encode_bytes(payload)


def table_frame(rows: int = 1000) -> bytes:
    """An Arrow frame of a small table."""
    return codec.encode_table(pa.table({"i": pa.array(range(rows)), "s": [str(i) for i in range(rows)]}))


class TierConformance:
    """Behaviour shared by every ``Tier``: misses, overwrite, delete, binary and empty
    values, large values, listing, key validation, stats, corruption, threads."""

    verifies_checksums: ClassVar[bool] = True
    large_bytes: ClassVar[int] = 8 << 20

    def test_is_a_tier(self, tier: Tier) -> None:
        assert isinstance(tier, Tier)
        assert tier.kind in ("memory", "lmdb", "remote")
        assert isinstance(tier.name, str) and tier.name

    def test_miss_is_none_not_error(self, tier: Tier) -> None:
        assert tier.get(KEY) is None
        assert tier.contains(KEY) is False
        assert tier.delete(KEY) is False

    def test_roundtrip(self, tier: Tier) -> None:
        value = table_frame()
        tier.put(KEY, value)
        assert tier.get(KEY) == value
        assert tier.contains(KEY)
        assert codec.decode_table(tier.get(KEY) or b"", KEY).num_rows == 1000

    def test_overwrite_replaces(self, tier: Tier) -> None:
        tier.put(KEY, frame_of(b"first"))
        tier.put(KEY, frame_of(b"second, longer value"))
        assert codec.decode_bytes(tier.get(KEY) or b"", KEY) == b"second, longer value"
        assert list(tier.list("demo/")) == [KEY]

    def test_delete(self, tier: Tier) -> None:
        tier.put(KEY, frame_of(b"x"))
        assert tier.delete(KEY) is True
        assert tier.get(KEY) is None
        assert not tier.contains(KEY)
        assert tier.delete(KEY) is False

    def test_binary_and_empty_payloads(self, tier: Tier) -> None:
        binary = frame_of(bytes(range(256)) * 4)
        empty = frame_of(b"")
        tier.put("demo/f/s/000001", binary)
        tier.put("demo/f/s/000002", empty)
        assert tier.get("demo/f/s/000001") == binary
        assert tier.get("demo/f/s/000002") == empty
        assert codec.decode_bytes(empty, "k") == b""

    def test_large_value(self, tier: Tier) -> None:
        payload = bytes(range(256)) * (self.large_bytes // 256)
        value = frame_of(payload)
        tier.put(KEY, value)
        got = tier.get(KEY)
        assert got is not None and len(got) == len(value) and got == value

    def test_list_prefix_sorted(self, tier: Tier) -> None:
        keys = ["demo/f1/a/000002", "demo/f1/a/000001", "demo/f1/b/000001", "other/f/a/000001"]
        for k in keys:
            tier.put(k, frame_of(k.encode()))
        assert list(tier.list("demo/f1/a/")) == ["demo/f1/a/000001", "demo/f1/a/000002"]
        assert list(tier.list("demo/")) == sorted(keys[:3])
        assert list(tier.list("demo/f1/a/00000")) == ["demo/f1/a/000001", "demo/f1/a/000002"]
        assert list(tier.list("nothing/")) == []
        assert sorted(tier.list()) == sorted(keys)

    @pytest.mark.parametrize("bad", BAD_KEYS, ids=lambda k: repr(k)[:30])
    def test_invalid_keys_rejected(self, tier: Tier, bad: str) -> None:
        with pytest.raises(InvalidKey):
            tier.put(bad, frame_of(b"x"))
        with pytest.raises(InvalidKey):
            tier.get(bad)
        with pytest.raises(InvalidKey):
            tier.contains(bad)
        with pytest.raises(InvalidKey):
            tier.delete(bad)
        assert list(tier.list()) == []

    def test_longest_valid_key(self, tier: Tier) -> None:
        key = "/".join(["k" * 99] * 4)  # 399 characters
        tier.put(key, frame_of(b"long"))
        assert tier.get(key) == frame_of(b"long")

    def test_stats_count(self, tier: Tier) -> None:
        tier.get(KEY)
        tier.put(KEY, frame_of(b"abc"))
        tier.get(KEY)
        stats = tier.stats()
        assert isinstance(stats, TierStats)
        assert stats.kind == tier.kind
        assert stats.hits >= 1 and stats.misses >= 1 and stats.puts >= 1
        assert stats.as_dict()["name"] == tier.name

    def test_corrupt_value_detected(self, tier: Tier) -> None:
        damaged = bytearray(table_frame())
        damaged[len(damaged) // 2] ^= 0x01
        tier.put(KEY, bytes(damaged))
        if self.verifies_checksums:
            with pytest.raises(CorruptObject) as info:
                tier.get(KEY)
            assert info.value.key == KEY
            assert tier.stats().corrupt == 1
        else:
            assert tier.get(KEY) == bytes(damaged)

    def test_concurrent_put_get(self, tier: Tier) -> None:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(10):
                    key = f"demo/f/t{n}/{i:06d}"
                    value = frame_of(f"{n}-{i}".encode() * 100)
                    tier.put(key, value)
                    assert tier.get(key) == value
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(list(tier.list("demo/f/"))) == 40

    def test_close_is_idempotent(self, tier: Tier) -> None:
        tier.close()
        tier.close()
