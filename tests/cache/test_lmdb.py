"""The node-local LMDB tier: conformance, LRU capacity, pinning, tiny maps, bit rot, fork,
several processes, stale readers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from tierflow.cache import codec
from tierflow.cache.tiers.lmdb import LmdbTier
from tierflow.errors import CorruptObject, TierUnavailable

from .conformance import KEY, TierConformance, frame_of, table_frame


class TestLmdbTier(TierConformance):
    verifies_checksums = True

    @pytest.fixture()
    def tier(self, tmp_path: Path) -> Iterator[LmdbTier]:
        t = LmdbTier(str(tmp_path / "lmdb"), capacity_bytes=256 << 20, map_size=1 << 30)
        yield t
        t.close()


class Clock:
    """A fake nanosecond clock that advances by one second per call."""

    def __init__(self) -> None:
        self.now = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        self.now += 10**9
        return self.now


def make(tmp_path: Path, capacity: int, map_size: int = 1 << 30) -> LmdbTier:
    return LmdbTier(str(tmp_path / "lmdb"), capacity_bytes=capacity, map_size=map_size, clock=Clock())


VALUE = frame_of(b"v" * 4056)  # 4096-byte frames


def test_lru_eviction_keeps_recently_read(tmp_path: Path) -> None:
    tier = make(tmp_path, capacity=3 * len(VALUE))
    for i in range(3):
        tier.put(f"p/f/s/{i:06d}", VALUE)
    assert tier.get("p/f/s/000000") == VALUE  # access time recorded, written at next put
    tier.put("p/f/s/000003", VALUE)
    assert list(tier.list()) == ["p/f/s/000000", "p/f/s/000002", "p/f/s/000003"]
    stats = tier.stats()
    assert stats.evictions == 1 and stats.bytes_used == 3 * len(VALUE) and stats.entries == 3
    assert stats.bytes_evicted == tier.bytes_evicted() == len(VALUE)
    assert tier.put_counted("p/f/s/000004", VALUE) == len(VALUE)  # what this one write evicted
    assert tier.check() == []
    tier.close()


def test_pending_blocks_are_never_evicted(tmp_path: Path) -> None:
    tier = make(tmp_path, capacity=3 * len(VALUE))
    tier.put("p/f/s/000000", VALUE, pending=True)
    tier.put("p/f/s/000001", VALUE)
    tier.put("p/f/s/000002", VALUE, pending=True)
    tier.put("p/f/s/000003", VALUE)  # evicts 000001, the only unpinned one
    assert list(tier.list()) == ["p/f/s/000000", "p/f/s/000002", "p/f/s/000003"]
    tier.put("p/f/s/000004", VALUE, pending=True)  # evicts 000003
    with pytest.raises(TierUnavailable, match="full:") as info:
        tier.put("p/f/s/000005", VALUE)  # everything left is pinned
    assert info.value.tier == tier.name
    assert list(tier.list()) == ["p/f/s/000000", "p/f/s/000002", "p/f/s/000004"]
    assert tier.pending_keys() == ["p/f/s/000000", "p/f/s/000002", "p/f/s/000004"]
    assert tier.mark_durable("p/f/s/000000") and not tier.is_pending("p/f/s/000000")
    tier.put("p/f/s/000005", VALUE)  # now 000000 can go
    assert "p/f/s/000000" not in list(tier.list())
    assert tier.check() == []
    tier.close()


def test_value_larger_than_capacity_is_refused(tmp_path: Path) -> None:
    tier = make(tmp_path, capacity=1000)
    with pytest.raises(TierUnavailable, match="full:"):
        tier.put(KEY, VALUE)
    assert tier.check() == [] and list(tier.list()) == []
    tier.close()


def test_tiny_map_size_evicts_without_corruption(tmp_path: Path) -> None:
    tier = LmdbTier(str(tmp_path / "lmdb"), capacity_bytes=1 << 30, map_size=1 << 20)
    assert tier.capacity_bytes == 512 << 10
    value = frame_of(os.urandom(60_000))
    for i in range(60):  # 3.6 MB through a 1 MiB map
        tier.put(f"p/f/s/{i:06d}", value)
        assert tier.get(f"p/f/s/{i:06d}") == value
    stats = tier.stats()
    assert stats.evictions >= 50 and (stats.bytes_used or 0) <= 512 << 10
    assert tier.check() == []
    for key in tier.list():
        assert tier.get(key) == value
    tier.close()


def test_map_full_with_a_reader_holding_old_pages_fails_cleanly(tmp_path: Path) -> None:
    """A long-lived reader pins freed pages, so LMDB itself runs out of map: the put
    fails with ``full:`` and the environment stays consistent and usable."""
    tier = LmdbTier(str(tmp_path / "lmdb"), capacity_bytes=1 << 30, map_size=1 << 20)
    value = frame_of(os.urandom(100_000))
    assert tier._handle is not None
    failures = 0
    with tier._handle.use() as (env, _):
        reader = env.begin()  # an old snapshot: nothing freed after this can be reused
        for i in range(40):
            try:
                tier.put(f"p/f/s/{i:06d}", value)
            except TierUnavailable as exc:
                assert "full:" in exc.reason
                failures += 1
        reader.abort()
    assert failures > 0
    assert tier.check() == []
    tier.put("p/f/s/999999", value)  # usable again once the reader is gone
    assert tier.get("p/f/s/999999") == value
    assert tier.check() == []
    tier.close()


def test_flipped_byte_on_disk_is_detected(tmp_path: Path) -> None:
    tier = make(tmp_path, capacity=64 << 20)
    value = table_frame(20_000)
    tier.put(KEY, value)
    tier.close()
    data_file = tmp_path / "lmdb" / "data.mdb"
    raw = bytearray(data_file.read_bytes())
    at = raw.find(value[1000:1064])
    assert at > 0
    raw[at + 10] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    tier = make(tmp_path, capacity=64 << 20)
    with pytest.raises(CorruptObject, match="checksum mismatch"):
        tier.get(KEY)
    assert tier.stats().corrupt == 1
    tier.put(KEY, value)  # repair
    assert tier.get(KEY) == value
    tier.close()


def test_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tier = LmdbTier(str(blocker / "lmdb"), capacity_bytes=1 << 20, map_size=1 << 24)
    with pytest.raises(TierUnavailable) as info:
        tier.get(KEY)
    assert str(blocker) in str(info.value)
    tier.close()


def test_foreign_environment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lmdb"
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"info")) as txn:
        txn.put(b"format", b"something-else/9")
    env.close()
    tier = make(tmp_path, capacity=1 << 20)
    with pytest.raises(TierUnavailable, match="something-else"):
        tier.get(KEY)
    tier.close()


def test_env_is_reopened_not_reused_after_fork(tmp_path: Path) -> None:
    tier = make(tmp_path, capacity=64 << 20)
    tier.put("p/f/s/000000", VALUE)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            assert tier.get("p/f/s/000000") == VALUE
            tier.put("p/f/s/000001", VALUE)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert tier.get("p/f/s/000001") == VALUE
    tier.put("p/f/s/000002", VALUE)
    assert tier.check() == []
    tier.close()


def _writer(path: str, n: int) -> None:
    tier = LmdbTier(path, capacity_bytes=64 << 20, map_size=1 << 30)
    for i in range(20):
        tier.put(f"p/f/w{n}/{i:06d}", frame_of(f"{n}:{i}".encode() * 500))
        assert tier.get(f"p/f/w{n}/{i:06d}") is not None
    tier.close()


def test_several_processes_share_one_environment(tmp_path: Path) -> None:
    path = str(tmp_path / "lmdb")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, n)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    tier = LmdbTier(path, capacity_bytes=64 << 20, map_size=1 << 30)
    assert len(list(tier.list())) == 60
    assert codec.decode_bytes(tier.get("p/f/w2/000019") or b"", "k") == b"2:19" * 500
    assert tier.check() == []
    tier.close()


def test_stale_reader_of_a_killed_process_is_cleared_on_open(tmp_path: Path) -> None:
    path = tmp_path / "lmdb"
    make(tmp_path, capacity=1 << 20).close()  # create it
    script = textwrap.dedent(
        f"""
        import lmdb, sys, time
        env = lmdb.open({str(path)!r}, max_dbs=8, max_readers=1024)
        txn = env.begin()
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    tier = make(tmp_path, capacity=1 << 20)
    assert tier._handle is not None
    with tier._handle.use() as (env, _):
        assert str(child.pid) not in env.readers()
    tier.close()


def test_no_stale_heap_bytes_reach_the_data_file(tmp_path: Path) -> None:
    """With MDB_NOMEMINIT, LMDB writes whatever the heap held (other blocks, resolved
    credentials) into unused page space; the tier keeps meminit on."""
    tier = make(tmp_path, capacity=64 << 20)
    marker = b"SECRET-MARKER-0123456789"
    for i in range(200):
        junk = bytearray(marker * 200)  # heap full of the marker, freed at once
        del junk
        tier.put(f"p/f/s/{i:06d}", frame_of(os.urandom(300 + i)))
    tier.close()
    assert marker not in (tmp_path / "lmdb" / "data.mdb").read_bytes()
