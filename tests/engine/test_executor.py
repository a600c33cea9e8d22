"""The driver loop without Ray: ``Executor`` over ``tierflow.testing.InlineBackend``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import tierflow.engine.executor as executor_module
from tierflow.cache.settings import CacheSettings
from tierflow.engine.executor import Executor
from tierflow.engine.runners import Outcome
from tierflow.engine.state import Dispatch
from tierflow.io.sink import Sink
from tierflow.io.source import BlockSpec, Source
from tierflow.manifest import parse_manifest
from tierflow.plan import Plan, StagePlan
from tierflow.testing import InlineBackend


def plan_of(root: Path, blocks: int = 4, stages: int = 2) -> Plan:
    doc = {
        "name": "inline",
        "source": {"format": "parquet", "path": str(root / "in"), "block_rows": 10},
        "stages": [{"name": f"s{i}", "kind": "python", "fn": "tierflow.testing:identity"} for i in range(stages)],
        "sink": {"path": str(root / "out"), "mode": "overwrite"},
    }
    m = parse_manifest(doc, "inline.yaml", str(root))
    specs = tuple(BlockSpec(i, "in/a.parquet", i * 10, 10) for i in range(blocks))
    steps = tuple(StagePlan(i, s, f"{i:064x}") for i, s in enumerate(m.stages))
    return Plan(m, Source(m.source, str(root / "in")), (), specs, steps)


def run_with_one_failure(root: Path, failure: Outcome) -> tuple[dict, float]:  # type: ignore[type-arg]
    """Block 1 fails once at stage s1 with ``failure``; returns the report and the wall time."""
    failed: list[Dispatch] = []

    def fail(d: Dispatch) -> Outcome | None:
        if (d.step, d.block) == (1, 1) and not failed:
            failed.append(d)
            return failure
        return None

    plan = plan_of(root)
    ex = Executor(plan, Sink(plan.manifest.sink, str(root / "out")), CacheSettings(root=str(root / "cache")),
                  backend=InlineBackend(rows_per_block=10, fail=fail))
    t = time.monotonic()
    report = ex.run()
    return report, time.monotonic() - t


@pytest.mark.parametrize("crashed", [True, False])
def test_a_step_whose_worker_died_is_retried_at_once_an_outage_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crashed: bool
) -> None:
    monkeypatch.setattr(executor_module, "RETRY_BASE_S", 4.0)  # the backoff: 2-4 s before attempt 2
    failure = Outcome(False, error="boom", retryable=True, crashed=crashed)
    report, wall = run_with_one_failure(tmp_path, failure)
    s1 = next(s for s in report["stages"] if s["name"] == "s1")
    assert s1["retries"] == 1 and report["rows_out"] == 40
    if crashed:
        assert wall < 2.0, "a step whose worker or node died waited out the outage backoff"
    else:
        assert wall >= 2.0, "a failure inside the step (an outage) was retried without backoff"


def test_a_block_committed_with_too_few_copies_is_copied_again(tmp_path: Path) -> None:
    """A peer write that failed under load leaves one copy; the driver asks for another
    (``replicas: 2``, no durable store) instead of waiting for that node to die."""
    from tierflow.cache.tiered import BlockMeta

    class Recording(InlineBackend):
        def __init__(self) -> None:
            super().__init__(rows_per_block=10, fail=self.one_copy)
            self.asked: list[tuple[int, int, tuple[str, ...]]] = []

        def one_copy(self, d: Dispatch) -> Outcome | None:
            if (d.step, d.block) != (0, 2):
                return None
            return Outcome(True, BlockMeta(self._plan.key(0, 2), 10, 80, "xxh3-128:" + "0" * 32, ("lmdb:n1",)), rows_in=10)

        def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> None:
            self.asked.append((step, block, locations))

    plan = plan_of(tmp_path)
    backend = Recording()
    settings = CacheSettings(root=str(tmp_path / "cache"), replicas=2)
    Executor(plan, Sink(plan.manifest.sink, str(tmp_path / "out")), settings, backend=backend).run()
    assert backend.asked == [(0, 2, ("lmdb:n1",))]  # the other blocks have two copies (local + durable)
