"""Where each block resumes: the first step whose committed output cannot be found.

Pure: the journal says what was committed; ``exists`` (the cache) and ``part_sizes`` (one
listing of the sink) confirm it is still there. A journal entry whose data is gone is
ignored, so the block resumes from the latest copy that still exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from tierflow.engine.journal import Journal
from tierflow.plan import Plan


def sink_fingerprint(plan: Plan) -> str:
    """Identity of the sink's parts: the last stage's output and where/how it is written."""
    sink = plan.manifest.sink.model_dump(mode="json", exclude={"storage_options", "mode"})
    return hashlib.sha256(f"{plan.stages[-1].fingerprint}|{sorted(sink.items())}".encode()).hexdigest()


def resume_points(
    plan: Plan, journal: Journal, part_sizes: Mapping[str, int], exists: Callable[[str], bool]
) -> list[int]:
    """Per block, the first step still to run: 0..n-1 a stage, n the sink, n+1 nothing."""
    n = len(plan.stages)
    done = [journal.committed(s.name, s.fingerprint) for s in plan.stages]
    points = []
    for b in range(len(plan.blocks)):
        part = journal.parts.get(b)
        if part is not None and part_sizes.get(part.name) == part.bytes:
            points.append(n + 1)
            continue
        start = 0
        for s in range(n - 1, -1, -1):
            if b in done[s] and exists(plan.key(s, b)):
                start = s + 1
                break
        points.append(start)
    return points
