"""Driver overhead at production scale: blocks x stages through the real driver loop.

    python tools/bench_scheduler.py [--blocks 120000] [--stages 20] [--json PATH]

Ray is replaced by ``tierflow.testing.InlineBackend`` (every dispatch completes in-process
at once), so what is measured is the driver alone: the scheduler state machine, the
executor's bookkeeping, the journal (flushed every 2 s to a local directory, as in a real
run) and the sink's ``_SUCCESS`` manifest. Prints CPU seconds and peak RSS; targets from
the issue: <= 60 s of CPU and <= 2 GiB for 120,000 blocks x 20 stages.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

from _harness import engine_info, machine, parser, write_json
from tierflow.cache.settings import CacheSettings
from tierflow.engine.executor import Executor
from tierflow.engine.journal import Journal
from tierflow.engine.resume import sink_fingerprint
from tierflow.io.sink import Sink
from tierflow.io.source import BlockSpec, Source
from tierflow.manifest import parse_manifest
from tierflow.plan import Plan, StagePlan
from tierflow.testing import InlineBackend


def synthetic_plan(blocks: int, stages: int, root: Path) -> Plan:
    doc = {
        "name": "scale",
        "source": {"format": "parquet", "path": str(root / "in"), "block_rows": 1000},
        "stages": [
            {"name": f"s{i:02d}", "kind": "python", "fn": "tierflow.testing:identity",
             "concurrency": 4, "checkpoint": i == stages - 1}
            for i in range(stages)
        ],
        "sink": {"path": str(root / "out"), "mode": "overwrite"},
    }
    m = parse_manifest(doc, "scale.yaml", str(root))
    specs = tuple(BlockSpec(i, "in/part.parquet", i * 1000, 1000) for i in range(blocks))
    sp = tuple(StagePlan(i, s, f"{i:064x}") for i, s in enumerate(m.stages))
    return Plan(m, Source(m.source, str(root / "in")), (), specs, sp)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--blocks", type=int, default=120_000)
    ap.add_argument("--stages", type=int, default=20)
    args = ap.parse_args()
    host = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = synthetic_plan(args.blocks, args.stages, root)
        settings = CacheSettings(root=str(root / "cache"))
        journal = Journal.load(str(root / "journal"))
        journal.pipeline = "scale"
        journal.begin("scale", args.blocks, {s.name: s.fingerprint for s in plan.stages}, sink_fingerprint(plan))
        backend = InlineBackend()
        ex = Executor(plan, Sink(plan.manifest.sink, str(root / "out")), settings, journal=journal, backend=backend)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        report = ex.run()
        journal.finish("succeeded")
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dispatches = backend.submitted
    assert report["rows_out"] == args.blocks * 1000 and dispatches == args.blocks * (args.stages + 1)
    figures = {
        "blocks": args.blocks, "stages": args.stages, "dispatches": dispatches,
        "driver_cpu_s": round(cpu, 2), "driver_wall_s": round(wall, 2),
        "driver_peak_rss_mib": round(rss_mib, 1), "us_per_dispatch": round(cpu / dispatches * 1e6, 2),
        "targets": {"driver_cpu_s": 60, "driver_peak_rss_mib": 2048},
        "machine": host, "engine": engine_info(),
    }
    print(f"{args.blocks} blocks x {args.stages} stages (+ sink) = {dispatches} dispatches")
    print(f"driver CPU {cpu:.1f} s (target <= 60), wall {wall:.1f} s, peak RSS {rss_mib:.0f} MiB (target <= 2048), "
          f"{figures['us_per_dispatch']} us per dispatch")
    write_json(args.json, figures)
    sys.exit(0)


if __name__ == "__main__":
    main()
