"""The Ray driver loop: runs the state machine's ``Dispatch`` actions and feeds back events.

Function stages are Ray tasks; ``cls`` and Triton stages are pools of actors that keep
their state (instance, gRPC channel) across blocks. The sink is one more step. Only block
metadata crosses back to the driver; the data moves through the cache by key.

The loop blocks in ``ray.wait`` until some work finishes (no fixed sleep between
dispatches); its timeout only paces progress refreshes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from tierflow.cache.settings import CacheSettings
from tierflow.engine.journal import Journal
from tierflow.engine.progress import Progress, StepView, summary_table
from tierflow.engine.runners import Outcome, StageActor, delete_blocks, run_task, sink_task
from tierflow.engine.state import Completed, Dispatch, Failed, PipelineState
from tierflow.errors import StageError, TierflowError
from tierflow.faults import crash_point
from tierflow.io.sink import PartMeta, Sink
from tierflow.manifest import PythonStage
from tierflow.plan import Plan, StagePlan

SINK_CONCURRENCY = 2
DELETE_BATCH = 64
ACTOR_START_TIMEOUT_S = 120.0


class ActorPool:
    """A fixed set of actors for one stage; each takes one block at a time."""

    def __init__(self, stage: StagePlan, factory: Callable[[], Any], size: int) -> None:
        self.stage = stage
        self._factory = factory
        self.actors = [factory() for _ in range(size)]
        self._idle: deque[Any] = deque(self.actors)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every actor is constructed. Raises TierflowError naming the stage."""
        refs = [a.ready.remote() for a in self.actors]
        try:
            ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            cfg = self.stage.config
            raise TierflowError(
                f"stage {self.stage.name!r}: {len(self.actors)} actor(s) needing {cfg.num_cpus} CPU "
                f"each could not start within {timeout_s:.0f} s (not enough CPU in the cluster?)"
            ) from None
        except RayActorError as exc:
            raise StageError(self.stage.name, -1, f"actor failed to start: {exc}") from None

    def acquire(self) -> Any:
        return self._idle.popleft()

    def release(self, actor: Any) -> None:
        self._idle.append(actor)

    def replace(self, actor: Any) -> None:
        """Swap a dead actor for a fresh one (its blocks are retried by the driver)."""
        ray.kill(actor, no_restart=True)
        new = self._factory()
        self.actors[self.actors.index(actor)] = new
        self._idle.append(new)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


@dataclass
class Executor:
    """Runs one plan to completion on the connected Ray cluster.

    Args:
        plan: what to run.
        sink: where the final blocks go.
        settings: the cache every step reads from and writes to.
        triton_url: gRPC address for Triton stages (None when the pipeline has none).
        progress_out: where the live table goes (None = no progress output).
    """

    plan: Plan
    sink: Sink
    settings: CacheSettings
    triton_url: str | None = None
    window: int | None = None
    max_attempts: int = 3
    progress_out: Any = None
    journal: Journal | None = None
    start_step: list[int] | None = None
    views: list[StepView] = field(init=False)
    parts: dict[int, PartMeta] = field(init=False, default_factory=dict)
    _garbage: list[str] = field(init=False, default_factory=list)
    _deletions: list[Any] = field(init=False, default_factory=list)

    def run(self) -> dict[str, Any]:
        """Run every block through every stage and the sink; commit the sink.

        Returns the run report. Raises StageError (stage, block, cause) when a step fails
        for good; the sink is then left without ``_SUCCESS``.
        """
        plan, n = self.plan, len(self.plan.stages)
        self.views = [StepView(s.name, _kind(s), len(plan.blocks)) for s in plan.stages]
        self.views.append(StepView("sink", "parquet", len(plan.blocks)))
        for first in self.start_step or ():
            for view in self.views[:first]:
                view.reused += 1  # committed by an earlier run: read, not recomputed
        started = time.monotonic()
        pools: dict[int, ActorPool] = {}
        progress = Progress(plan.manifest.name, self.views, self.progress_out) if self.progress_out else None
        error: BaseException | None = None
        try:
            self.sink.prepare()
            settings_ref = ray.put(self.settings)
            source_ref = ray.put(plan.source)
            limits = []
            for s in plan.stages:
                if isinstance(s.config, PythonStage) and s.config.cls is None:
                    limits.append(s.config.concurrency)
                    continue
                opts = {"num_cpus": s.config.num_cpus}
                pools[s.index] = ActorPool(
                    s,
                    lambda s=s, opts=opts: StageActor.options(**opts).remote(  # type: ignore[attr-defined]
                        s.config, self.triton_url, self.settings
                    ),
                    s.config.concurrency,
                )
                limits.append(s.config.concurrency)
            limits.append(SINK_CONCURRENCY)
            for pool in pools.values():
                pool.wait_ready(ACTOR_START_TIMEOUT_S)
            window = self.window or max(8, 2 * sum(limits))
            state = PipelineState(len(plan.blocks), limits, window, self.max_attempts, self.start_step)
            pending: dict[Any, tuple[Dispatch, Any]] = {}

            def submit(actions: list[Dispatch]) -> None:
                for d in actions:
                    view = self.views[d.step]
                    view.started = view.started or time.monotonic()
                    view.executions += 1
                    view.retries += d.attempt > 1
                    if self.start_step is not None and d.step < self.start_step[d.block]:
                        view.reexecutions += 1  # must stay 0: committed work is never redone
                    actor = None
                    if d.step == n:
                        ref = sink_task.remote(self.sink, plan.key(n - 1, d.block), d.block, settings_ref)
                    else:
                        inp = plan.blocks[d.block] if d.step == 0 else plan.key(d.step - 1, d.block)
                        src = source_ref if d.step == 0 else None
                        out_key = plan.key(d.step, d.block)
                        if d.step in pools:
                            actor = pools[d.step].acquire()
                            ref = actor.run.remote(src, inp, out_key)
                        else:
                            cfg = plan.stages[d.step].config
                            ref = run_task.options(num_cpus=cfg.num_cpus).remote(
                                cfg, src, inp, out_key, settings_ref
                            )
                    pending[ref] = (d, actor)

            submit(state.start())
            while not state.finished:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                if ready:
                    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for ref in ready:
                    d, actor = pending.pop(ref)
                    outcome = self._outcome(ref, d, actor, pools)
                    submit(state.handle(self._event(d, outcome)))
                flushed = self.journal.flush() if self.journal is not None else False
                self._collect_garbage(settings_ref, now=flushed)
                self._sync_views(state)
                if progress:
                    progress.refresh()
            self._sync_views(state)
            if self.journal is not None:
                self.journal.flush(force=True)
            self._collect_garbage(settings_ref, now=True, wait=True)
            if state.fatal is not None:
                f = state.fatal
                self.views[f.step].failed = True
                name = self.views[f.step].name
                raise StageError(name, f.block, f.error.splitlines()[0] if f.error else "failed")
            parts = self.journal.parts if self.journal is not None else self.parts
            if self.journal is not None:
                self.journal.flush(force=True)  # every part is journaled before _SUCCESS
            crash_point("before_success")
            self.sink.commit([parts[b] for b in sorted(parts)], {"pipeline": plan.manifest.name})
        except BaseException as exc:
            error = exc
            raise
        finally:
            for pool in pools.values():
                pool.shutdown()
            if progress:
                progress.refresh(force=True)
                progress.close()
            elapsed = time.monotonic() - started
            self.report = self._report(elapsed, error)
            if self.progress_out:
                from rich.console import Console

                console = Console(file=self.progress_out)
                if not console.is_terminal:
                    console.width = 120  # logs and pipes: do not squeeze the summary to 80
                console.print(summary_table(self.views, elapsed))
        return self.report

    def _outcome(self, ref: Any, d: Dispatch, actor: Any, pools: dict[int, ActorPool]) -> Outcome:
        try:
            outcome: Outcome = ray.get(ref)
        except RayError as exc:  # the worker, actor or node died: the system's fault, retry
            if actor is not None:
                pools[d.step].replace(actor)
            return Outcome(False, error=f"{type(exc).__name__}: {exc}", retryable=True)
        if actor is not None:
            pools[d.step].release(actor)
        return outcome

    def _event(self, d: Dispatch, outcome: Outcome) -> Completed | Failed:
        view = self.views[d.step]
        view.busy_s += outcome.seconds
        if not outcome.ok:
            return Failed(d.step, d.block, outcome.error, outcome.retryable)
        meta = outcome.meta
        view.rows_out += meta.rows
        j = self.journal
        if d.step == len(self.plan.stages):
            self.parts[d.block] = meta
            if j is not None:
                j.record_part(d.block, meta)
        elif j is not None:
            j.record_block(self.plan.stages[d.step].name, d.block, meta.rows, meta.nbytes, meta.checksum,
                           meta.locations)
        if d.step > 0 and not self.plan.stages[d.step - 1].config.checkpoint:
            self._garbage.append(self.plan.key(d.step - 1, d.block))  # its only reader is done
            if j is not None:
                j.forget_block(self.plan.stages[d.step - 1].name, d.block)
        return Completed(d.step, d.block)

    def _collect_garbage(self, settings_ref: Any, now: bool = False, wait: bool = False) -> None:
        """Delete consumed intermediate blocks in batches, off the driver's loop.

        With a journal, only right after a flush (``now``): a block is deleted only once
        the journal durably says its successor is committed, so a crash never leaves a
        block whose input is gone and whose output is not journaled.
        """
        ready = now if self.journal is not None else now or len(self._garbage) >= DELETE_BATCH
        if self._garbage and ready:
            if self._deletions:  # forget finished batches
                _, self._deletions = ray.wait(self._deletions, num_returns=len(self._deletions), timeout=0)
            self._deletions.append(delete_blocks.remote(self._garbage, settings_ref))
            self._garbage = []
        if wait and self._deletions:
            ray.get(self._deletions)
            self._deletions = []

    def _sync_views(self, state: PipelineState) -> None:
        now = time.monotonic()
        for view, c in zip(self.views, state.counters):
            view.done, view.inflight, view.queued = c.done, c.inflight, c.queued
            if view.done >= view.total and view.finished is None:
                view.finished = now

    def _report(self, elapsed: float, error: BaseException | None) -> dict[str, Any]:
        stages = []
        for i, v in enumerate(self.views):
            entry: dict[str, Any] = {
                "name": v.name, "kind": v.kind, "blocks": v.total, "blocks_done": v.done,
                "executions": v.executions, "retries": v.retries, "reused": v.reused,
                "reexecutions": v.reexecutions,
                "rows_out": v.rows_out, "busy_s": round(v.busy_s, 3),
            }
            if i < len(self.plan.stages):
                entry["fingerprint"] = self.plan.stages[i].fingerprint
            stages.append(entry)
        return {
            "pipeline": self.plan.manifest.name,
            "status": "failed" if error else "succeeded",
            "error": str(error) if error else None,
            "elapsed_s": round(elapsed, 3),
            "blocks": len(self.plan.blocks),
            "rows_in": self.plan.total_rows,
            "rows_out": sum(p.rows for p in (self.journal.parts if self.journal else self.parts).values()),
            "stages": stages,
        }


def _kind(stage: StagePlan) -> str:
    cfg = stage.config
    if isinstance(cfg, PythonStage):
        return "task" if cfg.cls is None else "actor"
    return f"triton:{cfg.model}"
