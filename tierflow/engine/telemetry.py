"""Run telemetry: what the driver saw over time, for the run report and for metrics.

The executor owns one :class:`Telemetry` per run and tells it what happened: a driver
round (``sample``: the recorder reads the live per-step views, at most once per
``interval_s``), a step's output committed (``block``: which tier its input came from,
the worker's memory and what its cache evicted, all measured in the worker, and where it
wrote its copies), a block consumed (``consumed``: its copies are about to be deleted),
copies added by re-replication (``copied``), a node lost (``node_lost``: its copies no
longer count as held) and other faults (``fault``: a restarted server, ...).
``finish`` takes a last sample and returns the JSON that goes into ``report.json`` under
``"telemetry"``; ``tierflow report`` renders it and :mod:`tierflow.metrics` serves the
latest figures to Prometheus.

Cost on the driver: a round that is not due costs one clock read; a sample walks the
steps once (20 steps: a few µs, once a second); ``block`` and ``consumed`` are a few dict
updates per committed block. Timelines keep at most ``max_samples`` points: when full, every other
point is dropped and the interval doubles, so a 10-hour run stays a few hundred KB of JSON
(rather than growing with the run, or sampling so sparsely that short runs show nothing).

Nothing here imports Ray; the clock and the memory probe are injected (tests use fakes).

Usage::

    telemetry = Telemetry.for_plan(plan)
    while running:
        ...
        telemetry.sample(views)
    report["telemetry"] = telemetry.finish(views)
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from tierflow.engine.runners import Outcome
    from tierflow.plan import Plan

__all__ = [
    "FAULT_KINDS", "HELD_TIERS", "READ_TIERS", "MemorySample", "StepFigures", "StepResources", "StepUsage",
    "Telemetry", "backpressured", "host_memory",
]

# 2: reads measured in the worker (memory/local/peer/remote), read bytes, usage
# 3: evicted bytes per tier (memory/local/peer), backpressure (``held_back`` timeline), held bytes
#    leave with a lost node
# 4: ``held_bytes`` and ``evicted_bytes`` (all tiers) in the per-step timeline
SCHEMA_VERSION = 4

# Where a step read its input from: the worker's in-process memory tier, its node's LMDB
# (``local``, as for writes), another node's LMDB, the durable store, or the source.
SOURCE, MEMORY, LOCAL, PEER, REMOTE, UNKNOWN = "source", "memory", "local", "peer", "remote", "unknown"
READ_TIERS = (SOURCE, MEMORY, LOCAL, PEER, REMOTE)
_READ_NAMES = {"lmdb": LOCAL, "memory": MEMORY, "peer": PEER, "remote": REMOTE, "source": SOURCE}
# Where a committed step wrote: LOCAL, PEER, REMOTE and SINK (a part file).
SINK = "sink"
# Where a step's blocks are held: its workers' memory tiers, then the copies it wrote.
HELD_TIERS = (MEMORY, LOCAL, PEER, REMOTE)
MEMO_MAX = 65536  # (node, locations) combinations remembered per classification
WORKER_FRESH_S = 10.0  # a worker that reported within this long counts as one of a step's workers

_T = TypeVar("_T")


def _write_kinds(node: str, locations: tuple[str, ...]) -> tuple[str, ...]:
    """The tier of each copy in ``locations`` written by a step that ran on ``node``."""
    local = f"lmdb:{node}"
    return tuple(
        (LOCAL if loc == local else PEER) if loc.startswith("lmdb:") else loc.partition(":")[0] for loc in locations
    )


# Per copy, its tier and, for a copy on a node's LMDB, the key ``(location, tier)`` its
# bytes are counted under in ``StepUsage.held_at`` (built once per combination: memoised).
_Copies = tuple[tuple[str, tuple[str, str] | None], ...]


def _copies(node: str, locations: tuple[str, ...]) -> tuple[tuple[str, ...], _Copies]:
    """``(the tiers of the copies, each copy's tier and node key)`` for :meth:`Telemetry.block`."""
    kinds = _write_kinds(node, locations)
    return kinds, tuple(
        (kind, (loc, kind) if loc.startswith("lmdb:") else None) for kind, loc in zip(kinds, locations)
    )


def backpressured(steps: Sequence[StepFigures], i: int) -> bool:
    """Whether step ``i`` is held back by the step after it: that one is saturated (every
    slot busy, blocks waiting) while ``i`` has nothing queued and free slots. With the
    scheduler's admission window, a slow step fills the window with blocks waiting for it
    and the steps before it run dry: this is where that shows."""
    if i + 1 >= len(steps):
        return False
    s, nxt = steps[i], steps[i + 1]
    return (
        nxt.limit > 0 and nxt.inflight >= nxt.limit and nxt.queued > 0
        and s.queued == 0 and s.inflight < max(s.limit, 1) and s.done < s.total
    )


# Counters of a step whose increase between two samples is recorded as a fault event.
_FAULT_COUNTERS = (
    ("retries", "retry"), ("reexecutions", "reexecuted"), ("timeouts", "timeout"),
    ("dead_letters", "dead_letter"), ("retired_actors", "actor_retired"), ("spares_used", "spare_took_over"),
)
# Every fault kind recorded here (metrics export them from 0, so that rates work at once).
FAULT_KINDS = ("node_lost", "rereplicated", "server_restarted", *(kind for _, kind in _FAULT_COUNTERS))


class StepFigures(Protocol):
    """What a sample reads from each step (``tierflow.engine.progress.StepView`` has it)."""

    name: str
    total: int
    done: int
    inflight: int
    queued: int
    rows_out: int
    executions: int
    retries: int
    reexecutions: int
    timeouts: int
    dead_letters: int
    retired_actors: int
    spares_used: int
    limit: int  # the most attempts it may run at once (0: not known yet)


@dataclass(frozen=True, slots=True)
class StepResources:
    """The Ray resources one running attempt of a step holds."""

    name: str
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True, slots=True)
class MemorySample:
    """Resident memory of the run's processes on the driver's host, in bytes."""

    workers_rss: int  # every Ray worker process (``ray::...``) on this host, summed
    workers: int
    max_worker_rss: int
    driver_rss: int


def host_memory() -> MemorySample | None:
    """RSS of this run's Ray workers on this host and of this process; None without psutil.

    The workers are the ``ray::...`` processes below this one (the embedded Ray's raylet
    is its child), else, when it joined a cluster, every ``ray::`` process on this host
    (which may serve other jobs too). Other hosts are not seen: Ray (without its
    dashboard) publishes no per-process figures. ~5 ms for 100 processes, hence its own,
    slower interval.
    """
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process(os.getpid())

    def workers(procs: Iterable[psutil.Process]) -> list[int]:
        found = []
        for proc in procs:
            try:
                # Ray workers retitle themselves "ray::<task or actor>"; the raylet and GCS do not
                cmd = proc.cmdline()
                if cmd and cmd[0].startswith("ray::"):
                    found.append(proc.memory_info().rss)
            except psutil.Error:  # gone meanwhile, or not ours to read
                continue
        return found

    rss = workers(me.children(recursive=True)) or workers(psutil.process_iter())
    return MemorySample(sum(rss), len(rss), max(rss, default=0), me.memory_info().rss)


@dataclass(slots=True)
class StepUsage:
    """One step's resource and cache figures, kept up to date per committed block.

    The live table (:mod:`tierflow.engine.progress`) reads these; ``to_json`` writes
    them. Memory figures come from the workers (:mod:`tierflow.engine.rss`).

    Attributes:
        cpus, gpus: What one running attempt holds.
        workers: ``(node, pid)`` -> ``(time, rss, memory tier bytes)`` of the worker
            processes that committed a block of this step, at their latest report.
        rss_peak: The highest worker RSS seen while a step ran, in bytes.
        grew_peak: The most a single step added to its worker's RSS (peak - start).
        reads: Read tier -> ``[blocks, bytes]`` (measured in the worker).
        held: Write tier (``local``, ``peer``, ``remote``) -> bytes of this step's blocks
            written there and not consumed yet (copies on a lost node excluded).
        held_at: ``(lmdb:<node>, tier)`` -> the part of ``held`` on that node's LMDB (what
            leaves ``held`` when the node is lost).
        spilled: Bytes of blocks that could not stay on their writer's LMDB (full or down)
            and went to peers or the durable store instead.
        evicted: ``memory`` / ``local`` / ``peer`` -> bytes the workers' memory tiers
            evicted, and their writes evicted from their node's LMDB and (for the peer
            copies) from other nodes' LMDB, while this step ran (measured in the writer).
    """

    cpus: float
    gpus: float = 0.0
    workers: dict[tuple[str, int], tuple[float, int, int]] = field(default_factory=dict)
    rss_peak: int = 0
    grew_peak: int = 0
    reads: dict[str, list[int]] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    held_at: dict[tuple[str, str], int] = field(default_factory=dict)
    spilled: int = 0
    evicted: dict[str, int] = field(default_factory=dict)
    rss_now: int = 0  # the fresh workers' RSS, summed (at the last sample)
    memory_tier_now: int = 0  # ... their memory tiers' bytes, summed

    def hit_ratio(self) -> float | None:
        """Share of cache reads served on the node (memory or local LMDB); None before any."""
        cached = sum(n for tier, (n, _) in self.reads.items() if tier != SOURCE)
        if not cached:
            return None
        near = sum(self.reads.get(t, (0, 0))[0] for t in (MEMORY, LOCAL))
        return near / cached

    def refresh(self, now: float) -> None:
        """Sum the workers that reported within ``WORKER_FRESH_S``; forget the others."""
        stale = [w for w, (t, _, _) in self.workers.items() if now - t > WORKER_FRESH_S]
        for w in stale:
            del self.workers[w]
        self.rss_now = sum(rss for _, rss, _ in self.workers.values())
        self.memory_tier_now = sum(m for _, _, m in self.workers.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "rss_now": self.rss_now, "rss_peak": self.rss_peak, "step_memory_peak": self.grew_peak,
            "workers": len(self.workers), "held": dict(sorted(self.held.items())),
            "memory_tier": self.memory_tier_now, "spilled": self.spilled, "evicted": dict(sorted(self.evicted.items())),
        }


@dataclass
class _Series:
    """Columns sampled together (``t`` plus one list per name), thinned when full."""

    names: tuple[str, ...]
    t: list[float] = field(default_factory=list)
    cols: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cols = {n: [] for n in self.names}

    def add(self, t: float, values: dict[str, Any]) -> None:
        self.t.append(t)
        for n in self.names:
            self.cols[n].append(values[n])

    def thin(self) -> None:
        """Drop every other point (keeping the first): halves the length, keeps the shape."""
        self.t = self.t[::2]
        self.cols = {n: v[::2] for n, v in self.cols.items()}


class Telemetry:
    """Per-run recorder of per-step timelines, faults, resources, memory and cache I/O.

    Driver-only and not thread-safe for writers: the executor is the one writer. The
    metrics exporter only reads ``latest``, a dict replaced whole at each sample.

    Args:
        pipeline: The pipeline's name (a label on every metric).
        steps: Per step (each stage, then the sink), its name and resources per attempt.
        clock: Seconds, monotonic (injectable).
        interval_s: The shortest time between two samples.
        max_samples: Points kept per timeline before thinning.
        memory: The memory probe (None: no memory figures).
        memory_interval_s: The shortest time between two memory probes.
        max_faults: Fault events kept with their time (counts per kind are always exact).
    """

    def __init__(
        self,
        pipeline: str,
        steps: Sequence[StepResources],
        *,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 1.0,
        max_samples: int = 2000,
        memory: Callable[[], MemorySample | None] | None = host_memory,
        memory_interval_s: float = 2.0,
        max_faults: int = 1000,
    ) -> None:
        self.pipeline = pipeline
        self.steps = tuple(steps)
        self._clock = clock
        self._interval = interval_s
        self._max_samples = max(2, max_samples)
        self._memory = memory
        self._memory_interval = memory_interval_s
        self._max_faults = max_faults
        self._t0 = clock()
        self._next_at = self._t0  # the first round samples at once
        self._memory_at = self._t0
        n = len(self.steps)
        per_step = ("done", "rows_out", "inflight", "queued", "cpus", "gpus", "rss", "held_back",
                    "held_bytes", "evicted_bytes")
        self._timeline = [_Series(per_step) for _ in range(n)]
        self.usage = [StepUsage(s.cpus, s.gpus) for s in self.steps]
        # (step, block) -> (writer node, its copies, bytes): held until consumed
        self._live: dict[tuple[int, int], tuple[str, _Copies, int]] = {}
        self._lost: set[str] = set()  # ``lmdb:<node>`` of the nodes lost: their copies are gone
        self._worker_step: dict[tuple[str, int], int] = {}  # (node, pid) -> the step it ran last
        self._kept = [False] * n  # steps whose blocks are never consumed (checkpoints)
        self._mem = _Series(("workers_rss", "workers", "max_worker_rss", "driver_rss"))
        self._faults: list[dict[str, Any]] = []
        self._fault_counts: Counter[str] = Counter()
        self._seen: list[dict[str, int]] = [{} for _ in range(n)]  # counters at the last sample
        self._writes: list[dict[tuple[str, ...], list[int]]] = [{} for _ in range(n)]  # tiers -> [count, bytes]
        self._kinds_of: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, ...], _Copies]] = {}
        self._sink_step = n - 1
        self.latest: dict[str, Any] = {}
        self.closers: list[Callable[[], None]] = []  # run by finish() (the metrics server)
        self.metrics_port: int | None = None  # where metrics were served (``metrics.port`` 0: a free one)

    @classmethod
    def for_plan(cls, plan: Plan, **kwargs: Any) -> Telemetry:
        """A recorder for ``plan``'s stages and sink (``tierflow.metrics`` serves it when
        the manifest says ``metrics: {port: N}``)."""
        from tierflow.engine.backend import SINK_CPUS

        steps = [
            StepResources(s.name, s.config.num_cpus, float(getattr(s.config, "num_gpus", 0.0)))
            for s in plan.stages
        ]
        telemetry = cls(plan.manifest.name, [*steps, StepResources(SINK, SINK_CPUS)], **kwargs)
        telemetry._kept = [s.config.checkpoint for s in plan.stages] + [True]
        return telemetry

    # -- what the executor calls -------------------------------------------------------

    def sample(self, views: Sequence[StepFigures], force: bool = False) -> bool:
        """Record the steps' figures if ``interval_s`` has passed (or ``force``).

        Returns whether a sample was taken. Called every driver round: a round that is
        not due costs one clock read.
        """
        now = self._clock()
        if not force and now < self._next_at:
            return False
        self._next_at = now + self._interval
        t = round(now - self._t0, 3)
        steps = []
        for i, (v, res, use) in enumerate(zip(views, self.steps, self.usage)):
            use.refresh(now)
            fig = {
                "done": v.done, "rows_out": v.rows_out, "inflight": v.inflight, "queued": v.queued,
                "cpus": v.inflight * res.cpus, "gpus": v.inflight * res.gpus, "rss": use.rss_now,
                "held_back": int(backpressured(views, i)),
                "held_bytes": sum(use.held.values()), "evicted_bytes": sum(use.evicted.values()),
            }
            self._timeline[i].add(t, fig)
            self._note_counters(i, v, t)
            steps.append({**fig, "name": v.name, "total": v.total, "executions": v.executions,
                          "retries": v.retries, "reexecutions": v.reexecutions})
        if len(self._timeline[0].t) > self._max_samples:
            for series in self._timeline:
                series.thin()
            self._interval *= 2
        memory = self._probe_memory(now, t, force)
        self.latest = {
            "t": t, "steps": steps, "memory": memory, "faults": dict(self._fault_counts),
            "reads": [{k: n for k, (n, _) in u.reads.items()} for u in self.usage],
            "read_bytes": [{k: b for k, (_, b) in u.reads.items()} for u in self.usage],
            "usage": [u.as_json() for u in self.usage],
            "writes": [{k: tuple(v) for k, v in self._write_totals(i).items()} for i in range(len(self.steps))],
        }
        return True

    def block(self, step: int, outcome: Outcome, block: int = -1) -> None:
        """Count a committed step's read, its worker's memory and its writes.

        The read is the tier the worker's cache served it from (``Outcome.read_tier``:
        ``memory``, ``local`` LMDB, ``peer``, ``remote``, or ``source`` for the first
        stage; ``unknown`` when the outcome does not say, e.g. from a test backend).
        Writes are exact: each copy in the output's locations, with its size; they count
        as held (per tier) until :meth:`consumed` is told the block is no longer needed.
        """
        use = self.usage[step]
        tier = _READ_NAMES.get(outcome.read_tier, UNKNOWN)
        entry = use.reads.get(tier)
        if entry is None:
            use.reads[tier] = [1, outcome.read_bytes]
        else:
            entry[0] += 1
            entry[1] += outcome.read_bytes
        node = outcome.node
        if outcome.evicted_memory_bytes:
            use.evicted[MEMORY] = use.evicted.get(MEMORY, 0) + outcome.evicted_memory_bytes
        if outcome.evicted_lmdb_bytes:
            use.evicted[LOCAL] = use.evicted.get(LOCAL, 0) + outcome.evicted_lmdb_bytes
        if outcome.evicted_peer_bytes:
            use.evicted[PEER] = use.evicted.get(PEER, 0) + outcome.evicted_peer_bytes
        if outcome.pid:
            worker = (node, outcome.pid)
            # Ray reuses a task worker for any stage: it counts for the last one it ran,
            # so the stages' figures add up to the workers' memory, not more
            last = self._worker_step.get(worker)
            if last != step:
                if last is not None:
                    self.usage[last].workers.pop(worker, None)
                self._worker_step[worker] = step
            use.workers[worker] = (self._clock(), outcome.rss_end, outcome.memory_tier_bytes)
            if outcome.rss_peak > use.rss_peak:
                use.rss_peak = outcome.rss_peak
            grew = outcome.rss_peak - outcome.rss_start
            if grew > use.grew_peak:
                use.grew_peak = grew
        meta = outcome.meta
        kinds: tuple[str, ...]
        if step == self._sink_step:
            kinds, nbytes = (SINK,), meta.bytes
        else:
            # memoised by (node, locations): the combinations are few (nodes x replica
            # sets), the outcomes many (2.4M at 120k blocks x 20 stages)
            key = (node, meta.locations)
            kinds, copies = self._kinds_of.get(key) or self._memo(self._kinds_of, key, _copies)
            nbytes = meta.nbytes
            self._hold(use, copies, nbytes)
            if LOCAL not in kinds:
                use.spilled += nbytes
            if not self._kept[step] and block >= 0:
                self._live[(step, block)] = (node, copies, nbytes)
        written = self._writes[step].get(kinds)
        if written is None:
            self._writes[step][kinds] = [1, nbytes]
        else:
            written[0] += 1
            written[1] += nbytes

    def consumed(self, step: int, block: int) -> None:
        """``block``'s output of ``step`` was read by the next step and goes away: it no
        longer counts as held. (It is deleted after the next journal flush, seconds later.)"""
        entry = self._live.pop((step, block), None)
        if entry is None:
            return
        _, copies, nbytes = entry
        use = self.usage[step]
        held, held_at, lost = use.held, use.held_at, self._lost
        for kind, at in copies:
            if at is not None:
                if lost and at[0] in lost:
                    continue  # taken out when its node was lost
                held_at[at] -= nbytes
            held[kind] -= nbytes

    def copied(self, step: int, block: int, added: tuple[str, ...]) -> None:
        """A block waiting for its reader was re-replicated to ``added``: those copies are
        held too (until it is consumed)."""
        entry = self._live.get((step, block))
        if entry is None or not added:
            return  # consumed meanwhile, or a checkpoint (counted as written)
        node, copies, nbytes = entry
        more = self._copies_of(node, added)[1]
        self._live[(step, block)] = (node, copies + more, nbytes)
        self._hold(self.usage[step], more, nbytes)

    def node_lost(self, node: str) -> None:
        """Record the fault; the copies on ``node``'s LMDB are gone, so they leave the held
        bytes, and its workers leave the steps' worker memory figures."""
        self.fault("node_lost", node)
        gone = f"lmdb:{node}"
        self._lost.add(gone)
        for use in self.usage:
            for kind in (LOCAL, PEER):
                nbytes = use.held_at.pop((gone, kind), 0)
                if nbytes:
                    use.held[kind] -= nbytes
            for worker in [w for w in use.workers if w[0] == node]:
                del use.workers[worker]

    def _copies_of(self, node: str, locations: tuple[str, ...]) -> tuple[tuple[str, ...], _Copies]:
        key = (node, locations)
        return self._kinds_of.get(key) or self._memo(self._kinds_of, key, _copies)

    def _hold(self, use: StepUsage, copies: _Copies, nbytes: int) -> None:
        held, held_at, lost = use.held, use.held_at, self._lost
        for kind, at in copies:
            if at is not None:
                if lost and at[0] in lost:
                    continue  # reported after its node was lost: that copy is gone already
                held_at[at] = held_at.get(at, 0) + nbytes
            held[kind] = held.get(kind, 0) + nbytes

    @staticmethod
    def _memo(memo: dict[tuple[str, tuple[str, ...]], _T], key: tuple[str, tuple[str, ...]],
              fn: Callable[[str, tuple[str, ...]], _T]) -> _T:
        value = fn(*key)
        if len(memo) < MEMO_MAX:  # a bound for a cluster with very many nodes: then computed each time
            memo[key] = value
        return value

    def _write_totals(self, step: int) -> dict[str, list[int]]:
        """Per tier, [copies, bytes] written by ``step``."""
        totals: dict[str, list[int]] = {}
        for kinds, (count, nbytes) in self._writes[step].items():
            for kind in kinds:
                entry = totals.setdefault(kind, [0, 0])
                entry[0] += count
                entry[1] += nbytes
        return totals

    def fault(self, kind: str, detail: str = "") -> None:
        """Record a fault (``node_lost``, ``server_restarted``, ``rereplicated``, ...) now."""
        self._fault_counts[kind] += 1
        if len(self._faults) < self._max_faults:
            self._faults.append({"t": round(self._clock() - self._t0, 3), "kind": kind, "detail": detail})

    def finish(self, views: Sequence[StepFigures]) -> dict[str, Any]:
        """Take the last sample, stop the metrics server, return :meth:`to_json`."""
        self.sample(views, force=True)
        closers, self.closers = self.closers, []
        for close in closers:
            close()
        return self.to_json()

    def to_json(self) -> dict[str, Any]:
        """The recording, as plain JSON-able data (``report.json``'s ``"telemetry"``)."""
        steps = []
        for i, (res, series) in enumerate(zip(self.steps, self._timeline)):
            steps.append({
                "name": res.name, "cpus_per_attempt": res.cpus, "gpus_per_attempt": res.gpus,
                "t": series.t, **series.cols,
                "reads": {k: n for k, (n, _) in sorted(self.usage[i].reads.items())},
                "read_bytes": {k: b for k, (_, b) in sorted(self.usage[i].reads.items())},
                **self.usage[i].as_json(),
                "writes": {k: {"count": c, "bytes": b} for k, (c, b) in sorted(self._write_totals(i).items())},
            })
        return {
            "version": SCHEMA_VERSION,
            "interval_s": self._interval,
            "steps": steps,
            "faults": self._faults,
            "fault_counts": dict(sorted(self._fault_counts.items())),
            "memory": {"scope": "driver host", "t": self._mem.t, **self._mem.cols},
            "metrics_port": self.metrics_port,
        }

    # -- internals ---------------------------------------------------------------------

    def _note_counters(self, step: int, v: StepFigures, t: float) -> None:
        """Counters that rose since the last sample become fault events at this sample's
        time (a retry storm is one event per step and second, not one per retry)."""
        seen = self._seen[step]
        for attr, kind in _FAULT_COUNTERS:
            n = getattr(v, attr)
            rise = n - seen.get(attr, 0)
            if rise > 0:
                seen[attr] = n
                self._fault_counts[kind] += rise
                if len(self._faults) < self._max_faults:
                    self._faults.append({"t": t, "kind": kind, "detail": f"{v.name} +{rise}"})

    def _probe_memory(self, now: float, t: float, force: bool) -> dict[str, int] | None:
        if self._memory is None or not (force or now >= self._memory_at):
            return self.latest.get("memory")
        got = self._memory()
        # at most 1 % of the driver's time, however many processes the host has
        self._memory_at = now + max(self._memory_interval, 100 * (self._clock() - now))
        if got is None:
            self._memory = None  # no probe here (psutil missing): stop asking
            return None
        values = {"workers_rss": got.workers_rss, "workers": got.workers,
                  "max_worker_rss": got.max_worker_rss, "driver_rss": got.driver_rss}
        self._mem.add(t, values)
        if len(self._mem.t) > self._max_samples:
            self._mem.thin()
            self._memory_interval *= 2
        return values
