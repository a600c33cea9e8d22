"""Where dispatched steps run: the ``Backend`` seam between the driver loop and Ray.

The executor speaks only this protocol, so its loop (state machine, journal, progress,
garbage collection) runs unchanged against ``RayBackend`` (``engine/ray_backend.py``) in
production and against an in-process fake (``tierflow.testing.InlineBackend``) in scale
tests of the driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from tierflow.cache.settings import CacheSettings
from tierflow.engine.placement import at_once
from tierflow.engine.runners import Outcome
from tierflow.engine.state import Dispatch
from tierflow.io.sink import Sink
from tierflow.plan import Plan

__all__ = ["SINK_CONCURRENCY", "SINK_CPUS", "Backend", "Blocks", "Cluster", "Steps", "stage_limits"]

SINK_CONCURRENCY = 2
SINK_CPUS = 1.0  # a sink task encodes Parquet


class Steps(Protocol):
    """Running steps: what every backend must do."""

    def start(self, plan: Plan, sink: Sink, settings: CacheSettings, triton_url: str | tuple[str, ...] | None) -> list[int]:
        """Get ready to run (actors started, shared objects published). Returns, per step
        (stages then sink), how many dispatches it can run at once."""
        ...

    def submit(self, d: Dispatch, input_locations: tuple[str, ...] = ()) -> None:
        """Start step ``d.step`` on block ``d.block``, whose input block has copies at
        ``input_locations`` (empty for source blocks). Never blocks."""
        ...

    def wait(self, timeout_s: float) -> list[tuple[Dispatch, Outcome]]:
        """Block until at least one dispatch finished or ``timeout_s`` passed; return every
        finished one. A lost worker or actor is a failed, retryable Outcome."""
        ...

    def can_add(self, step: int) -> bool:
        """Whether a copy more of ``step`` can start now (a speculative one)."""
        ...

    def cancel(self, d: Dispatch, reason: str | None) -> None:
        """Stop every running copy of ``(d.step, d.block)``; their outcomes never surface.
        With a ``reason`` (a timeout), ``wait`` reports one retryable failure for it."""
        ...

    def exclude(self, step: int, node: str) -> bool:
        """Give ``step`` no more work on ``node``; False when it is the last node left."""
        ...

    def dead_letter(self, step: int, block: int, error: str, input_locations: tuple[str, ...]) -> None:
        """Write block ``block``'s input to step ``step`` and ``error`` to the dead letters."""
        ...

    def shutdown(self) -> None:
        """Wait for dead letters to be written, then stop every actor."""
        ...


class Blocks(Protocol):
    """The cache's copies of committed blocks, on the nodes and in the durable store."""

    def delete(self, keys: list[str], wait: bool = False) -> None:
        """Drop cache blocks (asynchronously unless ``wait``)."""
        ...

    def flush(self, prefix: str) -> int:
        """Write the durable copies still missing under ``prefix`` on every node; returns
        how many were written. Raises TierUnavailable while the durable store is down."""
        ...

    def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> bool:
        """Start copying a block whose copies are now only at ``locations`` to new nodes;
        whether a copy was started (not when no other node could take one)."""
        ...

    def new_copies(self) -> list[tuple[int, int, tuple[str, ...]]]:
        """``(step, block, locations added)`` of the re-replications answered since the last
        call; none added when one failed or found no peer to copy to."""
        ...


class Cluster(Protocol):
    """What happened to the machines: the executor turns each answer into faults."""

    def lost_nodes(self) -> list[str]:
        """Nodes found dead since the last call (Ray's node table)."""
        ...

    def restarted_servers(self) -> list[str]:
        """Servers (``cache:<node>``, ``triton:<node>``) found dead and started again since
        the last call; each becomes a ``server_restarted`` fault."""
        ...

    def actor_counts(self, step: int) -> tuple[int, int]:
        """Actors of ``step`` so far: retired for failing too often, and standby spares that
        took over ((0, 0) for task stages)."""
        ...


class Backend(Steps, Blocks, Cluster, Protocol):
    """Runs steps of one plan. Not thread-safe; used by the driver loop only. Each method
    carries out one kind of instruction of the executor; the decisions are the executor's."""


def stage_limits(plan: Plan, nodes: Mapping[str, Mapping[str, float]] | None = None) -> list[int]:
    """Per step, dispatches at once: each stage's concurrency, then the sink's.

    With ``nodes`` (alive node -> its resources), a stage asking for GPUs or custom
    resources is capped at the workers those nodes can hold at once (``num_gpus: 1`` on
    two one-GPU nodes: 2, whatever its concurrency), so no attempt waits in Ray's queue
    for a device while its timeout runs. Never under 1: with no node holding it yet (an
    autoscaler may add one), the stage keeps its concurrency.
    """
    limits = []
    for s in plan.stages:
        fit = at_once(nodes, s.config.demand) if nodes is not None else None
        limits.append(min(s.config.concurrency_range[1], fit or s.config.concurrency_range[1]))
    return [*limits, SINK_CONCURRENCY]
