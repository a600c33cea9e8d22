"""Public helpers for testing pipelines and the engine without a cluster."""

from __future__ import annotations

import time
from collections.abc import Callable

import pyarrow as pa

from tierflow.cache.settings import CacheSettings
from tierflow.cache.tiered import BlockMeta
from tierflow.engine.backend import stage_limits
from tierflow.engine.runners import Outcome
from tierflow.engine.state import Dispatch
from tierflow.io.sink import PartMeta, Sink
from tierflow.plan import Plan


def identity(table: pa.Table) -> pa.Table:
    """A stage function that returns its input (for manifests in tests and benchmarks)."""
    return table


class InlineBackend:
    """A ``Backend`` that completes every dispatch in-process at once, with made-up metadata.

    It runs no stage code and stores nothing: it exists to measure and test the driver
    loop itself (state machine, journal, bookkeeping) at scale. ``fail(d)`` may return an
    ``Outcome`` to inject a failure for a dispatch.
    """

    def __init__(
        self,
        rows_per_block: int = 1000,
        fail: Callable[[Dispatch], Outcome | None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rows = rows_per_block
        self.fail = fail
        self.sleep = sleep  # a test's fake time passes here while nothing runs
        self.submitted = 0
        self.deleted = 0
        self.dead_letters: list[tuple[int, int, str]] = []
        self._done: list[Dispatch] = []

    def start(self, plan: Plan, sink: Sink, settings: CacheSettings, triton_url: str | tuple[str, ...] | None) -> list[int]:
        self._plan = plan
        self._n = len(plan.stages)
        return stage_limits(plan)

    def submit(self, d: Dispatch, input_locations: tuple[str, ...] = ()) -> None:
        self.submitted += 1
        self._done.append(d)

    def wait(self, timeout_s: float) -> list[tuple[Dispatch, Outcome]]:
        if not self._done:
            self.sleep(timeout_s)
        done, self._done = self._done, []
        return [(d, self._outcome(d)) for d in done]

    def _outcome(self, d: Dispatch) -> Outcome:
        injected = self.fail(d) if self.fail else None
        if injected is not None:
            return injected
        if d.step == self._n:
            meta: object = PartMeta(Sink.part_name(d.block), self.rows, 8 * self.rows, "0" * 32)
        else:
            key = self._plan.key(d.step, d.block)
            meta = BlockMeta(key, self.rows, 8 * self.rows, "xxh3-128:" + "0" * 32, ("lmdb:inline", "remote"))
        return Outcome(True, meta, rows_in=self.rows)

    def delete(self, keys: list[str], wait: bool = False) -> None:
        self.deleted += len(keys)

    def can_add(self, step: int) -> bool:
        return True

    def cancel(self, d: Dispatch, reason: str | None) -> None:
        self._done = [x for x in self._done if (x.step, x.block) != (d.step, d.block)]

    def dead_letter(self, step: int, block: int, error: str, input_locations: tuple[str, ...]) -> None:
        self.dead_letters.append((step, block, error))

    def exclude(self, step: int, node: str) -> bool:
        return False

    def lost_nodes(self) -> list[str]:
        return []

    def actor_counts(self, step: int) -> tuple[int, int]:
        return 0, 0

    def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> None:
        pass

    def new_copies(self) -> list[tuple[int, int, tuple[str, ...]]]:
        return []

    def flush(self, prefix: str) -> int:
        return 0

    def shutdown(self) -> None:
        pass
