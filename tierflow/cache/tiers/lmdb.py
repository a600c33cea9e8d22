"""Tier 1: the node's LMDB environment, shared by every process on the node.

Layout (``storage/FORMAT.md`` has the byte-level details): one environment directory
``<root>/lmdb`` with four named databases:

* ``blocks``: key (UTF-8) -> frame;
* ``meta``:   key -> ``<QQB``: frame size, last access (ns since the epoch), flags
  (bit 0 = *pending*: the block's durable copy is not written yet, so it is pinned);
* ``lru``:    ``>Q`` last access + key -> ``b""``, an index to find the oldest block;
* ``info``:   ``b"format"`` -> ``b"tierflow-lmdb/1"``, ``b"used"`` -> ``<Q`` total frame bytes.

Promises:

* Every read verifies the frame checksum; a bad frame raises
  :class:`~tierflow.errors.CorruptObject` (the tiered cache reads another copy and
  rewrites this one).
* Capacity: the sum of frame sizes stays below ``min(capacity_bytes, map_size // 2)``.
  Half the map is kept free because LMDB is copy-on-write: a transaction needs free pages
  and pages freed by a commit can only be reused once no reader still sees them. Room is
  made by evicting least recently used blocks; a *pending* block is never evicted. When
  room cannot be made, ``put`` raises :class:`~tierflow.errors.TierUnavailable` whose reason
  starts with ``"full:"`` and the environment is left untouched (the transaction aborts).
* LRU order is approximate across processes: reads record access times in memory and the
  process writes them in its next write transaction (or after 1024 reads, or on close),
  because a write transaction per read would cost an ``fdatasync`` per read.
* One ``lmdb.Environment`` per directory per process (LMDB's locks break otherwise),
  opened lazily, ``reader_check()`` on open. Before ``os.fork`` every environment is
  closed (waiting for running operations); parent and child reopen lazily. An inherited
  environment is never used across ``fork``.
* Durability: by default ``sync=True, metasync=False`` (``MDB_NOMETASYNC``): a system
  crash can lose the last commit but never corrupts the database. ``sync=False``
  (``MDB_NOSYNC``) leaves flushing to the OS and to :meth:`LmdbTier.sync`: for a node's
  cache whose blocks have another copy elsewhere, where an ``fdatasync`` per block buys
  nothing against losing the node (its disk goes with it; a killed process loses nothing
  the page cache holds). After an OS crash such an environment may be damaged: every read
  verifies its checksum, and a damaged environment is a tier that is down.
* ``meminit=True``: LMDB zeroes the unused part of every page it writes. With
  ``MDB_NOMEMINIT`` it would write whatever the heap held before (other blocks, resolved
  credentials) into ``data.mdb``; a test caught stale block bytes there.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import lmdb

from tierflow.cache import codec
from tierflow.cache.base import Counters, TierStats, tier_errors
from tierflow.cache.keys import validate_key
from tierflow.errors import CorruptObject, TierUnavailable

__all__ = ["LmdbTier"]

FORMAT_TAG = b"tierflow-lmdb/1"
_META = struct.Struct("<QQB")
_USED = struct.Struct("<Q")
_TS = struct.Struct(">Q")
PENDING = 1

_TOUCH_FLUSH_AT = 1024


class _Full(Exception):
    """Internal: no room could be made inside the current transaction."""


class _MapFull(Exception):
    """Internal: LMDB returned ``MDB_MAP_FULL`` (the transaction was aborted)."""


@contextlib.contextmanager
def _map_full_guard() -> Iterator[None]:
    # Raised inside the tier_errors() edge, so it must be told apart from other lmdb errors
    # before that edge turns it into a plain TierUnavailable.
    try:
        yield
    except lmdb.MapFullError as exc:
        raise _MapFull(str(exc)) from exc


class _EnvHandle:
    """The single open environment of one directory in this process, fork-aware."""

    def __init__(self, path: str, open_kwargs: dict[str, Any]) -> None:
        self.path = path
        self.open_kwargs = open_kwargs
        self.refs = 0
        self._env: lmdb.Environment | None = None
        self._dbs: dict[bytes, Any] = {}
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._closing = False
        self._identity: tuple[int, int] | None = None

    def replaced(self) -> bool:
        """Whether the directory's data file is no longer the one this process opened
        (deleted, or deleted and created again): its writes would go to an unlinked file
        no other process sees."""
        with self._cond:
            if self._env is None or self._pid != os.getpid():
                return False
            return _identity(self.path) != self._identity

    def acquire(self) -> tuple[lmdb.Environment, dict[bytes, Any]]:
        """Open if needed and hold the environment for one operation; pair with release()."""
        with self._cond:
            while self._closing:
                self._cond.wait()
            if self._pid != os.getpid():
                # Inherited through fork without the hook (os.fork from C code): drop the
                # reference without closing (closing would clear the parent's reader slots).
                _INHERITED.append(self._env)
                self._env, self._dbs, self._pid = None, {}, os.getpid()
            if self._env is None:
                self._open()
            self._active += 1
            assert self._env is not None
            return self._env, self._dbs

    def release(self) -> None:
        """End an operation started with acquire()."""
        with self._cond:
            self._active -= 1
            if self._closing:
                self._cond.notify_all()

    @contextlib.contextmanager
    def use(self) -> Iterator[tuple[lmdb.Environment, dict[bytes, Any]]]:
        """Hold the environment open for the duration of one operation."""
        opened = self.acquire()
        try:
            yield opened
        finally:
            self.release()

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        env = lmdb.open(self.path, **self.open_kwargs)
        try:
            env.reader_check()
            dbs = {name: env.open_db(name) for name in (b"blocks", b"meta", b"lru", b"info")}
            with env.begin(write=True, db=dbs[b"info"]) as txn:
                tag = txn.get(b"format")
                if tag is None:
                    txn.put(b"format", FORMAT_TAG)
                    txn.put(b"used", _USED.pack(0))
                elif tag != FORMAT_TAG:
                    raise lmdb.Error(f"{self.path} holds format {tag!r}, expected {FORMAT_TAG!r}")
        except BaseException:
            env.close()
            raise
        self._env, self._dbs, self._identity = env, dbs, _identity(self.path)

    def close(self) -> None:
        """Close after running operations finish (no-op if not open in this process)."""
        with self._cond:
            self._closing = True
            try:
                while self._active:
                    self._cond.wait()
                if self._env is not None and self._pid == os.getpid():
                    self._env.close()
                self._env, self._dbs = None, {}
            finally:
                self._closing = False
                self._cond.notify_all()


class _Session:
    """One operation on an environment: hold it open, translate errors at the edge.

    A class rather than a generator context manager: it is on every read's hot path.
    """

    __slots__ = ("_errors", "_handle")

    def __init__(self, handle: _EnvHandle | None, name: str) -> None:
        if handle is None:
            raise TierUnavailable(name, "closed")
        self._handle = handle
        self._errors = tier_errors(name)

    def __enter__(self) -> tuple[lmdb.Environment, dict[bytes, Any]]:
        try:
            return self._handle.acquire()
        except BaseException as exc:
            self._errors.__exit__(type(exc), exc, None)
            raise

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._handle.release()
        self._errors.__exit__(exc_type, exc, tb)


_HANDLES: dict[str, _EnvHandle] = {}
_HANDLES_LOCK = threading.Lock()
_INHERITED: list[Any] = []  # environments inherited through fork: kept alive, never closed


def _close_all_before_fork() -> None:
    for handle in list(_HANDLES.values()):
        handle.close()


os.register_at_fork(before=_close_all_before_fork)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _acquire_handle(path: str, open_kwargs: dict[str, Any]) -> _EnvHandle:
    real = os.path.realpath(path)
    with _HANDLES_LOCK:
        handle = _HANDLES.get(real)
        if handle is None or handle.replaced():  # a replaced one stays with its holders
            handle = _HANDLES[real] = _EnvHandle(real, open_kwargs)
        handle.refs += 1
        return handle


def _release_handle(handle: _EnvHandle) -> None:
    with _HANDLES_LOCK:
        handle.refs -= 1
        if handle.refs > 0:
            return
        if _HANDLES.get(handle.path) is handle:
            del _HANDLES[handle.path]
    handle.close()


class LmdbTier:
    """A node-local LMDB store of frames with an LRU capacity limit. Thread- and process-safe.

    Usage::

        tier = LmdbTier("/data/tf/lmdb", capacity_bytes=64 << 30, map_size=1 << 40)
        tier.put(key, frame, pending=True)   # pinned until its durable copy exists
        tier.mark_durable(key)
        tier.get(key)                        # verified frame, or None

    Args:
        path: Environment directory (created if missing).
        capacity_bytes: Upper bound on stored frame bytes (see the module docstring).
        map_size: LMDB ``map_size``; the file is sparse, so make it large.
        verify: Verify checksums on read (only the benchmark turns this off).
        max_readers: Size of LMDB's reader table, shared by every process on the node.
        clock: Wall clock in ns, for LRU order (injectable for tests).
    """

    kind: ClassVar[str] = "lmdb"

    def __init__(
        self,
        path: str,
        *,
        capacity_bytes: int,
        map_size: int = 1 << 40,
        verify: bool = True,
        max_readers: int = 1024,
        sync: bool = True,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.path = os.path.abspath(path)
        self.name = f"lmdb:{self.path}"
        self.map_size = map_size
        self.capacity_bytes = min(capacity_bytes, map_size // 2)
        self.verify = verify
        self._clock = clock
        self._counters = Counters()
        self._touch_lock = threading.Lock()
        self._touched: dict[bytes, int] = {}
        self._handle: _EnvHandle | None = _acquire_handle(
            self.path,
            dict(
                map_size=map_size, subdir=True, max_dbs=8, max_readers=max_readers,
                sync=sync, metasync=False, readahead=True, meminit=True, lock=True,
            ),
        )
        self._finalizer = weakref.finalize(self, _release_handle, self._handle)

    # -- plumbing ---------------------------------------------------------------------

    def _env(self) -> _Session:
        return _Session(self._handle, self.name)

    def _apply_touches(self, txn: lmdb.Transaction, dbs: dict[bytes, Any]) -> None:
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        for kb, ts in touched.items():
            raw = txn.get(kb, db=dbs[b"meta"])
            if raw is None:
                continue
            size, old_ts, flags = _META.unpack(raw)
            if ts <= old_ts:
                continue
            txn.delete(_TS.pack(old_ts) + kb, db=dbs[b"lru"])
            txn.put(_TS.pack(ts) + kb, b"", db=dbs[b"lru"])
            txn.put(kb, _META.pack(size, ts, flags), db=dbs[b"meta"])

    @staticmethod
    def _used(txn: lmdb.Transaction, dbs: dict[bytes, Any]) -> int:
        raw = txn.get(b"used", db=dbs[b"info"])
        return 0 if raw is None else int(_USED.unpack(raw)[0])

    def _remove(self, txn: lmdb.Transaction, dbs: dict[bytes, Any], kb: bytes) -> int | None:
        raw = txn.get(kb, db=dbs[b"meta"])
        if raw is None:
            return None
        size, ts, _ = _META.unpack(raw)
        txn.delete(kb, db=dbs[b"blocks"])
        txn.delete(kb, db=dbs[b"meta"])
        txn.delete(_TS.pack(ts) + kb, db=dbs[b"lru"])
        return int(size)

    def _evict(self, txn: lmdb.Transaction, dbs: dict[bytes, Any], need: int, keep: bytes) -> tuple[int, int]:
        """Evict unpinned blocks, oldest first, until ``need`` bytes are freed.

        Returns (bytes freed, blocks evicted). Never evicts ``keep`` or a pending block.
        """
        freed = evicted = 0
        cursor = txn.cursor(db=dbs[b"lru"])
        more = cursor.first()
        while more and freed < need:
            kb = bytes(cursor.key()[_TS.size:])
            raw = txn.get(kb, db=dbs[b"meta"])
            if kb == keep or raw is None or _META.unpack(raw)[2] & PENDING:
                more = cursor.next()
                continue
            size = _META.unpack(raw)[0]
            txn.delete(kb, db=dbs[b"blocks"])
            txn.delete(kb, db=dbs[b"meta"])
            more = cursor.delete()  # moves to the next entry
            freed += size
            evicted += 1
        return freed, evicted

    def _write(self, key: str, value: bytes | memoryview, pending: bool) -> int:
        kb = key.encode()
        size = memoryview(value).nbytes
        with self._env() as (env, dbs), _map_full_guard(), env.begin(write=True) as txn:
            self._apply_touches(txn, dbs)
            used = self._used(txn, dbs)
            old = txn.get(kb, db=dbs[b"meta"])
            old_size = 0
            if old is not None:
                old_size, old_ts, _ = _META.unpack(old)
                txn.delete(_TS.pack(old_ts) + kb, db=dbs[b"lru"])
            over = used - old_size + size - self.capacity_bytes
            evicted = freed = 0
            if over > 0:
                freed, evicted = self._evict(txn, dbs, over, keep=kb)
                used -= freed
                if freed < over:
                    raise _Full(
                        f"full: {size} bytes do not fit in {self.capacity_bytes} "
                        f"({used - old_size} held, the rest pinned until durable)"
                    )
            ts = self._clock()
            txn.put(kb, value, db=dbs[b"blocks"])
            txn.put(kb, _META.pack(size, ts, PENDING if pending else 0), db=dbs[b"meta"])
            txn.put(_TS.pack(ts) + kb, b"", db=dbs[b"lru"])
            txn.put(b"used", _USED.pack(used - old_size + size), db=dbs[b"info"])
        self._counters.add(puts=1, bytes_written=size, evictions=evicted, bytes_evicted=freed)
        return freed

    def _free_map_space(self, need: int) -> int:
        """Evict unpinned blocks in their own transaction after ``MDB_MAP_FULL``."""
        with self._env() as (env, dbs), _map_full_guard(), env.begin(write=True) as txn:
            freed, evicted = self._evict(txn, dbs, need, keep=b"")
            txn.put(b"used", _USED.pack(self._used(txn, dbs) - freed), db=dbs[b"info"])
        self._counters.add(evictions=evicted, bytes_evicted=freed)
        return freed

    # -- Tier -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """Return the verified frame under ``key``, or ``None``.

        Raises:
            CorruptObject: The stored frame fails verification.
            TierUnavailable: The environment cannot be opened or read.
        """
        kb = validate_key(key).encode()
        # One copy out of the map (py-lmdb builds the bytes directly), then the checksum of
        # that copy while it is still in the CPU cache: hashing the map first and copying
        # after measured ~10 % slower; returning a view into the map would pin a read
        # transaction (and old pages) for as long as the caller holds the data.
        with self._env() as (env, dbs), env.begin(db=dbs[b"blocks"]) as txn:
            data = txn.get(kb)
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
        with self._touch_lock:
            self._touched[kb] = self._clock()
            flush = len(self._touched) >= _TOUCH_FLUSH_AT
        if flush:
            self.flush_access_times()
        return data

    def put(self, key: str, value: bytes, *, pending: bool = False) -> None:
        """Store a frame, evicting old unpinned blocks to make room.

        Args:
            key: Block key.
            value: The frame.
            pending: Pin the block: its durable copy is not written yet. Cleared by
                :meth:`mark_durable` or by another ``put`` without it.

        Raises:
            TierUnavailable: No room can be made (reason starts with ``"full:"``) or the
                environment cannot be written. The environment is unchanged.
        """
        self._put(key, value, pending)

    def _put(self, key: str, value: bytes, pending: bool) -> int:
        validate_key(key)
        size = memoryview(value).nbytes
        if size > self.capacity_bytes:
            raise TierUnavailable(
                self.name, f"full: {size} bytes exceed the capacity of {self.capacity_bytes}"
            )
        try:
            try:
                return self._write(key, value, pending)
            except _MapFull:
                # Byte accounting kept us under half the map, yet LMDB found no free pages
                # (fragmentation, or old snapshots held by readers): free more and retry once.
                freed = self._free_map_space(size + self.map_size // 8)
                return freed + self._write(key, value, pending)
        except _Full as exc:
            raise TierUnavailable(self.name, str(exc)) from None
        except _MapFull as exc:
            raise TierUnavailable(self.name, f"full: LMDB map_size {self.map_size} exhausted") from exc

    def put_counted(self, key: str, value: bytes, *, pending: bool = False) -> int:
        """:meth:`put`, returning the bytes evicted to make room for this value (exact per
        call, where a before/after difference of :meth:`bytes_evicted` would also count
        other threads' writes)."""
        return self._put(key, value, pending)

    def mark_durable(self, key: str) -> bool:
        """Unpin ``key``: its durable copy now exists. Returns whether the key is held."""
        kb = validate_key(key).encode()
        with self._env() as (env, dbs), env.begin(write=True, db=dbs[b"meta"]) as txn:
            self._apply_touches(txn, dbs)
            raw = txn.get(kb)
            if raw is None:
                return False
            size, ts, flags = _META.unpack(raw)
            if flags & PENDING:
                txn.put(kb, _META.pack(size, ts, flags & ~PENDING))
            return True

    def is_pending(self, key: str) -> bool:
        """Whether ``key`` is held and pinned (its durable copy not written)."""
        kb = validate_key(key).encode()
        with self._env() as (env, dbs), env.begin(db=dbs[b"meta"]) as txn:
            raw = txn.get(kb)
        return raw is not None and bool(_META.unpack(raw)[2] & PENDING)

    def pending_keys(self, prefix: str = "") -> builtins.list[str]:
        """Every pinned key starting with ``prefix``."""
        found = []
        with self._env() as (env, dbs), env.begin(db=dbs[b"meta"]) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix.encode()):
                for kb, raw in cursor:
                    if not kb.startswith(prefix.encode()):
                        break
                    if _META.unpack(raw)[2] & PENDING:
                        found.append(kb.decode())
        return found

    def delete(self, key: str) -> bool:
        """Remove ``key`` (pinned or not). Returns whether it was held."""
        kb = validate_key(key).encode()
        with self._env() as (env, dbs), env.begin(write=True) as txn:
            self._apply_touches(txn, dbs)
            size = self._remove(txn, dbs, kb)
            if size is not None:
                txn.put(b"used", _USED.pack(self._used(txn, dbs) - size), db=dbs[b"info"])
        if size is None:
            return False
        self._counters.add(deletes=1)
        return True

    def sync(self) -> None:
        """Flush every commit so far to disk (``fdatasync``), whatever ``sync`` was."""
        with self._env() as (env, _):
            env.sync(True)

    def contains(self, key: str) -> bool:
        """Whether ``key`` is held (no read of the value)."""
        kb = validate_key(key).encode()
        with self._env() as (env, dbs), env.begin(db=dbs[b"meta"]) as txn:
            return txn.get(kb) is not None

    def list(self, prefix: str = "") -> Iterator[str]:
        """Held keys starting with ``prefix``, sorted (a snapshot)."""
        pb = prefix.encode()
        keys: list[str] = []
        with self._env() as (env, dbs), env.begin(db=dbs[b"meta"]) as txn:
            cursor = txn.cursor()
            if cursor.set_range(pb):
                for kb in cursor.iternext(keys=True, values=False):
                    if not kb.startswith(pb):
                        break
                    keys.append(kb.decode())
        return iter(keys)

    def flush_access_times(self) -> None:
        """Write this process's recorded access times (one small write transaction)."""
        with self._touch_lock:
            if not self._touched:
                return
        with self._env() as (env, dbs), env.begin(write=True) as txn:
            self._apply_touches(txn, dbs)

    def bytes_evicted(self) -> int:
        """Bytes this process's writes evicted to make room, so far (cheap: one counter)."""
        return self._counters.value("bytes_evicted")

    def stats(self) -> TierStats:
        """Counters plus entries, bytes held and capacity (read from the environment)."""
        entries: int | None = None
        used: int | None = None
        with contextlib.suppress(TierUnavailable), self._env() as (env, dbs), env.begin() as txn:
            entries = int(txn.stat(dbs[b"meta"])["entries"])
            used = self._used(txn, dbs)
        return self._counters.snapshot(
            self.name, self.kind, entries=entries, bytes_used=used,
            capacity_bytes=self.capacity_bytes,
        )

    def check(self) -> builtins.list[str]:
        """Structural consistency problems (empty when consistent); does not hash values.

        Checks that ``blocks``, ``meta`` and ``lru`` name the same keys with matching
        sizes and times, and that ``used`` is the sum of the sizes.
        """
        problems: list[str] = []
        with self._env() as (env, dbs), env.begin(buffers=True) as txn:
            sizes = {bytes(k): len(v) for k, v in txn.cursor(db=dbs[b"blocks"])}
            metas = {bytes(k): _META.unpack(bytes(v)) for k, v in txn.cursor(db=dbs[b"meta"])}
            lru = {bytes(k) for k in txn.cursor(db=dbs[b"lru"]).iternext(values=False)}
            used = self._used(txn, dbs)
        if set(sizes) != set(metas):
            problems.append(f"blocks/meta key mismatch: {sorted(set(sizes) ^ set(metas))[:5]}")
        for kb, (size, ts, _) in metas.items():
            if kb in sizes and sizes[kb] != size:
                problems.append(f"{kb.decode()}: meta size {size} != stored {sizes[kb]}")
            if _TS.pack(ts) + kb not in lru:
                problems.append(f"{kb.decode()}: missing from the LRU index")
        if len(lru) != len(metas):
            problems.append(f"LRU index has {len(lru)} entries for {len(metas)} blocks")
        total = sum(size for size, _, _ in metas.values())
        if used != total:
            problems.append(f"used counter {used} != sum of sizes {total}")
        return problems

    def replaced(self) -> bool:
        """Whether this tier's directory was deleted (or replaced) since it was opened here:
        the tier must be opened again for its copies to be seen by other processes."""
        return self._handle is not None and self._handle.replaced()

    def close(self) -> None:
        """Flush access times and release this tier's use of the environment. Idempotent."""
        if self._handle is None:
            return
        with contextlib.suppress(TierUnavailable):
            self.flush_access_times()
        self._handle = None
        self._finalizer()
