"""``tierflow status``: a pipeline's progress read from its journal alone (no Ray).

Besides blocks done, it gives the tier breakdown of what is stored: per stage, copies and
bytes per location kind (``lmdb`` copies on nodes, ``remote`` the durable store), from the
journal's block entries; and, when the last run left a report in the cache directory,
where that run's steps read their input from (memory, local, peer, remote, source).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    bytes_at: dict[str, int] = field(default_factory=dict)  # location kind -> bytes of those copies
    last_reads: dict[str, int] = field(default_factory=dict)  # read tier -> blocks, in the last run's report


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


def last_reads(report_path: str | Path) -> dict[str, dict[str, int]]:
    """Per step name, the reads per tier in a run report (``{}`` without a readable one).
    Reads the JSON only: no plotting library, no Ray."""
    try:
        report: dict[str, Any] = json.loads(Path(report_path).read_text())
        return {s["name"]: dict(s.get("reads", {})) for s in report["telemetry"]["steps"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def pipeline_status(plan: Plan, journal: Journal, reads: dict[str, dict[str, int]] | None = None) -> PipelineStatus:
    """Progress and stored copies from ``journal``; ``reads`` (see :func:`last_reads`)
    adds the last run's reads per tier to each stage."""
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
        nbytes: Counter[str] = Counter()
        for entry in held.values():
            for loc in entry.locations:
                kind = location_kind(loc)
                where[kind] += 1
                nbytes[kind] += entry.nbytes
        recorded = journal.stages.get(sp.name)
        stages.append(StageStatus(
            sp.name, sum(r >= i for r in reach), total, sum(e.rows for e in held.values()), len(held),
            dict(where), recorded is not None and recorded["fingerprint"] != sp.fingerprint,
            dict(nbytes), (reads or {}).get(sp.name, {}),
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
