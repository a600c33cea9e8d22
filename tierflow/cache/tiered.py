"""The tiered block cache: read-through with promotion, replicas, checksum repair.

Reads go memory -> this node's LMDB -> a peer node's LMDB -> the durable store and stop at
the first good copy. A copy that fails its checksum is a miss: the next copy is read, and
the bad one is rewritten from the good one (counted as ``corrupt_*`` and ``repaired``).
A hit is promoted into the faster tiers. An unreachable tier is skipped for
``unavailable_retry_s`` and counted; reads never raise for it.

Writes (``put``/``put_table``) with ``durable=True`` go to the durable store, then to
this node's LMDB, then to peer nodes until ``replicas`` failure domains hold the block.
With ``durable=False`` (or when the durable write fails) the LMDB copy is *pinned*: it is
never evicted before its durable copy exists (:meth:`TieredCache.flush` writes it). If
LMDB has no room the block *spills*: it goes to the durable store even when
``durable=False``. The memory tier is written last, never holding the only copy.

Usage::

    cache = get_cache(settings)                 # one per process, reopened after fork
    meta = cache.put_table("demo/3f9a/clean/000042", table)
    table = cache.get_table("demo/3f9a/clean/000042")
"""

from __future__ import annotations

import builtins
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tierflow.cache import codec
from tierflow.cache.base import Peers, Tier, TierStats
from tierflow.cache.keys import validate_key
from tierflow.cache.locations import REMOTE, lmdb_location, lmdb_nodes, memory_location
from tierflow.cache.settings import CacheSettings
from tierflow.cache.tiers.lmdb import LmdbTier
from tierflow.cache.tiers.memory import MemoryTier
from tierflow.cache.tiers.remote import RemoteTier
from tierflow.errors import CorruptObject, ReplicaLost, TierUnavailable

__all__ = [
    "BlockMeta",
    "CacheStats",
    "TieredCache",
    "VerifyReport",
    "get_cache",
]

@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What the driver learns about a stored block (no data).

    Attributes:
        key: The block key.
        rows: Number of rows (0 for opaque bytes).
        nbytes: Size of the uncompressed frame in bytes.
        checksum: ``"xxh3-128:<hex>"`` of the uncompressed content.
        locations: Location names holding a copy when ``put`` returned, in write order
            (``lmdb:<node>``, ``remote``); see ``storage/FORMAT.md`` section 5.
    """

    key: str
    rows: int
    nbytes: int
    checksum: str
    locations: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Cache-level counters plus each tier's own statistics."""

    node_id: str
    counters: Mapping[str, int]
    tiers: tuple[TierStats, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (for JSON and the CLI)."""
        return {
            "node_id": self.node_id,
            "counters": dict(sorted(self.counters.items())),
            "tiers": [t.as_dict() for t in self.tiers],
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Result of :meth:`TieredCache.verify`.

    Attributes:
        checked: Number of (key, location) copies read and hashed.
        corrupt: ``(key, location)`` of every copy that failed verification.
        repaired: ``(key, location)`` of every copy rewritten from a good one.
        lost: Keys with no good copy left among the locations checked.
    """

    checked: int = 0
    corrupt: tuple[tuple[str, str], ...] = ()
    repaired: tuple[tuple[str, str], ...] = ()
    lost: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is lost and every corrupt copy was repaired."""
        return not self.lost and len(self.repaired) == len(self.corrupt)


def _default_node_id() -> str:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()


class TieredCache:
    """Memory -> LMDB -> peers -> durable store, for one process on one node.

    Thread-safe. Not picklable: ship :class:`CacheSettings` and call :func:`get_cache` in
    the receiving process.

    Args:
        settings: Where and how to store.
        node_id: This node's failure-domain name (default: the Ray node id, else the host
            name).
        memory, lmdb, remote: Tier instances to use instead of the ones ``settings``
            describes (tests inject faulty tiers here). ``memory`` may be ``None`` only
            through ``settings.memory_bytes == 0``.
        peers: Other nodes' LMDB copies, or ``None`` (single node).
        clock: Monotonic clock for the unavailable-tier back-off (injectable).
    """

    def __init__(
        self,
        settings: CacheSettings,
        *,
        node_id: str | None = None,
        memory: Tier | None = None,
        lmdb: LmdbTier | None = None,
        remote: Tier | None = None,
        peers: Peers | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.node_id = node_id or _default_node_id()
        if memory is None and settings.memory_bytes > 0:
            memory = MemoryTier(settings.memory_bytes, name=memory_location(self.node_id))
        self.memory = memory
        self.lmdb = lmdb if lmdb is not None else LmdbTier(
            settings.lmdb_path_for(self.node_id),
            capacity_bytes=settings.lmdb_bytes,
            map_size=settings.lmdb_map_size,
            sync=False,  # flushed in _put when this copy turns out to be the only one
        )
        self.remote: Tier = remote if remote is not None else RemoteTier(
            settings.durable_url, settings.storage_options, timeout_s=settings.remote_timeout_s
        )
        self.peers = peers
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self._counts: Counter[str] = Counter()
        self.local_location = lmdb_location(self.node_id)

    def __reduce__(self) -> Any:
        raise TypeError(
            "TieredCache holds per-process handles; send CacheSettings and call "
            "get_cache(settings) where it is needed"
        )

    # -- bookkeeping ------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _is_down(self, tier: Tier) -> bool:
        with self._lock:
            until = self._down_until.get(tier.name)
            if until is None:
                return False
            if self._clock() >= until:
                del self._down_until[tier.name]
                return False
        self._count(f"skipped_{tier.kind}")
        return True

    def _mark_down(self, tier: Tier, exc: TierUnavailable) -> None:
        with self._lock:
            self._counts[f"unavailable_{tier.kind}"] += 1
            self._down_until[tier.name] = self._clock() + self.settings.unavailable_retry_s

    def _read(self, tier: Tier, key: str, corrupt: list[Tier]) -> bytes | None:
        """One tier's copy, or None on miss, corruption, or unavailability (never raises)."""
        if self._is_down(tier):
            return None
        try:
            return tier.get(key)
        except CorruptObject:
            self._count(f"corrupt_{tier.kind}")
            corrupt.append(tier)
        except TierUnavailable as exc:
            self._mark_down(tier, exc)
        return None

    # -- reads ------------------------------------------------------------------------

    def get(self, key: str, *, locations: Sequence[str] = ()) -> bytes | None:
        """Return a verified, uncompressed frame for ``key`` from the fastest good copy
        (:meth:`get_located` says which tier served it)."""
        return self.get_located(key, locations=locations)[0]

    def get_located(self, key: str, *, locations: Sequence[str] = ()) -> tuple[bytes | None, str]:
        """Return a verified, uncompressed frame for ``key`` from the fastest good copy,
        and the tier that served it: ``memory``, ``lmdb``, ``peer`` or ``remote`` (``""``
        on a miss). The tier is this read's own, exact even with other threads reading.

        Promotes the hit into faster tiers and rewrites any bad copy met on the way.
        Never raises for an unavailable tier; it is skipped and counted in :meth:`stats`.

        Args:
            key: Block key.
            locations: Where the block was written (``BlockMeta.locations``): peer nodes
                named there are asked first.

        Returns:
            The frame, or ``None`` when no tier has a good copy.

        Raises:
            InvalidKey: ``key`` is malformed.
        """
        validate_key(key)
        corrupt: list[Tier] = []
        if self.memory is not None:
            data = self._read(self.memory, key, corrupt)
            if data is not None:
                self._count("hits_memory")
                return data, "memory"
        data = self._read(self.lmdb, key, corrupt)
        source = "lmdb"
        if data is None and self.peers is not None:
            found = self._fetch_peer(key, locations)
            if found is not None:
                data, source = found[0], "peer"
        if data is None:
            remote = self._read(self.remote, key, corrupt)
            if remote is not None:
                try:
                    data, source = codec.recode(remote, key, None), "remote"
                except CorruptObject:  # verified already; only a decompression failure
                    self._count("corrupt_remote")
                    corrupt.append(self.remote)
        if data is None:
            self._count("misses")
            return None, ""
        self._count(f"hits_{source}")
        self._promote(key, data, source, corrupt)
        return data, source

    def _fetch_peer(self, key: str, hints: Sequence[str]) -> tuple[bytes, str] | None:
        assert self.peers is not None
        try:
            found = self.peers.fetch(key, [h for h in hints if h != self.local_location])
        except TierUnavailable:
            self._count("unavailable_peer")
            return None
        if found is None:
            return None
        try:
            codec.verify(found[0], key)
        except CorruptObject:
            self._count("corrupt_peer")
            return None
        return found

    def _promote(self, key: str, data: bytes, source: str, corrupt: list[Tier]) -> None:
        if source != "lmdb" or self.lmdb in corrupt:
            repairing = self.lmdb in corrupt
            try:
                # A promoted copy is an extra copy (the source still holds one), so it may be
                # evicted; a repaired copy keeps the pin it had.
                pending = repairing and self._safe(lambda: self.lmdb.is_pending(key), False)
                self.lmdb.put(key, data, pending=pending)
                self._count("repaired" if repairing else "promoted_lmdb")
            except TierUnavailable as exc:
                if not exc.reason.startswith("full:"):
                    self._mark_down(self.lmdb, exc)
        if self.remote in corrupt:
            try:
                self.remote.put(key, codec.recode(data, key, self.settings.compression_level))
                self._count("repaired")
            except TierUnavailable as exc:
                self._mark_down(self.remote, exc)
        if self.memory is not None:
            self.memory.put(key, data)

    @staticmethod
    def _safe(fn: Callable[[], bool], default: bool) -> bool:
        try:
            return fn()
        except TierUnavailable:
            return default

    def get_table(self, key: str, *, locations: Sequence[str] = ()) -> pa.Table:
        """Return the block's table (see :meth:`get` for ``locations``).

        Raises:
            ReplicaLost: No tier holds a good copy (the message lists the tiers tried).
            CorruptObject: The only good frame holds opaque bytes, not a table.
        """
        return self.get_table_located(key, locations=locations)[0]

    def get_table_located(self, key: str, *, locations: Sequence[str] = ()) -> tuple[pa.Table, str, int]:
        """:meth:`get_table`, plus the tier that served it (see :meth:`get_located`) and
        the frame's size in bytes.

        Raises:
            ReplicaLost, CorruptObject: as :meth:`get_table`.
        """
        data, tier = self.get_located(key, locations=locations)
        if data is None:
            raise ReplicaLost(key, self._tried())
        return codec.decode_table_unchecked(data, key), tier, len(data)

    def _tried(self) -> builtins.list[str]:
        names = [t.name for t in (self.memory, self.lmdb) if t is not None]
        if self.peers is not None:
            names.append("peers")
        return [*names, self.remote.name]

    def contains(self, key: str) -> bool:
        """Whether any reachable tier on this node or the durable store holds ``key``.

        Does not read or verify the value; never raises for an unavailable tier.
        """
        validate_key(key)
        for tier in (self.memory, self.lmdb, self.remote):
            if tier is None or self._is_down(tier):
                continue
            try:
                if tier.contains(key):
                    return True
            except TierUnavailable as exc:
                self._mark_down(tier, exc)
        return False

    # -- writes -----------------------------------------------------------------------

    def put(self, key: str, frame: bytes, *, durable: bool = True, rows: int = 0) -> BlockMeta:
        """Store a frame with the configured replicas.

        Args:
            key: Block key.
            frame: A frame from :mod:`tierflow.cache.codec` (compressed or not; local
                copies are kept uncompressed, the durable copy uses the settings' level).
            durable: Also write the durable store before returning. With ``False`` the
                block lives on this node's LMDB (pinned) and on peers; :meth:`flush`
                writes its durable copy later. It is still written durably when LMDB
                has no room (a spill).
            rows: Row count recorded in the returned metadata.

        Returns:
            The block's metadata, including where it is stored.

        Raises:
            InvalidKey: ``key`` is malformed.
            CorruptObject: ``frame`` is not a valid frame.
            TierUnavailable: The durable store could not be written although it had to be
                (``durable=True``, or LMDB had no room). Copies already written stay,
                pinned, and :meth:`flush` retries the durable write.
        """
        validate_key(key)
        codec.verify(frame, key)
        return self._put(key, frame, durable=durable, rows=rows)

    def _put(self, key: str, frame: bytes, *, durable: bool, rows: int) -> BlockMeta:
        header = codec.read_header(frame, key)
        local = frame if header.codec == codec.Codec.NONE else codec.recode(frame, key, None)
        checksum = codec.read_header(local, key).checksum_hex

        # A durable put writes the durable copy first, so the local copy can be stored
        # unpinned in one LMDB transaction (one fdatasync; pinning then unpinning would
        # cost two). If the durable write fails, the local copy is stored pinned instead.
        remote_done = False
        remote_error: TierUnavailable | None = None
        if durable:
            remote_done, remote_error = self._put_remote(key, local)

        local_ok = False
        try:
            self.lmdb.put(key, local, pending=not remote_done)
            local_ok = True
        except TierUnavailable as exc:
            if exc.reason.startswith("full:"):
                self._count("spills")
            else:
                self._mark_down(self.lmdb, exc)
        if not durable and not local_ok:  # spill: the durable store is the only place left
            remote_done, remote_error = self._put_remote(key, local)

        peers: list[str] = []
        wanted_peers = self.settings.replicas - int(local_ok) - int(remote_done)
        if wanted_peers > 0 and self.peers is not None:
            try:
                peers = self.peers.replicate(key, local, wanted_peers, pinned=not remote_done)
            except TierUnavailable:
                self._count("unavailable_peer")

        if remote_error is not None:
            self._count("durable_write_failed")
            raise remote_error

        locations = ([self.local_location] if local_ok else []) + peers + ([REMOTE] if remote_done else [])
        if locations == [self.local_location]:
            self.lmdb.sync()  # the only copy: it must survive an OS crash too
        if len(locations) < self.settings.replicas:
            self._count("under_replicated")
        if self.memory is not None:
            self.memory.put(key, local)
        self._count("puts")
        return BlockMeta(key, rows, len(local), checksum, tuple(locations))

    def _put_remote(self, key: str, local: bytes) -> tuple[bool, TierUnavailable | None]:
        try:
            self.remote.put(key, codec.recode(local, key, self.settings.compression_level))
        except TierUnavailable as exc:
            self._mark_down(self.remote, exc)
            return False, exc
        return True, None

    def rereplicate(self, key: str, locations: Sequence[str]) -> list[str]:
        """Copy ``key`` to new peers until ``replicas`` places hold it again, after the
        nodes of some of its copies were lost; ``locations`` are the copies left. Run it
        on a node holding one (the read is local). Returns the locations added."""
        wanted = self.settings.replicas - len(locations)
        if wanted <= 0 or self.peers is None:
            return []
        frame = self.get(key, locations=locations)
        if frame is None:
            return []
        holders = set(lmdb_nodes(locations))
        try:
            added = self.peers.replicate(key, frame, wanted, pinned=REMOTE not in locations, skip=holders)
        except TierUnavailable:
            self._count("unavailable_peer")
            return []
        self._count("rereplicated", len(added))
        return added

    def put_table(self, key: str, table: pa.Table, *, durable: bool = True) -> BlockMeta:
        """Encode ``table`` (Arrow IPC stream in a frame) and :meth:`put` it."""
        validate_key(key)
        return self._put(key, codec.encode_table(table), durable=durable, rows=table.num_rows)

    def flush(self, prefix: str = "") -> int:
        """Write the durable copy of every pinned LMDB block under ``prefix``.

        Returns:
            Number of blocks made durable.

        Raises:
            TierUnavailable: The durable store cannot be written (blocks stay pinned).
        """
        done = 0
        for key in self.lmdb.pending_keys(prefix):
            data = self.lmdb.get(key)
            if data is None:
                continue
            self.remote.put(key, codec.recode(data, key, self.settings.compression_level))
            self.lmdb.mark_durable(key)
            done += 1
        self._count("flushed", done)
        return done

    # -- lifecycle --------------------------------------------------------------------

    def delete(self, key: str) -> bool:
        """Delete every copy of ``key`` (memory, LMDB, peers, durable store).

        Returns:
            Whether any copy existed.

        Raises:
            TierUnavailable: A tier holding copies could not be reached (the others were
                still deleted).
        """
        validate_key(key)
        existed = False
        failure: TierUnavailable | None = None
        for tier in (self.memory, self.lmdb, self.remote):
            if tier is None:
                continue
            try:
                existed = tier.delete(key) or existed
            except TierUnavailable as exc:
                failure = failure or exc
        if self.peers is not None:
            try:
                existed = self.peers.delete(key) > 0 or existed
            except TierUnavailable as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        self._count("deletes")
        return existed

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` held by this node's LMDB or the durable store, sorted.

        Raises:
            TierUnavailable: A tier cannot be listed.
        """
        keys = set(self.lmdb.list(prefix)) | set(self.remote.list(prefix))
        return iter(sorted(keys))

    def delete_prefix(self, prefix: str, *, keep: Callable[[str], bool] | None = None) -> int:
        """Delete every key under ``prefix`` (``"demo/"``) unless ``keep(key)``.

        Returns:
            Number of keys deleted.
        """
        deleted = 0
        for key in list(self.list(prefix)):
            if keep is not None and keep(key):
                continue
            if self.delete(key):
                deleted += 1
        return deleted

    def gc(self, pipeline: str | None = None, *, keep: Callable[[str], bool] | None = None) -> int:
        """Delete a pipeline's entries (all entries when ``pipeline`` is None) except kept ones.

        Returns:
            Number of keys deleted.
        """
        prefix = "" if pipeline is None else validate_key(pipeline) + "/"
        return self.delete_prefix(prefix, keep=keep)

    # -- integrity --------------------------------------------------------------------

    def verify(self, prefix: str = "", *, repair: bool = True) -> VerifyReport:
        """Read and hash every copy on this node's LMDB and the durable store.

        A bad copy is rewritten from a good one when ``repair`` is set. Blocks that have
        no good copy are reported as lost (their bad copies are left for inspection).
        """
        checked = 0
        corrupt: list[tuple[str, str]] = []
        repaired: list[tuple[str, str]] = []
        lost: list[str] = []
        for key in self.list(prefix):
            good: bytes | None = None
            bad: list[Tier] = []
            for tier in (self.lmdb, self.remote):
                try:
                    data = tier.get(key)
                except CorruptObject:
                    bad.append(tier)
                    corrupt.append((key, self._location(tier)))
                    checked += 1
                    continue
                if data is not None:
                    checked += 1
                    if good is None:
                        good = data if tier is self.lmdb else codec.recode(data, key, None)
            if good is None:
                if bad:
                    lost.append(key)
                continue
            if self.memory is not None:
                held = self.memory.get(key)
                if held is not None and held != good:
                    corrupt.append((key, self._location(self.memory)))
                    self.memory.delete(key)
                    repaired.append((key, self._location(self.memory)))
            if not repair:
                continue
            for tier in bad:
                if tier is self.lmdb:
                    self.lmdb.put(key, good, pending=False)
                else:
                    tier.put(key, codec.recode(good, key, self.settings.compression_level))
                repaired.append((key, self._location(tier)))
        self._count("verify_repaired", len(repaired))
        return VerifyReport(checked, tuple(corrupt), tuple(repaired), tuple(lost))

    def _location(self, tier: Tier) -> str:
        if tier is self.lmdb:
            return self.local_location
        if tier is self.remote:
            return REMOTE
        return memory_location(self.node_id)

    def check(self) -> builtins.list[str]:
        """Structural consistency problems (empty list when consistent). Cheap; no hashing.

        Checks the LMDB invariants (``LmdbTier.check``) and that the memory tier never
        holds the only copy of a block.
        """
        problems = [f"lmdb: {p}" for p in self.lmdb.check()]
        if self.memory is not None:
            for key in self.memory.list():
                if not (self.lmdb.contains(key) or self.remote.contains(key)):
                    problems.append(f"memory holds the only copy of {key}")
        return problems

    def stats(self) -> CacheStats:
        """Counters (hits per tier, misses, corrupt copies, repairs, promotions, spills,
        unavailable/skipped tiers) and each tier's statistics."""
        with self._lock:
            counters = dict(self._counts)
        tiers = [t.stats() for t in (self.memory, self.lmdb, self.remote) if t is not None]
        return CacheStats(self.node_id, counters, tuple(tiers))

    def memory_held(self) -> int:
        """Bytes held by this process's memory tier (0 without one). Cheap: no copying."""
        return 0 if self.memory is None else self.memory.stats().bytes_used or 0

    def evicted_bytes(self) -> tuple[int, int, int]:
        """Bytes evicted to make room by this process so far: ``(memory tier, its node's
        LMDB, other nodes' LMDB)``. The LMDB figures count what this process's writes
        evicted (an environment is shared by its node's processes and cache server; each
        counts its own; a peer's evictions for a peer copy come back with the write).
        Cheap: three counters."""
        memory = 0 if self.memory is None else self.memory.stats().bytes_evicted
        peers = 0 if self.peers is None else self.peers.evicted_bytes()
        return memory, self.lmdb.bytes_evicted(), peers

    def close(self) -> None:
        """Close every tier. Idempotent."""
        for tier in (self.memory, self.lmdb, self.remote):
            if tier is not None:
                tier.close()


_CACHES: dict[CacheSettings, TieredCache] = {}
_CACHES_PID = os.getpid()
_CACHES_LOCK = threading.Lock()


def get_cache(settings: CacheSettings) -> TieredCache:
    """This process's cache for ``settings``, opened once and reopened after ``fork``.

    Each Ray worker process therefore opens its node's LMDB environment exactly once. In a
    process where Ray is initialized, the cache's node id is the Ray node id and peer
    replicas go through the cache servers started by
    :func:`tierflow.cache.node_server.start_cache_servers`.
    """
    global _CACHES_PID
    with _CACHES_LOCK:
        if _CACHES_PID != os.getpid():
            # Inherited from the parent: its LMDB handles were closed before the fork and
            # its memory tier is a stale copy. Forget, don't close (nothing to release here).
            _CACHES.clear()
            _CACHES_PID = os.getpid()
        cache = _CACHES.get(settings)
        if cache is not None and isinstance(cache.lmdb, LmdbTier) and cache.lmdb.replaced():
            # The cache directory was deleted under this process (between two runs of a
            # notebook, by hand): writing on would go to an unlinked file no reader finds.
            cache.close()
            cache = None
        if cache is None:
            cache = _CACHES[settings] = _open(settings)
        return cache


def _open(settings: CacheSettings) -> TieredCache:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return TieredCache(settings)
    from tierflow.cache.node_server import RayPeers  # Ray only where Ray already runs

    node_id = _default_node_id()
    return TieredCache(settings, node_id=node_id, peers=RayPeers(settings, node_id))


def close_all() -> None:
    """Close and forget every cache opened by :func:`get_cache` in this process."""
    with _CACHES_LOCK:
        caches = list(_CACHES.values())
        _CACHES.clear()
    for cache in caches:
        cache.close()
