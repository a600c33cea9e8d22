"""The driver loop without Ray: ``Executor`` over ``tierflow.testing.InlineBackend``."""

from __future__ import annotations

from pathlib import Path

import pytest

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


class FakeTime:
    """The executor's clock, moved only by the backend's waits: no test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("crashed", [True, False])
def test_a_step_whose_worker_died_is_retried_at_once_an_outage_waits(tmp_path: Path, crashed: bool) -> None:
    """Block 1 fails once at stage s1; the time of each of its submissions is noted."""
    t = FakeTime()
    sent: list[float] = []

    class Noting(InlineBackend):
        def submit(self, d: Dispatch, input_locations: tuple[str, ...] = ()) -> None:
            if (d.step, d.block) == (1, 1):
                sent.append(t.now)
            super().submit(d, input_locations)

    def fail(d: Dispatch) -> Outcome | None:
        if (d.step, d.block) == (1, 1) and len(sent) == 1:
            return Outcome(False, error="boom", retryable=True, crashed=crashed)
        return None

    plan = plan_of(tmp_path)
    ex = Executor(plan, Sink(plan.manifest.sink, str(tmp_path / "out")), CacheSettings(root=str(tmp_path / "cache")),
                  backend=Noting(rows_per_block=10, fail=fail, sleep=t.sleep), clock=t, draw=lambda: 0.0)
    report = ex.run()
    s1 = next(s for s in report["stages"] if s["name"] == "s1")
    assert s1["retries"] == 1 and report["rows_out"] == 40 and len(sent) == 2
    if crashed:  # its worker or node died: not an outage, the block goes again at once
        assert sent[1] == sent[0]
    else:  # a failure inside the step (an outage) waits out the backoff: 1 s before attempt 2
        assert sent[1] - sent[0] == pytest.approx(1.0, abs=0.5)
        assert sent[1] - sent[0] >= 1.0


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

        def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> bool:
            self.asked.append((step, block, locations))
            return True

    plan = plan_of(tmp_path)
    backend = Recording()
    settings = CacheSettings(root=str(tmp_path / "cache"), replicas=2)
    Executor(plan, Sink(plan.manifest.sink, str(tmp_path / "out")), settings, backend=backend).run()
    assert backend.asked == [(0, 2, ("lmdb:n1",))]  # the other blocks have two copies (local + durable)


def test_a_copy_that_lands_after_its_block_was_consumed_is_deleted_too(tmp_path: Path) -> None:
    """A top-up copy still under way when the block's reader commits lands after the block
    was deleted everywhere: the driver deletes it again, or it would stay on that node."""
    from tierflow.cache.tiered import BlockMeta

    class LateCopy(InlineBackend):
        def __init__(self) -> None:
            super().__init__(rows_per_block=10, fail=self.one_copy)
            self.read = False  # block 2's reader (step 1) has committed
            self.landed = False
            self.deletes: list[str] = []

        def one_copy(self, d: Dispatch) -> Outcome | None:
            self.read |= (d.step, d.block) == (1, 2)
            if (d.step, d.block) != (0, 2):
                return None
            return Outcome(True, BlockMeta(self._plan.key(0, 2), 10, 80, "xxh3-128:" + "0" * 32, ("lmdb:n1",)), rows_in=10)

        def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> bool:
            return True

        def new_copies(self) -> list[tuple[int, int, tuple[str, ...]]]:
            if self.read and not self.landed:
                self.landed = True
                return [(0, 2, ("lmdb:n2",))]
            return []

        def delete(self, keys: list[str], wait: bool = False) -> None:
            self.deletes += keys

    plan = plan_of(tmp_path)
    backend = LateCopy()
    settings = CacheSettings(root=str(tmp_path / "cache"), replicas=2)
    report = Executor(plan, Sink(plan.manifest.sink, str(tmp_path / "out")), settings, backend=backend).run()
    assert backend.landed and backend.deletes.count(plan.key(0, 2)) == 2  # after its reader, and the late copy
    assert backend.deletes.count(plan.key(0, 1)) == 1
    assert report["stages"][0]["rereplicated"] == 1


def test_a_restarted_server_is_a_fault_with_its_time_in_the_report(tmp_path: Path) -> None:
    class Restarting(InlineBackend):
        told = False

        def restarted_servers(self) -> list[str]:
            if self.told:
                return []
            self.told = True
            return ["cache:n2"]

    plan = plan_of(tmp_path)
    report = Executor(plan, Sink(plan.manifest.sink, str(tmp_path / "out")),
                      CacheSettings(root=str(tmp_path / "cache")), backend=Restarting(rows_per_block=10)).run()
    assert [r["server"] for r in report["servers_restarted"]] == ["cache:n2"]
    tel = report["telemetry"]
    assert tel["fault_counts"]["server_restarted"] == 1
    assert [(f["kind"], f["detail"]) for f in tel["faults"]] == [("server_restarted", "cache:n2")]
