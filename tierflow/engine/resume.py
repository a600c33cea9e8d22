"""Where each block resumes: after the last step the journal says it committed.

Pure. Sink parts are confirmed against one listing of the sink (``part_sizes``): a part
that is gone or has another size is written again. Intermediate blocks are not probed one
by one (that would be a request per block against a remote store); a block the journal
lists but no copy holds any more is found when the next step reads it, and the engine
then recomputes it from the step before (see ``PipelineState``, ``lost_input``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from tierflow.engine.journal import Journal
from tierflow.plan import Plan


def sink_fingerprint(plan: Plan) -> str:
    """Identity of the sink's parts: the last stage's output and where/how it is written."""
    sink = plan.manifest.sink.model_dump(mode="json", exclude={"storage_options", "mode"})
    return hashlib.sha256(f"{plan.stages[-1].fingerprint}|{sorted(sink.items())}".encode()).hexdigest()


def resume_points(plan: Plan, journal: Journal, part_sizes: Mapping[str, int]) -> list[int]:
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
            if b in done[s]:
                start = s + 1
                break
        points.append(start)
    return points
