"""``tierflow status``: a pipeline's progress read from its journal alone (no Ray)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

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


def pipeline_status(plan: Plan, journal: Journal) -> dict[str, Any]:
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
            where.update(loc.split(":", 1)[0] for loc in entry[3])
        recorded = journal.stages.get(sp.name)
        stages.append(StageStatus(
            sp.name, sum(r >= i for r in reach), total, sum(e[0] for e in held.values()), len(held),
            dict(where), recorded is not None and recorded["fingerprint"] != sp.fingerprint,
        ))
    lease = journal.lease()
    running = bool(journal.state == "running" and lease and lease["expires_at"] > time.time())
    return {
        "pipeline": plan.manifest.name,
        "state": journal.state if journal.state != "running" or running else "interrupted",
        "running": running,
        "holder": f"{lease['host']} pid {lease['pid']}" if running and lease else None,
        "stages": stages,
        "sink": {"parts": sum(1 for b in journal.parts if b < total), "total": total,
                 "rows": sum(p.rows for p in journal.parts.values())},
    }
