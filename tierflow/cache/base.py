"""The one interface every cache level implements (and what peer nodes offer), its
statistics, and its error edge.

A tier is a dumb, bytes-in/bytes-out store of *frames* (see :mod:`tierflow.cache.codec`)
keyed by validated block keys. Misses are ``None``, never an error. A tier that reads
from a medium that can rot (LMDB, remote) verifies each frame's checksum and raises
:class:`~tierflow.errors.CorruptObject` for a bad one; a tier that cannot be reached
raises :class:`~tierflow.errors.TierUnavailable`. Every third-party exception is turned
into one of those two in exactly one place, :func:`tier_errors`.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from tierflow.credentials import scrub
from tierflow.errors import CacheError, TierUnavailable, medium_failures

__all__ = ["Counters", "Peers", "Tier", "TierStats", "tier_errors", "unavailable_error"]


@dataclass(frozen=True, slots=True)
class TierStats:
    """A snapshot of one tier's counters (since this process opened it).

    ``entries``, ``bytes_used`` and ``capacity_bytes`` describe the store itself and are
    ``None`` where finding them would be expensive (a remote bucket).
    """

    name: str
    kind: str
    hits: int = 0
    misses: int = 0
    puts: int = 0
    deletes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    corrupt: int = 0
    errors: int = 0
    entries: int | None = None
    bytes_used: int | None = None
    capacity_bytes: int | None = None
    bytes_evicted: int = 0  # the evictions' bytes (last: positional construction stays as it was)

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict (for JSON and the CLI)."""
        return asdict(self)


class Counters:
    """Thread-safe counters behind :class:`TierStats`."""

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "hits", "misses", "puts", "deletes", "bytes_read", "bytes_written",
        "evictions", "corrupt", "errors", "bytes_evicted",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self._FIELDS, 0)

    def add(self, **deltas: int) -> None:
        """Add to counters by name."""
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def hit(self, nbytes: int) -> None:
        """Count one hit of ``nbytes`` (the hot path, without keyword parsing)."""
        with self._lock:
            values = self._values
            values["hits"] += 1
            values["bytes_read"] += nbytes

    def value(self, name: str) -> int:
        """One counter's current value (cheaper than a snapshot)."""
        with self._lock:
            return self._values[name]

    def snapshot(
        self,
        name: str,
        kind: str,
        *,
        entries: int | None = None,
        bytes_used: int | None = None,
        capacity_bytes: int | None = None,
    ) -> TierStats:
        """Freeze the current values into a :class:`TierStats`."""
        with self._lock:
            v = dict(self._values)
        return TierStats(
            name, kind, v["hits"], v["misses"], v["puts"], v["deletes"], v["bytes_read"],
            v["bytes_written"], v["evictions"], v["corrupt"], v["errors"], entries, bytes_used,
            capacity_bytes, v["bytes_evicted"],
        )


@runtime_checkable
class Tier(Protocol):
    """One cache level. Frames in, frames out; a miss is ``None``, not an error.

    Every method validates its key (raising :class:`~tierflow.errors.InvalidKey`) and may
    raise :class:`~tierflow.errors.TierUnavailable` when the medium cannot be reached.
    """

    kind: ClassVar[str]
    name: str
    """Where this tier lives, for messages and stats (``lmdb:/data/tf/lmdb``). No secrets."""

    def get(self, key: str) -> bytes | None:
        """Return the frame stored under ``key``, or ``None``.

        Raises:
            CorruptObject: The stored frame fails its checksum (tiers on durable media).
        """
        ...

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` (a complete frame) under ``key``, replacing any old value."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``. Returns whether it existed."""
        ...

    def contains(self, key: str) -> bool:
        """Whether ``key`` is stored. Does not read or verify the value."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every stored key that starts with ``prefix``, in sorted order."""
        ...

    def stats(self) -> TierStats:
        """A snapshot of this tier's counters."""
        ...

    def close(self) -> None:
        """Release resources. Idempotent."""
        ...


class Peers(Protocol):
    """Copies on other nodes: what :class:`~tierflow.cache.tiered.TieredCache` asks of them.

    Implemented with Ray actors by :class:`~tierflow.cache.node_server.RayPeers`. Defined
    here, next to :class:`Tier`, so that ``node_server`` needs nothing from ``tiered``.

    Implementations raise :class:`~tierflow.errors.TierUnavailable` only when no peer
    could be asked at all; a single unreachable peer is skipped.
    """

    def replicate(
        self, key: str, frame: bytes, count: int, *, pinned: bool, skip: Collection[str] = ()
    ) -> list[str]:
        """Write ``frame`` to ``count`` other nodes' LMDB (pinned: not evictable until
        durable), never to the nodes in ``skip``; return the location names written (may
        be fewer than ``count``)."""
        ...

    def fetch(self, key: str, hints: Sequence[str] = ()) -> tuple[bytes, str] | None:
        """Read a verified frame from another node, trying the ``lmdb:<node>`` locations in
        ``hints`` first: ``(frame, location)`` or ``None``."""
        ...

    def delete(self, key: str) -> int:
        """Delete ``key`` from every other node; return how many held it."""
        ...

    def evicted_bytes(self) -> int:
        """Bytes the other nodes evicted to make room for the copies this process wrote."""
        ...


def unavailable_error(tier: str, exc: BaseException, secrets: Sequence[str] = ()) -> TierUnavailable | None:
    """The :class:`TierUnavailable` that ``exc`` means, or ``None`` if it is not a medium failure."""
    if isinstance(exc, CacheError) or not isinstance(exc, medium_failures()):
        return None
    return TierUnavailable(tier, scrub(f"{type(exc).__name__}: {exc}", secrets))


class tier_errors:  # noqa: N801 - used like a function: ``with tier_errors(name):``
    """Translate third-party failures inside the block into :class:`TierUnavailable`.

    The single place where lmdb, fsspec, botocore, aiohttp and OS errors become tierflow
    errors. :class:`CacheError` passes through unchanged; the original exception stays
    attached as ``__cause__``. The reason names the exception type and message with every
    resolved secret replaced by ``***``. (A class, not a generator, because it sits on
    every read's hot path.)

    Args:
        tier: The tier's name (``remote:s3://bucket/prefix``).
        secrets: Resolved credential values to scrub from the message.
    """

    __slots__ = ("secrets", "tier")

    def __init__(self, tier: str, secrets: Sequence[str] = ()) -> None:
        self.tier = tier
        self.secrets = secrets

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            return
        error = unavailable_error(self.tier, exc, self.secrets)
        if error is not None:
            raise error from exc
