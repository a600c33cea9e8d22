"""How fast this machine's cache tiers write and read blocks of one size.

What ``tierflow bench cache`` runs, on the cache a manifest (or the flags) configures:
for each tier, ``count`` puts of a ``block_size``-byte block framed as the cache frames it
(header, XXH3-128 checksum, the manifest's zstd level for the durable store), then
``count`` gets of them (checksum verified, as every cache read is). Each operation is
timed on its own; a figure gives the bytes moved, throughput (bytes / median latency) and
p50/p90/p99/max latency. Averages are left out: one fsync stall or page-fault burst moves
them without saying anything about the typical operation.

The user's data is never touched: the LMDB tier is a scratch environment next to the
configured one (same disk), the durable store a scratch prefix under the configured URL,
and both are removed afterwards. ``tools/bench_cache.py`` builds on these pieces to set
each tier next to its ceiling (raw LMDB, raw fsspec, ``ray.put``).

Usage::

    figures = bench_tiers(settings, block_size=4 << 20, count=20)
    for f in figures:
        print(f.tier, f.op, f.mb_s)
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tierflow.cache import codec
from tierflow.cache.settings import CacheSettings
from tierflow.errors import CacheError

__all__ = ["TIERS", "Figure", "bench_tiers", "default_count", "figure", "human", "parse_size", "payload"]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
#: The tiers measured, fastest first.
TIERS = ("memory", "lmdb", "remote")


def parse_size(text: str) -> int:
    """``"64K"``, ``"4M"``, ``"4MiB"``, ``"1G"`` or plain bytes -> bytes.

    >>> parse_size("64K"), parse_size("4MiB"), parse_size("1000")
    (65536, 4194304, 1000)

    Raises:
        ValueError: not a size, or not positive.
    """
    units = {"K": KiB, "M": MiB, "G": GiB}
    clean = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        size = int(float(clean[:-1]) * units[clean[-1]]) if clean and clean[-1] in units else int(clean)
    except (ValueError, IndexError):
        raise ValueError(f"not a size: {text!r} (e.g. 64K, 4M, 1G or bytes)") from None
    if size <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return size


def human(size: int) -> str:
    """``4194304`` -> ``"4 MiB"`` (whole units; bytes below 1 KiB)."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B" if size < KiB else f"{size / MiB:.2f} MiB"


def default_count(block_size: int, traffic_bytes: int = 256 * MiB) -> int:
    """Operations per figure: about ``traffic_bytes`` of traffic, between 3 and 1000."""
    return max(3, min(1000, traffic_bytes // block_size))


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` bytes, half random and half a repeated word: neither incompressible nor trivial."""
    rng = np.random.default_rng(seed)
    half = size // 2
    return rng.integers(0, 256, size=half, dtype=np.uint8).tobytes() + (b"tierflow" * (size // 8 + 1))[: size - half]


@dataclass(frozen=True)
class Figure:
    """Latencies of one operation on one tier. ``bytes`` counts payload bytes moved."""

    tier: str
    op: str
    block_size: int
    ops: int
    bytes: int
    seconds: float
    mb_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def figure(tier: str, op: str, block_size: int, samples: list[float]) -> Figure:
    """The figure of ``samples`` (seconds per operation of ``block_size`` bytes)."""
    s = sorted(samples)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1e3

    p50 = statistics.median(s)
    return Figure(tier, op, block_size, len(s), block_size * len(s), round(sum(s), 6),
                  block_size / p50 / 1e6 if p50 > 0 else float("inf"), p50 * 1e3, pct(0.9), pct(0.99), s[-1] * 1e3)


def timed(count: int, op: Callable[[int], object], warmup: int = 1) -> list[float]:
    """Seconds of each of ``op(0) .. op(count - 1)``, after ``warmup`` untimed calls."""
    for i in range(warmup):
        op(i)
    samples = []
    for i in range(count):
        t0 = time.perf_counter()
        op(i)
        samples.append(time.perf_counter() - t0)
    return samples


def _open_tier(kind: str, settings: CacheSettings, scratch: str, need_bytes: int) -> Any:
    """A scratch instance of tier ``kind`` where ``settings`` would put the real one."""
    if kind == "memory":
        from tierflow.cache.tiers.memory import MemoryTier

        return MemoryTier(capacity_bytes=max(settings.memory_bytes, 2 * need_bytes))
    if kind == "lmdb":
        from tierflow.cache.tiers.lmdb import LmdbTier

        map_size = max(settings.lmdb_map_size, 4 * need_bytes)
        return LmdbTier(os.path.join(scratch, "lmdb"), capacity_bytes=max(2 * need_bytes, 1 << 20), map_size=map_size)
    from tierflow.cache.tiers.remote import RemoteTier

    url = f"{settings.durable_url.rstrip('/')}/_bench/{os.path.basename(scratch)}"
    return RemoteTier(url, settings.storage_options, timeout_s=settings.remote_timeout_s)


def bench_tiers(settings: CacheSettings, block_size: int, count: int | None = None,
                tiers: Iterable[str] = TIERS) -> list[Figure]:
    """A put and a get figure for each tier in ``tiers``, in that order.

    Args:
        settings: The cache to measure (its directory's disk, its durable store).
        block_size: Payload bytes of every block.
        count: Operations per figure (default: ``default_count(block_size)``).
        tiers: Any of ``TIERS``.

    Raises:
        ValueError: an unknown tier or a count below 1.
        CacheError: a tier failed (``TierUnavailable`` for an unreachable store) or a
            block read back was missing.
    """
    kinds = list(tiers)
    unknown = sorted(set(kinds) - set(TIERS))
    if unknown:
        raise ValueError(f"unknown tier {unknown[0]!r} (known: {list(TIERS)})")
    n = default_count(block_size) if count is None else count
    if n < 1:
        raise ValueError("count must be >= 1")
    data = payload(block_size)
    frame = codec.frame(data, content=codec.Content.BYTES)
    durable_frame = codec.recode(frame, "bench", settings.compression_level)
    root = settings.root.replace("{node}", "bench")
    os.makedirs(root, exist_ok=True)
    scratch = os.path.join(root, f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    figures: list[Figure] = []
    try:
        for kind in kinds:
            tier = _open_tier(kind, settings, scratch, (n + 1) * len(frame))
            stored = durable_frame if kind == "remote" else frame
            keys = [f"bench/p/s/{i:06d}" for i in range(n)]
            try:
                figures.append(figure(kind, "put", block_size, timed(n, lambda i: tier.put(keys[i], stored))))

                def get(i: int) -> None:
                    if tier.get(keys[i % n]) is None:
                        raise CacheError(f"cache tier {kind}: block {keys[i % n]} written by the benchmark read back as a miss")

                figures.append(figure(kind, "get", block_size, timed(n, get)))
            finally:
                tier.close()
                if kind == "remote":
                    _remove_prefix(tier.url, settings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


def _remove_prefix(url: str, settings: CacheSettings) -> None:
    """Remove the benchmark's scratch prefix of the durable store, and ``_bench/`` when
    that leaves it empty. Best effort: what cannot be removed is left (and said nowhere),
    as a failed benchmark must not hide its own error behind a clean-up one."""
    import contextlib

    from tierflow.stores import open_store

    with contextlib.suppress(Exception):
        fs, path = open_store(url, settings.storage_options)
        fs.rm(path, recursive=True)
        parent = path.rsplit("/", 1)[0]
        if not fs.ls(parent):
            fs.rmdir(parent)
