"""The journal: which blocks each stage has committed, kept in the durable store.

It lives in ``<durable store>/_journal/<pipeline>/`` (the remote store when one is
configured, else ``<cache dir>/store``) as a log, the way Delta Lake keeps its table log:
a snapshot ``journal.json`` plus the deltas written since it. A flush (at most every
``interval_s``, and at the end of a run) writes only what changed since the previous one,
as one new object ``delta-<seq>.json``; so it costs O(changes), however many blocks the
pipeline has. Every object is written whole and atomically (temp file + rename on local
disks, one PUT on object stores), so a crash leaves each object either absent or complete.
It stores keys' metadata only — never data, never credentials.

The driver is its only writer. Next to it, ``lease.json`` says which driver is running the
pipeline; another driver refuses to start until that lease expires (its holder renews it
with every flush, so a SIGKILLed holder loses it after ``lease_s``, or at once for a
re-run on the same host, where the holder's pid can be seen to be gone).

The format (version 2: the snapshot's and the deltas' fields, the lease, and how a reader
recovers the state) is specified in ``storage/FORMAT.md`` section 6; in short, a delta's
ops each set one value (``["done", stage, block, row | null]``, ``["rejected", ...]``,
``["part", block, row | null]``), so applying one twice is harmless, and a load reads the
snapshot, then the consecutive deltas after its ``seq`` up to the first unreadable one
(the end of the log). A version 1 journal (the whole state in ``journal.json``) loads as
seq 0.

``done`` holds the blocks whose output is still needed or kept (consumed intermediates are
forgotten when the engine deletes them); ``parts`` the sink parts already committed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict

from fsspec import AbstractFileSystem

from tierflow.errors import PipelineBusy, TierflowError
from tierflow.io.fs import filesystem, fs_errors, store_op, write_atomic
from tierflow.io.sink import PartMeta

JOURNAL = "journal.json"
LEASE = "lease.json"
VERSION = 2
COMPACT_DELTAS = 1000  # at most this many deltas between two snapshots (each one is a read on load)
_DELTA = re.compile(r"delta-(\d+)\.json")

# A pending change, by what it changes: ("done" | "rejected", stage, block) or ("part", block).
_Key = tuple[Any, ...]


def journal_dir(durable_url: str, pipeline: str) -> str:
    return f"{durable_url.rstrip('/')}/_journal/{pipeline}"


def delta_name(seq: int) -> str:
    return f"delta-{seq:012d}.json"


def _dead_here(lease: dict[str, Any]) -> bool:
    """True when the lease's holder ran on this host and its process is gone: a killed
    driver's lease need not be waited out before a re-run on the same machine."""
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _deltas(fs: AbstractFileSystem, root: str) -> dict[int, str]:
    """The delta objects in ``root``, by seq (temp files of unfinished writes excluded)."""
    fs.invalidate_cache(root)  # object stores' listings are cached per filesystem instance
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        base = str(name).rstrip("/").rpartition("/")[2]
        m = _DELTA.fullmatch(base)
        if m:
            out[int(m.group(1))] = f"{root}/{base}"
    return out


@dataclass(frozen=True, slots=True)
class BlockEntry:
    """A block a stage committed, as the journal records it (metadata only, never data).

    Stored in the snapshot and the deltas as the row ``[rows, nbytes, checksum,
    [locations]]`` (:meth:`row`, :meth:`from_row`); the row is the on-disk format.

    Attributes:
        rows: Rows in the block.
        nbytes: Size of its uncompressed frame in bytes.
        checksum: ``"xxh3-128:<hex>"`` of its content.
        locations: Location names of its copies (``lmdb:<node>``, ``remote``), in write
            order, then those added by re-replication.
    """

    rows: int
    nbytes: int
    checksum: str
    locations: tuple[str, ...]

    def row(self) -> list[Any]:
        """The entry as the snapshot and the deltas hold it."""
        return [self.rows, self.nbytes, self.checksum, list(self.locations)]

    @classmethod
    def from_row(cls, row: list[Any]) -> BlockEntry:
        """Read a stored row back."""
        rows, nbytes, checksum, locations = row
        return cls(rows, nbytes, checksum, tuple(locations))


class StageRecord(TypedDict):
    """One stage's part of the journal (a plain dict: it is the snapshot's JSON shape)."""

    fingerprint: str
    done: dict[int, BlockEntry]  # blocks whose output is still needed or kept
    rejected: dict[int, int]  # rows of each block set aside by on_error: skip_rows


def _part_row(p: PartMeta) -> list[Any]:
    """A sink part as the snapshot and the deltas hold it (read back as ``PartMeta(*row)``)."""
    return [p.name, p.rows, p.bytes, p.checksum]


def _parse_delta(raw: bytes, seq: int, run_id: str) -> list[list[Any]] | None:
    """The ops of a delta, checked whole before any is applied; None when it is not a
    complete delta of this snapshot's run."""
    try:
        doc = json.loads(raw)
        if doc["version"] != VERSION or doc["seq"] != seq or doc["run_id"] != run_id:
            return None
        ops = doc["ops"]
        for op in ops:
            if op[0] == "part":
                _, block, meta = op
                ok = isinstance(block, int) and (meta is None or len(meta) == 4)
            else:
                kind, stage, block, value = op
                ok = (isinstance(stage, str) and isinstance(block, int)
                      and (value is None or (kind == "done" and len(value) == 4)
                           or (kind == "rejected" and isinstance(value, int))))
            if not ok:
                return None
        return [["_", doc["state"], float(doc["updated_at"])], *ops]
    except (ValueError, KeyError, TypeError, IndexError):
        return None


@dataclass
class Journal:
    """Committed blocks of one pipeline, per stage, plus committed sink parts.

    Args:
        url: the journal directory (``journal_dir(...)``).
        storage_options: for the durable store (``${VAR}`` resolved when opened).
        interval_s: least time between two flushes of a running journal.
        lease_s: how long a lease lives without renewal.
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    interval_s: float = 2.0
    lease_s: float = 30.0
    pipeline: str = ""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "new"
    blocks: int = 0
    sink_fingerprint: str = ""
    stages: dict[str, StageRecord] = field(default_factory=dict)
    parts: dict[int, PartMeta] = field(default_factory=dict)
    updated_at: float = 0.0
    # Who holds the lease: this process's object, never read back from storage.
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    unreachable: str = field(init=False, default="")  # the last periodic flush's error
    seq: int = field(init=False, default=0)  # the last delta written or read (or folded into the snapshot)
    _last_flush: float = field(init=False, default=0.0)
    _write_s: float = field(init=False, default=0.0)  # the last delta write's duration
    # Changed since the last successful flush, each with whether the store has it. Only
    # the keys: a flush writes their values as they are then, so a flush that failed is
    # simply retried with more keys; a block committed and forgotten in between is dropped.
    _pending: dict[_Key, bool] = field(init=False, default_factory=dict)
    # This object's first write is a snapshot: whatever deltas are in the store (left past
    # the end of the log it read, or from another journal this one replaces, e.g. a --fresh
    # run) are then covered by it and deleted, never appended to.
    _snapshot_due: bool = field(init=False, default=True)
    _snapshot_bytes: int = field(init=False, default=0)
    _delta_bytes: int = field(init=False, default=0)  # written since the snapshot
    _delta_count: int = field(init=False, default=0)

    @property
    def _fs(self) -> tuple[AbstractFileSystem, str]:
        return filesystem(self.url, self.storage_options)

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None, **kw: Any) -> Journal:
        """The stored journal (its snapshot plus the deltas after it), or an empty one when
        there is none."""
        with fs_errors("journal", url, storage_options):
            for _attempt in range(3):
                j = cls(url, dict(storage_options or {}), **kw)
                fs, root = j._fs
                try:
                    raw = fs.cat_file(f"{root}/{JOURNAL}")
                except FileNotFoundError:
                    return j  # no snapshot: nothing was ever written (deltas come after one)
                doc = json.loads(raw)
                if doc.get("version") not in (1, VERSION):
                    raise TierflowError(
                        f"journal {url}/{JOURNAL} has version {doc.get('version')}, expected {VERSION}")
                j._read_snapshot(doc, len(raw))
                if doc["version"] == 1 or j._replay(fs, root):
                    return j  # version 1 kept the whole state in journal.json: no deltas
                # A delta missing inside the log: a compaction deleted it after we read the
                # older snapshot. Its new snapshot covers it: read again.
            return j

    def _read_snapshot(self, doc: dict[str, Any], size: int) -> None:
        self.pipeline, self.state, self.blocks = doc["pipeline"], doc["state"], doc["blocks"]
        self.run_id, self.updated_at = doc["run_id"], doc["updated_at"]
        self.stages = {
            name: {
                "fingerprint": s["fingerprint"],
                "done": {int(b): BlockEntry.from_row(v) for b, v in s["done"].items()},
                "rejected": {int(b): n for b, n in s.get("rejected", {}).items()},
            }
            for name, s in doc["stages"].items()
        }
        self.parts = {int(b): PartMeta(*v) for b, v in doc["parts"].items()}
        self.sink_fingerprint = doc["sink_fingerprint"]
        self.seq = int(doc.get("seq", 0))
        self._snapshot_bytes = size

    def _replay(self, fs: AbstractFileSystem, root: str) -> bool:
        """Apply the deltas after the snapshot, in seq order, up to the end of the log.

        Returns False when one was missing with later ones present (a gap): the replay
        stops there, at a consistent earlier state. The one writer writes deltas in seq
        order, each only after the previous one's write returned, so a crash leaves no
        gap; a reader sees one only when a compaction deleted deltas after it read the
        older snapshot.
        """
        listed = _deltas(fs, root)
        after = sorted(s for s in listed if s > self.seq)  # lower ones: left by a crash after a compaction
        run: list[int] = []
        for s in after:
            if s != self.seq + 1 + len(run):
                break
            run.append(s)
        if not run:
            return not after
        blobs = fs.cat([listed[s] for s in run], on_error="return")
        by_name = {str(k).rpartition("/")[2]: v for k, v in blobs.items()}
        for s in run:
            raw = by_name.get(delta_name(s))
            if raw is None or isinstance(raw, FileNotFoundError):
                return False  # deleted since listed: a compaction ran (a gap)
            if isinstance(raw, BaseException):
                raise raw  # the store failed: never mistake that for the end of the log
            ops = _parse_delta(raw, s, self.run_id)
            if ops is None:
                # A torn or foreign delta ends the log. Safe: its write never returned, so
                # nothing (no deleted block, no _SUCCESS) relied on it; its writer's next
                # object is a snapshot covering every delta present (see _snapshot_due).
                return True
            self._apply(ops)
            self.seq = s
            self._delta_bytes += len(raw)
            self._delta_count += 1
        return len(run) == len(after)

    def _apply(self, ops: list[list[Any]]) -> None:
        for op in ops:
            kind = op[0]
            if kind == "_":
                self.state, self.updated_at = op[1], op[2]
            elif kind == "part":
                if op[2] is None:
                    self.parts.pop(op[1], None)
                else:
                    self.parts[op[1]] = PartMeta(*op[2])
            else:
                # A delta's stages are its snapshot's (only begin() changes them, and it
                # writes a snapshot): an unknown one cannot occur, and is skipped.
                stage = self.stages.get(op[1])
                if stage is None:
                    continue
                table: dict[int, Any] = stage["done"] if kind == "done" else stage["rejected"]
                if op[3] is None:
                    table.pop(op[2], None)
                else:
                    table[op[2]] = BlockEntry.from_row(op[3]) if kind == "done" else op[3]

    def document(self) -> dict[str, Any]:
        """The whole state, as the snapshot ``journal.json`` holds it (its ``seq`` too)."""
        return {
            "version": VERSION, "seq": self.seq, "pipeline": self.pipeline, "run_id": self.run_id,
            "state": self.state, "updated_at": self.updated_at, "blocks": self.blocks,
            "sink_fingerprint": self.sink_fingerprint,
            "stages": {
                n: {"fingerprint": s["fingerprint"], "done": {b: e.row() for b, e in s["done"].items()},
                    "rejected": s["rejected"]}
                for n, s in self.stages.items()
            },
            "parts": {str(b): _part_row(p) for b, p in self.parts.items()},
        }

    def committed(self, stage: str, fingerprint: str) -> dict[int, BlockEntry]:
        """Blocks of ``stage`` committed under ``fingerprint`` (empty if it changed)."""
        s = self.stages.get(stage)
        if s is None or s["fingerprint"] != fingerprint:
            return {}
        return s["done"]

    def rejected(self, stage: str, fingerprint: str) -> dict[int, int]:
        """Rows of each block of ``stage`` set aside as dead letters (``skip_rows``)."""
        s = self.stages.get(stage)
        if s is None or s["fingerprint"] != fingerprint:
            return {}
        return s["rejected"]

    # -- writing (driver only) -------------------------------------------------------------

    def begin(self, pipeline: str, blocks: int, fingerprints: dict[str, str], sink_fingerprint: str) -> None:
        """Start a run: forget stages (and sink parts) whose fingerprint changed; mark it running."""
        if sink_fingerprint != self.sink_fingerprint:
            self.parts = {}
        self.pipeline, self.blocks, self.state = pipeline, blocks, "running"
        self.sink_fingerprint = sink_fingerprint
        self.run_id = uuid.uuid4().hex
        old = self.stages
        self.stages = {
            name: (old[name] if name in old and old[name]["fingerprint"] == fp
                   else StageRecord(fingerprint=fp, done={}, rejected={}))
            for name, fp in fingerprints.items()
        }
        self._snapshot_due = True  # whole stages and parts may be gone: no delta says that
        self.flush(force=True)

    def record_block(self, stage: str, block: int, rows: int, nbytes: int, checksum: str,
                     locations: tuple[str, ...]) -> None:
        done = self.stages[stage]["done"]
        self._pending.setdefault(("done", stage, block), block in done)
        done[block] = BlockEntry(rows, nbytes, checksum, tuple(locations))

    def record_rejected(self, stage: str, block: int, rows: int) -> None:
        # kept when the block itself is forgotten: the count belongs in the final _SUCCESS
        self._pending.setdefault(("rejected", stage, block), block in self.stages[stage]["rejected"])
        self.stages[stage]["rejected"][block] = rows

    def add_locations(self, stage: str, block: int, locations: tuple[str, ...]) -> None:
        done = self.stages[stage]["done"]
        entry = done.get(block)
        if entry is not None:
            done[block] = replace(entry, locations=(*entry.locations, *locations))
            self._pending.setdefault(("done", stage, block), True)

    def forget_block(self, stage: str, block: int) -> None:
        done, key = self.stages[stage]["done"], ("done", stage, block)
        if not self._pending.setdefault(key, block in done):
            del self._pending[key]  # committed since the last flush: the store never had it
        done.pop(block, None)

    def record_part(self, block: int, part: PartMeta) -> None:
        self._pending.setdefault(("part", block), block in self.parts)
        self.parts[block] = part

    def finish(self, state: str) -> None:
        self.state = state
        self._snapshot_due = True  # a finished journal is one object, read in one GET
        self.flush(force=True)

    @store_op("journal")
    def flush(self, force: bool = False) -> bool:
        """Write the changes since the last flush if there are any and ``interval_s``
        passed (or ``force``).

        A periodic flush that cannot reach the durable store returns False and keeps its
        changes for the next one (the run goes on); a forced one raises.
        """
        now = time.monotonic()
        # A delta costs what changed, not the journal's size; still keep writes under
        # ~10 % of the driver's time on a slow store, and never closer than interval_s.
        gap = max(self.interval_s, 10 * self._write_s)
        if not force and (not self._pending or now - self._last_flush < gap):
            return False
        if force:
            self._write(now)
            return True
        try:
            self._write(now)
        except Exception as exc:  # noqa: BLE001 - any store error: keep the changes, retry later
            self._last_flush, self.unreachable = now, f"{type(exc).__name__}: {exc}"
            return False
        return True

    def _write(self, now: float) -> None:
        if self._snapshot_due:
            self._compact()
        else:
            started = time.perf_counter()
            self._write_delta()
            self._write_s = time.perf_counter() - started
        self._last_flush, self.unreachable = now, ""
        if self.state == "running":
            self.renew_lease()
        if self._delta_count >= COMPACT_DELTAS or self._delta_bytes > self._snapshot_bytes:
            # Amortised O(changes): a snapshot is written once deltas as big as it were.
            try:
                self._compact()
            except Exception:  # noqa: BLE001, S110 - the changes are durable in the deltas: try after the next flush
                pass

    def _write_delta(self) -> None:
        """The pending changes, as the next delta. On failure they stay pending and the
        same seq is written again: a delta that did land is replaced by a superset."""
        seq = self.seq + 1
        self.updated_at = time.time()
        ops: list[list[Any]] = []
        for key in self._pending:
            if key[0] == "part":
                p = self.parts.get(key[1])
                ops.append(["part", key[1], None if p is None else _part_row(p)])
            elif key[1] in self.stages:
                stage = self.stages[key[1]]
                if key[0] == "done":
                    entry = stage["done"].get(key[2])
                    ops.append(["done", key[1], key[2], None if entry is None else entry.row()])
                else:
                    ops.append(["rejected", key[1], key[2], stage["rejected"].get(key[2])])
        doc = {"version": VERSION, "seq": seq, "run_id": self.run_id, "state": self.state,
               "updated_at": self.updated_at, "ops": ops}
        data = json.dumps(doc, separators=(",", ":")).encode()
        fs, root = self._fs
        write_atomic(fs, f"{root}/{delta_name(seq)}", data, crash="journal_write")
        self.seq, self._pending = seq, {}
        self._delta_bytes += len(data)
        self._delta_count += 1

    def _compact(self) -> None:
        """Write the whole state as a new snapshot covering every delta in the store, then
        delete those deltas. Never the other way round: a crash in between leaves deltas
        with seq <= the snapshot's, which a load ignores and the next compaction deletes."""
        fs, root = self._fs
        fs.makedirs(root, exist_ok=True)
        listed = _deltas(fs, root)
        self.updated_at = time.time()
        doc = self.document()
        # Every delta present is ours (its changes are in memory: a superset) or past the
        # end of the log we read: either way this snapshot replaces it.
        doc["seq"] = seq = max([self.seq, *listed])
        data = json.dumps(doc, separators=(",", ":")).encode()
        write_atomic(fs, f"{root}/{JOURNAL}", data, crash="journal_write")
        self.seq, self._pending, self._snapshot_due = seq, {}, False
        self._snapshot_bytes, self._delta_bytes, self._delta_count = len(data), 0, 0
        if listed:
            try:
                fs.rm(list(listed.values()))
            except Exception:  # noqa: BLE001, S110 - harmless leftovers (seq <= the snapshot's): next compaction
                pass

    # -- the lease -------------------------------------------------------------------------

    @store_op("journal")
    def lease(self) -> dict[str, Any] | None:
        fs, root = self._fs
        try:
            return json.loads(fs.cat_file(f"{root}/{LEASE}"))  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return None

    @store_op("journal")
    def acquire_lease(self) -> None:
        """Take the pipeline's lease. Raises PipelineBusy while another driver holds it."""
        held = self.lease()
        if held and held["owner"] != self.owner and held["expires_at"] > time.time() and not _dead_here(held):
            raise PipelineBusy(
                f"pipeline {self.pipeline or '?'} is being run by {held['host']} pid {held['pid']} "
                f"(its lease expires in {held['expires_at'] - time.time():.0f} s unless renewed)"
            )
        self.renew_lease()
        # Two drivers may both have seen no lease; the later write wins, the other backs off.
        time.sleep(0.05)
        now_held = self.lease()
        if now_held is None or now_held["owner"] != self.owner:
            raise PipelineBusy(f"pipeline {self.pipeline or '?'} was claimed by another driver just now")

    @store_op("journal")
    def renew_lease(self) -> None:
        fs, root = self._fs
        fs.makedirs(root, exist_ok=True)
        doc = {"owner": self.owner, "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
               "expires_at": time.time() + self.lease_s}
        write_atomic(fs, f"{root}/{LEASE}", json.dumps(doc).encode())

    @store_op("journal")
    def release_lease(self) -> None:
        held = self.lease()
        if held and held["owner"] == self.owner:
            fs, root = self._fs
            fs.rm_file(f"{root}/{LEASE}")
