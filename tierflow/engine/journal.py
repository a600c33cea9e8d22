"""The journal: which blocks each stage has committed, kept in the durable store.

It lives at ``<durable store>/_journal/<pipeline>/journal.json`` (the remote store when one
is configured, else ``<cache dir>/store``) and is rewritten whole, atomically, at most every
``interval_s`` and at the end of a run: temp file + rename on local disks, one PUT on
object stores. A crash therefore leaves either the previous or the new journal, never half
of one. It stores keys' metadata only — never data, never credentials.

The driver is its only writer. Next to it, ``lease.json`` says which driver is running the
pipeline; another driver refuses to start until that lease expires (its holder renews it
with every flush, so a SIGKILLed holder loses it after ``lease_s``, or at once for a
re-run on the same host, where the holder's pid can be seen to be gone).

Format (version 1)::

    {"version": 1, "pipeline": "demo", "run_id": "...", "state": "running|succeeded|failed",
     "updated_at": 1764000000.0, "blocks": 120, "sink_fingerprint": "<sha256>",
     "stages": {"clean": {"fingerprint": "<sha256>", "done": {"42": [rows, nbytes, checksum, [locations]]},
                          "rejected": {"7": rows set aside by on_error: skip_rows}}},
     "parts": {"42": [name, rows, bytes, checksum]}}

``done`` holds the blocks whose output is still needed or kept (consumed intermediates are
forgotten when the engine deletes them); ``parts`` the sink parts already committed.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from tierflow.errors import TierflowError
from tierflow.io.fs import filesystem, write_atomic
from tierflow.io.sink import PartMeta

JOURNAL = "journal.json"
LEASE = "lease.json"
VERSION = 1


class PipelineBusy(TierflowError):
    """Another live driver holds the pipeline's lease."""


def journal_dir(durable_url: str, pipeline: str) -> str:
    return f"{durable_url.rstrip('/')}/_journal/{pipeline}"


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
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    parts: dict[int, PartMeta] = field(default_factory=dict)
    updated_at: float = 0.0
    # Who holds the lease: this process's object, never read back from storage.
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    unreachable: str = field(init=False, default="")  # the last periodic flush's error
    _last_flush: float = field(init=False, default=0.0)
    _write_s: float = field(init=False, default=0.0)
    _dirty: bool = field(init=False, default=False)

    @property
    def _fs(self) -> tuple[AbstractFileSystem, str]:
        return filesystem(self.url, self.storage_options)

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None, **kw: Any) -> Journal:
        """The stored journal, or an empty one when there is none."""
        j = cls(url, dict(storage_options or {}), **kw)
        fs, root = j._fs
        try:
            doc = json.loads(fs.cat_file(f"{root}/{JOURNAL}"))
        except FileNotFoundError:
            return j
        if doc.get("version") != VERSION:
            raise TierflowError(f"journal {url}/{JOURNAL} has version {doc.get('version')}, expected {VERSION}")
        j.pipeline, j.state, j.blocks = doc["pipeline"], doc["state"], doc["blocks"]
        j.run_id, j.updated_at = doc["run_id"], doc["updated_at"]
        j.stages = {
            name: {
                "fingerprint": s["fingerprint"],
                "done": {int(b): v for b, v in s["done"].items()},
                "rejected": {int(b): n for b, n in s.get("rejected", {}).items()},
            }
            for name, s in doc["stages"].items()
        }
        j.parts = {int(b): PartMeta(*v) for b, v in doc["parts"].items()}
        j.sink_fingerprint = doc["sink_fingerprint"]
        return j

    def committed(self, stage: str, fingerprint: str) -> dict[int, list[Any]]:
        """Blocks of ``stage`` committed under ``fingerprint`` (empty if it changed)."""
        s = self.stages.get(stage)
        if s is None or s["fingerprint"] != fingerprint:
            return {}
        return s["done"]  # type: ignore[no-any-return]

    def rejected(self, stage: str, fingerprint: str) -> dict[int, int]:
        """Rows of each block of ``stage`` set aside as dead letters (``skip_rows``)."""
        s = self.stages.get(stage)
        if s is None or s["fingerprint"] != fingerprint:
            return {}
        return s["rejected"]  # type: ignore[no-any-return]

    # -- writing (driver only) -------------------------------------------------------------

    def begin(self, pipeline: str, blocks: int, fingerprints: dict[str, str], sink_fingerprint: str) -> None:
        """Start a run: forget stages (and sink parts) whose fingerprint changed; mark it running."""
        if sink_fingerprint != self.sink_fingerprint:
            self.parts = {}
        self.pipeline, self.blocks, self.state = pipeline, blocks, "running"
        self.sink_fingerprint = sink_fingerprint
        self.run_id = uuid.uuid4().hex
        self.stages = {
            name: (self.stages[name] if self.stages.get(name, {}).get("fingerprint") == fp
                   else {"fingerprint": fp, "done": {}, "rejected": {}})
            for name, fp in fingerprints.items()
        }
        self.flush(force=True)

    def record_block(self, stage: str, block: int, rows: int, nbytes: int, checksum: str,
                     locations: tuple[str, ...]) -> None:
        self.stages[stage]["done"][block] = [rows, nbytes, checksum, list(locations)]
        self._dirty = True

    def record_rejected(self, stage: str, block: int, rows: int) -> None:
        # kept when the block itself is forgotten: the count belongs in the final _SUCCESS
        self.stages[stage]["rejected"][block] = rows
        self._dirty = True

    def add_locations(self, stage: str, block: int, locations: tuple[str, ...]) -> None:
        entry = self.stages[stage]["done"].get(block)
        if entry is not None:
            entry[3] = [*entry[3], *locations]
            self._dirty = True

    def forget_block(self, stage: str, block: int) -> None:
        self.stages[stage]["done"].pop(block, None)
        self._dirty = True

    def record_part(self, block: int, part: PartMeta) -> None:
        self.parts[block] = part
        self._dirty = True

    def finish(self, state: str) -> None:
        self.state = state
        self.flush(force=True)

    def flush(self, force: bool = False) -> bool:
        """Write the journal if something changed and ``interval_s`` passed (or ``force``).

        A periodic flush that cannot reach the durable store returns False and is tried
        again at the next interval (the run goes on); a forced one raises.
        """
        now = time.monotonic()
        # The journal is rewritten whole, so a big one costs more per write: space writes
        # to keep them under ~10 % of the driver's time, and never closer than interval_s.
        gap = max(self.interval_s, 10 * self._write_s)
        if not force and (not self._dirty or now - self._last_flush < gap):
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
        started = time.perf_counter()
        self.updated_at = time.time()
        doc = {
            "version": VERSION, "pipeline": self.pipeline, "run_id": self.run_id, "state": self.state,
            "updated_at": self.updated_at, "blocks": self.blocks, "sink_fingerprint": self.sink_fingerprint,
            "stages": {
                n: {"fingerprint": s["fingerprint"], "done": s["done"], "rejected": s["rejected"]}
                for n, s in self.stages.items()
            },
            "parts": {str(b): [p.name, p.rows, p.bytes, p.checksum] for b, p in self.parts.items()},
        }
        fs, root = self._fs
        fs.makedirs(root, exist_ok=True)
        write_atomic(fs, f"{root}/{JOURNAL}", json.dumps(doc, separators=(",", ":")).encode(), crash="journal_write")
        self._last_flush, self._dirty, self.unreachable = now, False, ""
        self._write_s = time.perf_counter() - started
        if self.state == "running":
            self.renew_lease()

    # -- the lease -------------------------------------------------------------------------

    def lease(self) -> dict[str, Any] | None:
        fs, root = self._fs
        try:
            return json.loads(fs.cat_file(f"{root}/{LEASE}"))  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return None

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

    def renew_lease(self) -> None:
        fs, root = self._fs
        fs.makedirs(root, exist_ok=True)
        doc = {"owner": self.owner, "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
               "expires_at": time.time() + self.lease_s}
        write_atomic(fs, f"{root}/{LEASE}", json.dumps(doc).encode())

    def release_lease(self) -> None:
        held = self.lease()
        if held and held["owner"] == self.owner:
            fs, root = self._fs
            fs.rm_file(f"{root}/{LEASE}")
