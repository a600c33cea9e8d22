"""The driver loop: runs the state machine's ``Dispatch`` actions on a backend and feeds
the outcomes back as events, journaling commits and collecting consumed blocks.

The backend (``RayBackend`` in production) runs the steps; only block metadata comes back,
data moves through the cache by key. The loop blocks in ``Backend.wait`` until some work
finishes (no fixed sleep between dispatches); its timeout only paces progress refreshes.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tierflow.cache.settings import CacheSettings
from tierflow.cache.locations import REMOTE, lmdb_location, lmdb_nodes
from tierflow.engine.backend import Backend
from tierflow.engine.ray_backend import RayBackend
from tierflow.engine.journal import Journal
from tierflow.engine.policy import RETRY, Cancel, Strikes, Watched, watch
from tierflow.engine.progress import Progress, StepView, summary_table
from tierflow.engine.telemetry import Telemetry
from tierflow.metrics import serve_metrics
from tierflow.engine.runners import Outcome
from tierflow.engine.state import Action, Completed, DeadLetter, Dispatch, Failed, PipelineState
from tierflow.errors import StageError, TierflowError, TierUnavailable
from tierflow.events import Event, EventKind, Listener
from tierflow.faults import crash_point
from tierflow.io.sink import PartMeta, Sink
from tierflow.manifest import PythonStage
from tierflow.plan import Plan, StagePlan

DELETE_BATCH = 64
DURABLE_BUDGET_S = 300.0  # how long the end of a run waits for an unreachable durable store
BLACKLIST_FAILURES = 3
BLACKLIST_WINDOW_S = 120.0
SINK_ATTEMPTS = 3  # tries per block at writing its sink part


@dataclass(slots=True)
class _Running:
    """A dispatch in flight: when it started, and how many copies of it run."""

    started: float
    dispatch: Dispatch
    inputs: tuple[str, ...]
    copies: int = 1


@dataclass
class Executor:
    """Runs one plan to completion on a backend (the connected Ray cluster by default).

    Args:
        plan: what to run.
        sink: where the final blocks go.
        settings: the cache every step reads from and writes to.
        triton_url: gRPC address(es) for Triton stages (None when the pipeline has none).
        progress_out: where the live table goes (None = no progress output).
        journal: where commits are recorded (None: no journal, no resume).
        start_step: per block, the first step to run (from ``resume_points``).
        backend: what runs the steps.
        on_event: called with each :class:`~tierflow.events.Event`, on the driver's loop.
        clock, draw: time and uniform [0, 1) draws (retry jitter), injected for tests.
    """

    plan: Plan
    sink: Sink
    settings: CacheSettings
    triton_url: str | tuple[str, ...] | None = None
    progress_out: Any = None
    journal: Journal | None = None
    start_step: list[int] | None = None
    backend: Backend = field(default_factory=lambda: RayBackend())
    on_event: Listener | None = None
    clock: Callable[[], float] = time.monotonic
    draw: Callable[[], float] = random.random
    views: list[StepView] = field(init=False)
    telemetry: Telemetry = field(init=False)  # timelines, faults, resources: report.json and metrics
    parts: dict[int, PartMeta] = field(init=False, default_factory=dict)
    _garbage: list[str] = field(init=False, default_factory=list)
    # where the copies of blocks waiting for the next step are (handed to that step)
    _locations: dict[tuple[int, int], tuple[str, ...]] = field(init=False, default_factory=dict)
    _running: dict[tuple[int, int], _Running] = field(init=False, default_factory=dict)
    # blocks with a top-up copy under way -> whether their reader is already done (then the
    # copy, landing after the block was deleted, is deleted when it lands)
    _copying: dict[tuple[int, int], bool] = field(init=False, default_factory=dict)
    _durations: dict[int, deque[float]] = field(
        init=False, default_factory=lambda: defaultdict(lambda: deque(maxlen=256))
    )
    _watched_at: float = field(init=False, default=0.0)
    _delayed: list[tuple[float, int, int, Dispatch, tuple[str, ...]]] = field(init=False, default_factory=list)
    _crashed: set[tuple[int, int]] = field(init=False, default_factory=set)  # retried at once
    _started: float = field(init=False, default=0.0)
    _strikes: Strikes = field(init=False, default_factory=lambda: Strikes(BLACKLIST_FAILURES, BLACKLIST_WINDOW_S))
    nodes_lost: list[dict[str, Any]] = field(init=False, default_factory=list)
    servers_restarted: list[dict[str, Any]] = field(init=False, default_factory=list)
    durable_catch_up: int = field(init=False, default=0)

    def run(self) -> dict[str, Any]:
        """Run every block through every stage and the sink; commit the sink.

        Returns the run report. Raises StageError (stage, block, cause) when a step fails
        for good; the sink is then left without ``_SUCCESS``.
        """
        plan = self.plan
        self.views = [StepView(s.name, _kind(s), len(plan.blocks)) for s in plan.stages]
        self.views.append(StepView("sink", "parquet", len(plan.blocks)))
        for first in self.start_step or ():
            for view in self.views[:first]:
                view.reused += 1  # committed by an earlier run: read, not recomputed
        started = self._started = self.clock()
        self.telemetry = Telemetry.for_plan(plan)
        metrics = plan.manifest.metrics
        if metrics.port is not None:
            server = serve_metrics(self.telemetry, metrics.port, metrics.host)
            self.telemetry.closers.append(server.close)
            self.telemetry.metrics_port = server.port
        progress = (
            Progress(plan.manifest.name, self.views, self.progress_out, usage=self.telemetry.usage)
            if self.progress_out else None
        )
        backend = self.backend
        error: BaseException | None = None
        try:
            self.sink.prepare()
            limits = backend.start(plan, self.sink, self.settings, self.triton_url)
            for view, limit in zip(self.views, limits):
                view.limit = limit
            self._emit("run_started")
            window = max(8, 2 * sum(limits))
            cfgs = [s.config for s in plan.stages]
            state = PipelineState(
                len(plan.blocks), limits, window,
                max_attempts=[*(c.max_attempts for c in cfgs), SINK_ATTEMPTS],
                start_step=self.start_step,
                skip=[*(c.on_error != "fail" for c in cfgs), False],
            )
            self._submit(state.start())
            while not state.finished:
                for d, outcome in backend.wait(timeout_s=min(0.5, self._start_due())):
                    event = self._event(d, outcome)
                    if event is not None:
                        self._submit(state.handle(event))
                self._watch_running()
                self._watch_nodes()
                flushed = self.journal.flush() if self.journal is not None else False
                self._collect_garbage(now=flushed)
                self._sync_views(state)
                self.telemetry.sample(self.views)
                if progress:
                    progress.refresh()
            self._sync_views(state)
            if self.journal is not None:
                self.journal.flush(force=True)
            self._collect_garbage(now=True, wait=True)
            if state.fatal is not None:
                f = state.fatal
                self.views[f.step].failed = True
                name = self.views[f.step].name
                raise StageError(name, f.block, f.error.splitlines()[0] if f.error else "failed")
            self._make_durable()
            parts = self.journal.parts if self.journal is not None else self.parts
            if self.journal is not None:
                self.journal.flush(force=True)  # every part is journaled before _SUCCESS
            crash_point("before_success")
            # rows set aside are listed next to the parts, never silently missing
            letters = {
                v.name: {"blocks": v.dead_letters, "rows": rows}
                for v, rows in zip(self.views, self._rejected_rows())
                if v.dead_letters or rows
            }
            self.sink.commit([parts[b] for b in sorted(parts)], {"pipeline": plan.manifest.name, "dead_letters": letters})
        except BaseException as exc:
            error = exc
            raise
        finally:
            backend.shutdown()
            self._emit("run_finished", error=str(error) if error else None)
            if progress:
                progress.refresh(force=True)
                progress.close()
            elapsed = self.clock() - started
            self.report = self._report(elapsed, error)
            if self.progress_out:
                from rich.console import Console

                console = Console(file=self.progress_out)
                if not console.is_terminal:
                    console.width = 120  # logs and pipes: do not squeeze the summary to 80
                console.print(summary_table(self.views, elapsed))
        return self.report

    def _submit(self, actions: list[Action]) -> None:
        now = self.clock()
        for a in actions:
            view = self.views[a.step]
            inputs = self._locations.pop((a.step - 1, a.block), ()) if a.step else ()
            if isinstance(a, DeadLetter):
                view.dead_letters += 1
                self.backend.dead_letter(a.step, a.block, a.error, inputs)
                continue
            if not view.started:
                view.started = now
                self._emit("stage_started", stage=view.name)
            view.executions += 1
            if a.attempt > 1:
                view.retries += 1
                # a retry waits a little: outages (Triton, a store) need time; a step whose
                # worker or node died goes again at once, elsewhere (it is not an outage)
                if (a.step, a.block) not in self._crashed:
                    delay = RETRY.delay_s(a.attempt - 1, self.draw())
                    heapq.heappush(self._delayed, (now + delay, a.step, a.block, a, inputs))
                    continue
            self._start(a, inputs, now)

    def _start(self, a: Dispatch, inputs: tuple[str, ...], now: float) -> None:
        self._running[(a.step, a.block)] = _Running(now, a, inputs)
        self.backend.submit(a, inputs)

    def _start_due(self) -> float:
        """Start the retries whose backoff is over; returns seconds until the next one."""
        now = self.clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, _, a, inputs = heapq.heappop(self._delayed)
            self._start(a, inputs, now)
        return self._delayed[0][0] - now if self._delayed else 0.5

    def _watch_running(self) -> None:
        """Carry out :func:`~tierflow.engine.policy.watch` (timeouts, speculation) on the
        dispatches in flight, four times a second."""
        now = self.clock()
        if now - self._watched_at < 0.25:
            return
        self._watched_at = now
        n = len(self.plan.stages)
        watched = []
        for (step, block), run in self._running.items():
            if step < n and run.started != float("inf"):
                cfg = self.plan.stages[step].config
                room = cfg.speculate_after is not None and self.backend.can_add(step)  # asked only when it matters
                watched.append(Watched((step, block), now - run.started, run.copies, cfg.block_timeout_s,
                                       cfg.speculate_after, self.views[step].queued, room))
        for instruction in watch(watched, self._durations):
            run = self._running[instruction.key]
            view = self.views[instruction.key[0]]
            if isinstance(instruction, Cancel):
                run.started = float("inf")  # cancelled: its failure comes back through wait()
                view.timeouts += 1
                self.backend.cancel(run.dispatch, instruction.reason)
            else:
                run.copies = 2
                view.speculated += 1
                view.executions += 1
                self.backend.submit(run.dispatch, run.inputs)

    def _make_durable(self) -> None:
        """Write the durable copies that an outage of the durable store left missing, with
        backoff; fail the run (no ``_SUCCESS``) once ``DURABLE_BUDGET_S`` is spent."""
        if self.settings.remote_url is None:
            return
        deadline = self.clock() + DURABLE_BUDGET_S
        delay = 1.0
        while True:
            try:
                self.durable_catch_up = self.backend.flush(f"{self.plan.manifest.name}/")
                return
            except TierUnavailable as exc:
                if self.clock() + delay > deadline:
                    raise TierflowError(
                        f"the durable store stayed unreachable for {DURABLE_BUDGET_S:.0f} s; blocks of this "
                        f"run are only on local disks, so it is not reported complete (re-run to finish): {exc}"
                    ) from None
                time.sleep(delay)  # the run is otherwise done: nothing else to do meanwhile
                delay = min(delay * 2, 30.0)

    def _watch_nodes(self) -> None:
        """Note dead nodes (report), stop pointing readers at the copies they held, and
        bring the blocks still waiting for a reader back to ``replicas`` copies, so that
        the next lost node costs no recomputation either."""
        for server in self.backend.restarted_servers():
            self.telemetry.fault("server_restarted", server)
            self.servers_restarted.append({"server": server, "at_s": round(self.clock() - self._started, 3)})
        for node in self.backend.lost_nodes():
            self.nodes_lost.append({"node": node, "at_s": round(self.clock() - self._started, 3)})
            self.telemetry.node_lost(node)  # the fault, and its copies no longer count as held
            self._emit("node_lost", node=node)
            gone = lmdb_location(node)
            for (step, block), locs in self._locations.items():
                if gone not in locs:
                    continue
                left = tuple(loc for loc in locs if loc != gone)
                self._locations[(step, block)] = left
                self._top_up(step, block, left)
        for step, block, added in self.backend.new_copies():
            consumed = self._copying.pop((step, block), False)
            if not added:
                continue  # failed, or no peer took it: the block is read from what is left
            if consumed:
                self._garbage.append(self.plan.key(step, block))  # landed after the block was deleted
            name = self.views[step].name
            self.views[step].rereplicated += 1
            self.telemetry.fault("rereplicated", f"{name} block {block}")
            self.telemetry.copied(step, block, added)
            for node in lmdb_nodes(added):
                self._emit("block_rereplicated", stage=name, block=block, node=node)
            held = self._locations.get((step, block))
            if held is None:
                continue  # its reader started meanwhile (with the copies it had then)
            self._locations[(step, block)] = held + added
            if self.journal is not None:
                self.journal.add_locations(name, block, added)

    def _top_up(self, step: int, block: int, locations: tuple[str, ...]) -> None:
        """Copy a block waiting for its reader to more nodes when it has fewer than
        ``replicas`` copies (its node died, or a peer write failed under load) and no
        durable one: losing its last node would otherwise mean recomputing it."""
        if locations and REMOTE not in locations and len(locations) < self.settings.replicas:
            if self.backend.rereplicate(step, block, self.plan.key(step, block), locations):
                self._copying[(step, block)] = False

    def _blame(self, step: int, node: str) -> None:
        """Exclude a node from a stage after BLACKLIST_FAILURES failures there within
        BLACKLIST_WINDOW_S (a bad disk, a broken driver, a poisoned cache)."""
        if self._strikes.hit((step, node), self.clock()) and node not in self.views[step].excluded_nodes:
            if self.backend.exclude(step, node):
                self.views[step].excluded_nodes.append(node)

    def _event(self, d: Dispatch, outcome: Outcome) -> Completed | Failed | None:
        """The state-machine event for an outcome; None when another copy still counts."""
        view = self.views[d.step]
        view.busy_s += outcome.seconds
        key = (d.step, d.block)
        run = self._running.get(key)
        if run is None:
            return None  # a copy the driver stopped caring about (cancelled, or lost a race)
        if not outcome.ok and run.copies > 1:
            run.copies -= 1  # one copy failed; the other one decides
            return None
        del self._running[key]
        if run.copies > 1:
            self.backend.cancel(d, None)  # first finisher wins; writes are idempotent by key
        self._crashed.discard(key)
        if not outcome.ok:
            if outcome.crashed:
                self._crashed.add(key)
            if outcome.node:
                self._blame(d.step, outcome.node)
            self._emit("block_failed", stage=view.name, block=d.block, attempt=d.attempt, node=outcome.node or None,
                       error=outcome.error, retryable=outcome.retryable)
            return Failed(d.step, d.block, outcome.error, outcome.retryable, outcome.lost_input)
        if outcome.seconds:
            self._durations[d.step].append(outcome.seconds)
        meta = outcome.meta
        view.rows_out += meta.rows
        self.telemetry.block(d.step, outcome, d.block)
        j = self.journal
        if outcome.rejected:
            view.dead_letter_rows += outcome.rejected
            if j is not None:
                j.record_rejected(self.plan.stages[d.step].name, d.block, outcome.rejected)
        if d.step == len(self.plan.stages):
            self.parts[d.block] = meta
            if j is not None:
                j.record_part(d.block, meta)
        else:
            self._locations[(d.step, d.block)] = meta.locations
            self._top_up(d.step, d.block, meta.locations)
            if j is not None:
                j.record_block(self.plan.stages[d.step].name, d.block, meta.rows, meta.nbytes, meta.checksum,
                               meta.locations)
        if d.step > 0 and not self.plan.stages[d.step - 1].config.checkpoint:
            self._garbage.append(self.plan.key(d.step - 1, d.block))  # its only reader is done
            if (d.step - 1, d.block) in self._copying:
                self._copying[(d.step - 1, d.block)] = True
            self.telemetry.consumed(d.step - 1, d.block)
            if j is not None:
                j.forget_block(self.plan.stages[d.step - 1].name, d.block)
        self._emit("block_committed", stage=view.name, block=d.block, attempt=d.attempt, node=outcome.node or None)
        return Completed(d.step, d.block)

    def _emit(self, kind: EventKind, **fields: object) -> None:
        if self.on_event is not None:
            self.on_event(Event(kind, round(self.clock() - self._started, 3), **fields))  # type: ignore[arg-type]

    def _rejected_rows(self) -> list[int]:
        """Per step, the rows set aside by ``skip_rows``, earlier runs' reused blocks included."""
        if self.journal is None:
            return [v.dead_letter_rows for v in self.views]
        j = self.journal
        return [sum(j.rejected(s.name, s.fingerprint).values()) for s in self.plan.stages] + [0]

    def _collect_garbage(self, now: bool = False, wait: bool = False) -> None:
        """Delete consumed intermediate blocks in batches, off the driver's loop.

        With a journal, only right after a flush (``now``): a block is deleted only once
        the journal durably says its successor is committed, so a crash never leaves a
        block whose input is gone and whose output is not journaled.
        """
        ready = now if self.journal is not None else now or len(self._garbage) >= DELETE_BATCH
        if (self._garbage and ready) or wait:
            self.backend.delete(self._garbage if ready else [], wait=wait)
            self._garbage = [] if ready else self._garbage

    def _sync_views(self, state: PipelineState) -> None:
        now = self.clock()
        for step, (view, c) in enumerate(zip(self.views, state.counters)):
            view.done, view.inflight, view.queued = c.done, c.inflight, c.queued
            view.reexecutions = c.reexecutions
            if step < len(self.plan.stages):
                view.retired_actors, view.spares_used = self.backend.actor_counts(step)
            if view.done >= view.total and view.finished is None:
                view.finished = now

    def _report(self, elapsed: float, error: BaseException | None) -> dict[str, Any]:
        stages = []
        for i, v in enumerate(self.views):
            entry: dict[str, Any] = {
                "name": v.name, "kind": v.kind, "blocks": v.total, "blocks_done": v.done,
                "executions": v.executions, "retries": v.retries, "reused": v.reused,
                "reexecutions": v.reexecutions, "dead_letters": v.dead_letters,
                "dead_letter_rows": v.dead_letter_rows, "timeouts": v.timeouts,
                "speculated": v.speculated, "excluded_nodes": v.excluded_nodes,
                "retired_actors": v.retired_actors, "spares_used": v.spares_used, "rereplicated": v.rereplicated,
                "rows_out": v.rows_out, "busy_s": round(v.busy_s, 3),
            }
            if i < len(self.plan.stages):
                entry["fingerprint"] = self.plan.stages[i].fingerprint
                entry["fused"] = [s.name for s in self.plan.stages[i].fused]
            stages.append(entry)
        return {
            "pipeline": self.plan.manifest.name,
            "status": "failed" if error else "succeeded",
            "error": str(error) if error else None,
            "elapsed_s": round(elapsed, 3),
            "blocks": len(self.plan.blocks),
            "rows_in": self.plan.total_rows,
            "rows_out": sum(p.rows for p in (self.journal.parts if self.journal else self.parts).values()),
            "nodes_lost": self.nodes_lost,
            "servers_restarted": self.servers_restarted,
            "durable_catch_up": self.durable_catch_up,
            "stages": stages,
            "telemetry": self.telemetry.finish(self.views),
        }


def _kind(stage: StagePlan) -> str:
    cfg = stage.config
    kind = ("task" if cfg.cls is None else "actor") if isinstance(cfg, PythonStage) else f"triton:{cfg.model}"
    return f"{kind} (+{len(stage.fused)} fused)" if stage.fused else kind
