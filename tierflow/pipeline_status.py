"""``tierflow status``: a pipeline's progress read from its journal alone (no Ray)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from tierflow.cache.locations import location_kind
from tierflow.engine.journal import Journal
from tierflow.plan import Plan


@dataclass(frozen=True, slots=True)
class StageStatus:
    name: str
    done: int  # blocks this stage has finished (their output, or a later one, is committed)
    total: int
    held_rows: int  # rows in the blocks of this stage still stored
    held_blocks: int
    locations: dict[str, int]  # location kind -> copies
    stale: bool  # the journal's entries are for another fingerprint


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    """A pipeline's progress as its journal records it."""

    pipeline: str
    state: str  # "new", "running", "interrupted" (running, no live lease), "succeeded" or "failed"
    holder: str | None  # "<host> pid <pid>" of the driver running it now, if one does
    stages: tuple[StageStatus, ...]
    sink_parts: int
    sink_rows: int
    blocks: int

    @property
    def running(self) -> bool:
        return self.holder is not None


def pipeline_status(plan: Plan, journal: Journal) -> PipelineStatus:
    n, total = len(plan.stages), len(plan.blocks)
    reach = [-1] * total  # per block: the furthest step with a committed output
    stages = []
    for i, sp in enumerate(plan.stages):
        for b in journal.committed(sp.name, sp.fingerprint):
            reach[b] = max(reach[b], i)
    for b in journal.parts:
        if b < total:
            reach[b] = n
    for i, sp in enumerate(plan.stages):
        held = journal.committed(sp.name, sp.fingerprint)
        where: Counter[str] = Counter()
        for entry in held.values():
            where.update(location_kind(loc) for loc in entry.locations)
        recorded = journal.stages.get(sp.name)
        stages.append(StageStatus(
            sp.name, sum(r >= i for r in reach), total, sum(e.rows for e in held.values()), len(held),
            dict(where), recorded is not None and recorded["fingerprint"] != sp.fingerprint,
        ))
    lease = journal.lease()
    running = bool(journal.state == "running" and lease and lease["expires_at"] > time.time())
    return PipelineStatus(
        pipeline=plan.manifest.name,
        state=journal.state if journal.state != "running" or running else "interrupted",
        holder=f"{lease['host']} pid {lease['pid']}" if running and lease else None,
        stages=tuple(stages),
        sink_parts=sum(1 for b in journal.parts if b < total),
        sink_rows=sum(p.rows for p in journal.parts.values()),
        blocks=total,
    )
