"""The tiered cache: read-through, promotion, repair of bad copies, capacity, spills,
unreachable stores, lifecycle, and the per-process singleton.

Every fault test ends with ``cache.check() == []``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from s3_endpoint import S3Endpoint, free_port

from tierflow.cache import codec
from tierflow.cache.settings import CacheSettings
from tierflow.cache.tiered import BlockMeta, TieredCache, close_all, get_cache
from tierflow.cache.tiers.remote import RemoteTier
from tierflow.errors import CorruptObject, InvalidKey, ReplicaLost, TierUnavailable

from .faults import FaultyTier, flip_byte_in_file

KEY = "demo/3f9a1c0e/clean/000042"


def table(rows: int = 10_000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"id": np.arange(rows) + seed, "x": rng.random(rows)})


def settings_for(root: Path, **kw: object) -> CacheSettings:
    kw.setdefault("lmdb_map_size", 1 << 30)
    kw.setdefault("memory_bytes", 64 << 20)
    kw.setdefault("lmdb_bytes", 256 << 20)
    return CacheSettings(root=str(root), **kw)  # type: ignore[arg-type]


@pytest.fixture()
def cache(tmp_path: Path) -> Iterator[TieredCache]:
    c = TieredCache(settings_for(tmp_path), node_id="node-a")
    yield c
    c.close()


def test_put_get_roundtrip_and_metadata(cache: TieredCache) -> None:
    t = table()
    meta = cache.put_table(KEY, t)
    assert isinstance(meta, BlockMeta)
    assert meta.rows == 10_000 and meta.locations == ("lmdb:node-a", "remote")
    assert meta.checksum.startswith("xxh3-128:") and meta.nbytes > t.nbytes
    assert cache.get_table(KEY).equals(t)
    assert cache.stats().counters["hits_memory"] == 1
    assert not cache.lmdb.is_pending(KEY)  # durable copy written -> unpinned
    assert pickle.loads(pickle.dumps(meta)) == meta
    assert cache.check() == []


def test_only_a_sole_lmdb_copy_is_flushed_to_disk(cache: TieredCache, monkeypatch: pytest.MonkeyPatch) -> None:
    # LMDB runs without a sync per commit: a copy that has another one elsewhere does not
    # need it, the only copy of a block does.
    syncs: list[int] = []
    real = cache.lmdb.sync
    monkeypatch.setattr(cache.lmdb, "sync", lambda: (syncs.append(1), real())[1])
    assert cache.put_table(KEY, table()).locations == ("lmdb:node-a", "remote")
    assert syncs == []
    assert cache.put_table(KEY.replace("42", "43"), table(), durable=False).locations == ("lmdb:node-a",)
    assert syncs == [1]


def test_read_through_promotes_hits(cache: TieredCache) -> None:
    t = table()
    cache.put_table(KEY, t)
    assert cache.memory is not None
    cache.memory.clear()
    assert cache.get_table(KEY).equals(t)
    assert cache.memory.contains(KEY)
    cache.memory.clear()
    cache.lmdb.delete(KEY)
    assert cache.get_table(KEY).equals(t)  # from the durable store
    assert cache.lmdb.contains(KEY) and not cache.lmdb.is_pending(KEY) and cache.memory.contains(KEY)
    counters = cache.stats().counters
    assert counters["hits_lmdb"] == 1 and counters["hits_remote"] == 1
    assert counters["promoted_lmdb"] == 1
    assert cache.check() == []


def test_flipped_byte_in_lmdb_copy_reads_remote_and_repairs(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, memory_bytes=0)
    cache = TieredCache(settings, node_id="node-a")
    t = table()
    cache.put_table(KEY, t)
    local = cache.lmdb.get(KEY)
    assert local is not None
    cache.close()
    flip_byte_in_file(tmp_path / "lmdb" / "data.mdb", local[5000:5064])

    cache = TieredCache(settings, node_id="node-a")
    with pytest.raises(CorruptObject):
        cache.lmdb.get(KEY)
    assert cache.get_table(KEY).equals(t)  # correct data, from the other copy
    counters = cache.stats().counters
    assert counters["corrupt_lmdb"] == 1 and counters["repaired"] == 1 and counters["hits_remote"] == 1
    assert cache.lmdb.get(KEY) == local  # the bad copy was rewritten
    assert cache.check() == [] and cache.verify().corrupt == ()
    cache.close()


def test_flipped_byte_in_remote_copy_reads_lmdb_and_verify_repairs(tmp_path: Path) -> None:
    cache = TieredCache(settings_for(tmp_path, memory_bytes=0), node_id="node-a")
    t = table()
    cache.put_table(KEY, t)
    remote_file = tmp_path / "store" / f"{KEY}.tfb"
    good_remote = remote_file.read_bytes()
    flip_byte_in_file(remote_file, good_remote[3000:3064])

    assert cache.get_table(KEY).equals(t)  # LMDB copy answers
    report = cache.verify()
    assert report.corrupt == ((KEY, "remote"),) and report.repaired == ((KEY, "remote"),)
    assert report.ok and remote_file.read_bytes() == good_remote
    assert cache.verify().corrupt == ()

    # And the other way round: only the remote copy left, and it is bad -> next copy is none.
    flip_byte_in_file(remote_file, good_remote[3000:3064])
    cache.lmdb.delete(KEY)
    with pytest.raises(ReplicaLost) as info:
        cache.get_table(KEY)
    assert "remote:file://" in str(info.value)
    assert cache.stats().counters["corrupt_remote"] == 1
    assert cache.verify().lost == (KEY,)
    assert cache.check() == []
    cache.close()


def test_bad_copies_are_replaced_by_reads_and_by_rewrites(tmp_path: Path) -> None:
    """A bad LMDB copy is repaired by the read that skips it; a bad remote copy is
    replaced by the next put of the same (deterministic) block."""
    cache = TieredCache(settings_for(tmp_path, memory_bytes=0), node_id="node-a")
    t = table()
    cache.put_table(KEY, t)
    local = cache.lmdb.get(KEY)
    assert local is not None
    damaged = bytearray(local)
    damaged[-100] ^= 1
    cache.lmdb.put(KEY, bytes(damaged))
    remote_file = tmp_path / "store" / f"{KEY}.tfb"
    assert cache.get_table(KEY).equals(t)
    assert cache.lmdb.get(KEY) == local
    # Now the remote copy is bad and LMDB lost its copy; recomputing and putting repairs it.
    flip_byte_in_file(remote_file, local[100:164])
    cache.lmdb.delete(KEY)
    cache.put_table(KEY, t)
    assert cache.verify().corrupt == ()
    assert cache.check() == []
    cache.close()


@pytest.mark.s3
def test_flipped_byte_in_s3_copy_is_repaired(tmp_path: Path, s3_env: S3Endpoint) -> None:
    bucket = s3_env.make_bucket("tierflow-tiered")
    settings = settings_for(
        tmp_path, memory_bytes=0, remote_url=f"{bucket}/flip", storage_options=s3_env.storage_options(),
        compression_level=1,
    )
    cache = TieredCache(settings, node_id="node-a")
    t = table()
    cache.put_table(KEY, t)
    assert isinstance(cache.remote, RemoteTier)
    fs = cache.remote._filesystem()
    path = cache.remote.path(KEY)
    good = fs.cat_file(path)
    assert good[5] == 1  # the durable copy is zstd-compressed
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0x10
    fs.pipe_file(path, bytes(damaged))

    cache.lmdb.delete(KEY)
    cache.lmdb.put(KEY, codec.encode_table(t))  # LMDB good, S3 bad
    report = cache.verify()
    assert report.repaired == ((KEY, "remote"),)
    assert fs.cat_file(path) == good
    # LMDB bad, S3 good: read from S3 (decompressed), LMDB repaired with an uncompressed frame.
    local = cache.lmdb.get(KEY)
    assert local is not None
    damaged = bytearray(local)
    damaged[50] ^= 1
    cache.lmdb.put(KEY, bytes(damaged))
    assert cache.get_table(KEY).equals(t)
    assert cache.lmdb.get(KEY) == local
    assert cache.check() == []
    cache.close()


def test_tiny_map_size_evicts_durable_blocks(tmp_path: Path) -> None:
    cache = TieredCache(settings_for(tmp_path, memory_bytes=0, lmdb_map_size=1 << 20), node_id="n")
    tables = {f"demo/f/s/{i:06d}": table(8_000, seed=i) for i in range(30)}  # ~128 KiB each
    for key, t in tables.items():
        cache.put_table(key, t)
    assert cache.lmdb.stats().evictions > 0
    assert cache.evicted_bytes() == (0, cache.lmdb.stats().bytes_evicted, 0) and cache.evicted_bytes()[1] > 0
    for key, t in tables.items():
        assert cache.get_table(key).equals(t)
    assert cache.check() == [] and cache.verify().ok
    cache.close()


def test_tiny_map_size_spills_pinned_blocks_to_remote(tmp_path: Path) -> None:
    cache = TieredCache(settings_for(tmp_path, memory_bytes=0, lmdb_map_size=1 << 20), node_id="n")
    tables = {f"demo/f/s/{i:06d}": table(8_000, seed=i) for i in range(12)}
    metas = [cache.put_table(key, t, durable=False) for key, t in tables.items()]
    counters = cache.stats().counters
    assert counters["spills"] > 0
    assert [m.locations for m in metas][:2] == [("lmdb:n",), ("lmdb:n",)]
    assert metas[-1].locations == ("remote",)  # spilled: the only place left
    pinned = cache.lmdb.pending_keys()
    assert pinned and cache.lmdb.stats().evictions == 0  # pinned blocks were never evicted
    for key, t in tables.items():
        assert cache.get_table(key).equals(t)
    assert cache.flush() == len(pinned) and cache.lmdb.pending_keys() == []
    cache.put_table("demo/f/s/999999", table(8_000, seed=99), durable=False)  # room again
    assert cache.lmdb.stats().evictions > 0
    assert cache.check() == [] and cache.verify().ok
    cache.close()


def unreachable_settings(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CacheSettings, str]:
    secret = "n0t-f0r-your-eyes-9f8e7d"
    monkeypatch.setenv("TF_TEST_UNREACH_KEY", "AKIAUNREACHABLE01")
    monkeypatch.setenv("TF_TEST_UNREACH_SECRET", secret)
    settings = settings_for(
        root,
        remote_url="s3://tierflow-bucket/cache",
        storage_options={
            "key": "${TF_TEST_UNREACH_KEY}",
            "secret": "${TF_TEST_UNREACH_SECRET}",
            "endpoint_url": f"http://127.0.0.1:{free_port()}",
        },
        remote_timeout_s=3.0,
    )
    return settings, secret


def test_unreachable_remote_fails_bounded_and_names_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, secret = unreachable_settings(tmp_path, monkeypatch)
    cache = TieredCache(settings, node_id="node-a")
    t = table()
    start = time.monotonic()
    with pytest.raises(TierUnavailable) as info:
        cache.put_table(KEY, t)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "remote:s3://tierflow-bucket/cache" in message
    assert secret not in message and "AKIAUNREACHABLE01" not in message
    assert secret not in repr(settings) and secret not in repr(cache.stats())

    # The local copy stays, pinned, and reads never raise for the unreachable store.
    assert cache.lmdb.is_pending(KEY)
    assert cache.get_table(KEY).equals(t)
    start = time.monotonic()
    assert cache.get("demo/3f9a1c0e/clean/000043") is None  # tries remote once, marks it down
    assert cache.get("demo/3f9a1c0e/clean/000044") is None  # skipped: no wait at all
    assert time.monotonic() - start < 10
    counters = cache.stats().counters
    assert counters["unavailable_remote"] >= 1 and counters["skipped_remote"] >= 1
    assert not cache.contains("demo/3f9a1c0e/clean/000044")

    # durable=False still works without the store.
    meta = cache.put_table("demo/3f9a1c0e/clean/000045", t, durable=False)
    assert meta.locations == ("lmdb:node-a",)
    with pytest.raises(TierUnavailable):
        cache.flush()
    assert cache.check() == []
    cache.close()


def test_lost_lmdb_directory_reads_from_remote(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, memory_bytes=0)
    cache = TieredCache(settings, node_id="node-a")
    t = table()
    cache.put_table(KEY, t)
    cache.close()
    shutil.rmtree(tmp_path / "lmdb")
    cache = TieredCache(settings, node_id="node-a")
    assert cache.get_table(KEY).equals(t)
    assert cache.lmdb.contains(KEY)  # promoted into the new environment
    cache.close()


def test_unavailable_lmdb_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "lmdb").write_text("a file where the environment should be")
    cache = TieredCache(settings_for(tmp_path), node_id="node-a")
    t = table()
    meta = cache.put_table(KEY, t)
    assert meta.locations == ("remote",)
    cache.memory.clear()  # type: ignore[union-attr]
    assert cache.get_table(KEY).equals(t)
    counters = cache.stats().counters
    assert counters["unavailable_lmdb"] >= 1 and counters["under_replicated"] == 1
    cache.close()


def test_memory_never_holds_the_only_copy(tmp_path: Path) -> None:
    remote = FaultyTier(RemoteTier(f"file://{tmp_path}/store"), unavailable=True)
    cache = TieredCache(settings_for(tmp_path, lmdb_map_size=1 << 20), node_id="n", remote=remote)
    big = table(100_000)  # ~1.6 MB: larger than LMDB's room
    with pytest.raises(TierUnavailable):
        cache.put_table(KEY, big)
    assert cache.memory is not None and not cache.memory.contains(KEY)
    assert cache.stats().counters["spills"] == 1
    remote.unavailable = False
    cache.put_table(KEY, big)
    assert cache.memory.contains(KEY) and cache.check() == []
    cache.close()


def test_flaky_remote_puts_raise_and_flush_recovers(tmp_path: Path) -> None:
    remote = FaultyTier(RemoteTier(f"file://{tmp_path}/store"), fail_puts_every=2)
    cache = TieredCache(settings_for(tmp_path), node_id="n", remote=remote)
    failed = []
    for i in range(6):
        key = f"demo/f/s/{i:06d}"
        try:
            cache.put_table(key, table(100, seed=i))
        except TierUnavailable:
            failed.append(key)
    assert failed == ["demo/f/s/000001", "demo/f/s/000003", "demo/f/s/000005"]
    assert cache.lmdb.pending_keys() == failed
    remote.fail_puts_every = 0
    assert cache.flush() == 3 and cache.lmdb.pending_keys() == []
    assert all(remote.inner.contains(k) for k in failed)
    assert cache.check() == []
    cache.close()


def test_compressed_remote_copy_uncompressed_local_copy(tmp_path: Path) -> None:
    cache = TieredCache(settings_for(tmp_path, compression_level=3), node_id="n")
    t = pa.table({"x": np.zeros(100_000, dtype=np.int64)})
    meta = cache.put_table(KEY, t)
    remote_frame = (tmp_path / "store" / f"{KEY}.tfb").read_bytes()
    assert remote_frame[5] == 1 and len(remote_frame) < meta.nbytes / 10
    local = cache.lmdb.get(KEY)
    assert local is not None and local[5] == 0 and len(local) == meta.nbytes
    cache.memory.clear()  # type: ignore[union-attr]
    cache.lmdb.delete(KEY)
    assert cache.get_table(KEY).equals(t)
    assert cache.lmdb.get(KEY) == local  # promoted uncompressed
    cache.close()


def test_bytes_delete_list_gc(cache: TieredCache) -> None:
    cache.put("demo/opaque/000001", codec.encode_bytes(b"notes"))  # a frame of either content
    assert codec.decode_bytes(cache.get("demo/opaque/000001") or b"", "k") == b"notes"
    with pytest.raises(CorruptObject):
        cache.get_table("demo/opaque/000001")
    for i in range(3):
        cache.put_table(f"demo/f/s/{i:06d}", table(10, seed=i))
        cache.put_table(f"other/f/s/{i:06d}", table(10, seed=i))
    assert list(cache.list("demo/f/")) == [f"demo/f/s/{i:06d}" for i in range(3)]
    assert cache.contains("demo/f/s/000000")
    assert cache.delete("demo/f/s/000000") and not cache.delete("demo/f/s/000000")
    assert not cache.contains("demo/f/s/000000")
    with pytest.raises(ReplicaLost):
        cache.get_table("demo/f/s/000000")
    assert cache.gc("demo", keep=lambda k: k.endswith("000002")) == 2
    assert list(cache.list("demo/")) == ["demo/f/s/000002"]
    assert len(list(cache.list("other/"))) == 3
    assert cache.gc() == 4 and list(cache.list()) == []
    assert cache.check() == []


def test_put_rejects_bad_frames_and_keys(cache: TieredCache) -> None:
    with pytest.raises(CorruptObject):
        cache.put(KEY, b"not a frame at all, just bytes that are long enough")
    frame = bytearray(codec.encode_table(table(10)))
    frame[-1] ^= 1
    with pytest.raises(CorruptObject):
        cache.put(KEY, bytes(frame))
    with pytest.raises(InvalidKey):
        cache.put_table("../escape", table(10))
    with pytest.raises(InvalidKey):
        cache.get("a//b")
    assert list(cache.list()) == []


def test_cache_is_not_picklable(cache: TieredCache) -> None:
    with pytest.raises(TypeError, match="get_cache"):
        pickle.dumps(cache)


def test_get_cache_is_a_per_process_singleton_reopened_after_fork(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    cache = get_cache(settings)
    assert get_cache(settings_for(tmp_path)) is cache
    cache.put_table(KEY, table())
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = get_cache(settings)
            assert child is not cache
            assert child.get_table(KEY).equals(table())
            child.put_table("demo/3f9a1c0e/clean/000043", table(seed=1))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert get_cache(settings) is cache
    assert cache.get_table("demo/3f9a1c0e/clean/000043").equals(table(seed=1))
    assert cache.check() == []
    close_all()


def test_a_cache_directory_deleted_under_the_process_is_opened_again(tmp_path: Path) -> None:
    # A notebook's second run after `rm -rf cache/`: the first run's Ray workers are reused.
    settings = settings_for(tmp_path / "c", memory_bytes=0)
    cache = get_cache(settings)
    cache.put_table(KEY, table())
    data = Path(cache.lmdb.path) / "data.mdb"
    shutil.rmtree(tmp_path / "c")
    try:
        again = get_cache(settings)
        assert again is not cache
        again.put_table("demo/3f9a1c0e/clean/000043", table(seed=1))
        assert data.exists() and data.stat().st_size > 0  # where other processes look
        assert again.get(KEY) is None  # what the deleted directory held is gone, honestly
        assert get_cache(settings) is again  # not replaced again
    finally:
        close_all()


def test_reads_never_raise_for_unavailable_tiers(tmp_path: Path) -> None:
    remote = FaultyTier(RemoteTier(f"file://{tmp_path}/store"))
    now = [0.0]
    cache = TieredCache(settings_for(tmp_path, memory_bytes=0), node_id="n", remote=remote, clock=lambda: now[0])
    t = table()
    cache.put_table(KEY, t)
    cache.lmdb.close()  # LMDB gone: every call raises TierUnavailable("closed")
    remote.unavailable = True
    assert cache.get(KEY) is None
    assert not cache.contains(KEY)
    with pytest.raises(ReplicaLost) as info:
        cache.get_table(KEY)
    assert info.value.key == KEY and len(info.value.tried) == 2
    calls = remote.calls
    cache.get(KEY)  # within unavailable_retry_s: the store is not even asked
    assert remote.calls == calls
    counters = cache.stats().counters
    assert counters["unavailable_remote"] == 1 and counters["skipped_remote"] >= 1
    assert counters["unavailable_lmdb"] >= 1
    now[0] += 10  # back-off over, store back
    remote.unavailable = False
    assert cache.get_table(KEY).equals(t)
