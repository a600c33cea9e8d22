"""Where dispatched steps run: the ``Backend`` seam between the driver loop and Ray.

The executor speaks only this protocol, so its loop (state machine, journal, progress,
garbage collection) runs unchanged against ``RayBackend`` in production and against an
in-process fake (``tierflow.testing.InlineBackend``) in scale tests of the driver.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

import ray
from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    RayActorError,
    RayError,
    RayTaskError,
    TaskUnschedulableError,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tierflow.cache.node_server import forget_server, start_cache_servers, started_server, stop_cache_servers
from tierflow.cache.settings import CacheSettings
from tierflow.cache.tiered import lmdb_nodes
from tierflow.engine.runners import (
    Outcome,
    StageActor,
    StepIO,
    dead_letters_target,
    delete_blocks,
    durable_output,
    flush_blocks,
    rereplicate_block,
    run_task,
    sink_task,
    write_dead_letter,
)
from tierflow.engine.state import Dispatch
from tierflow.errors import StageError, TierflowError
from tierflow.io.sink import Sink
from tierflow.manifest import PythonStage
from tierflow.plan import Plan, StagePlan

SINK_CONCURRENCY = 2
SINK_CPUS = 1.0  # a sink task encodes Parquet
ACTOR_START_TIMEOUT_S = 120.0
SERVERS_REFRESH_S = 10.0  # how often to look for nodes that joined and need a cache server
SPARE_REFILL_S = 10.0  # a spare that took over is replaced this long after (not mid-recovery)
NODES_REFRESH_S = 1.0  # how often Ray's node table is read to notice dead nodes
NODE_TABLE_TTL_S = 0.2  # one driver round's decisions share one read of the table
NODE_ID_LABEL = "ray.io/node-id"
RETIRE_AFTER, RETIRE_WINDOW_S = 3, 120.0  # an actor failing this often is replaced


class Backend(Protocol):
    """Runs steps of one plan. Not thread-safe; used by the driver loop only."""

    def start(self, plan: Plan, sink: Sink, settings: CacheSettings, triton_url: str | tuple[str, ...] | None) -> list[int]:
        """Get ready to run (actors started, shared objects published). Returns, per step
        (stages then sink), how many dispatches it can run at once."""
        ...

    def submit(self, d: Dispatch, input_locations: tuple[str, ...] = ()) -> None:
        """Start step ``d.step`` on block ``d.block``, whose input block has copies at
        ``input_locations`` (empty for source blocks). Never blocks."""
        ...

    def wait(self, timeout_s: float) -> list[tuple[Dispatch, Outcome]]:
        """Block until at least one dispatch finished or ``timeout_s`` passed; return every
        finished one. A lost worker or actor is a failed, retryable Outcome."""
        ...

    def delete(self, keys: list[str], wait: bool = False) -> None:
        """Drop cache blocks (asynchronously unless ``wait``)."""
        ...

    def can_add(self, step: int) -> bool:
        """Whether a copy more of ``step`` can start now (a speculative one)."""
        ...

    def cancel(self, d: Dispatch, reason: str | None) -> None:
        """Stop every running copy of ``(d.step, d.block)``; their outcomes never surface.
        With a ``reason`` (a timeout), ``wait`` reports one retryable failure for it."""
        ...

    def dead_letter(self, step: int, block: int, error: str, input_locations: tuple[str, ...]) -> None:
        """Write block ``block``'s input to step ``step`` and ``error`` to the dead letters."""
        ...

    def exclude(self, step: int, node: str) -> bool:
        """Give ``step`` no more work on ``node``; False when it is the last node left."""
        ...

    def flush(self, prefix: str) -> int:
        """Write the durable copies still missing under ``prefix`` on every node; returns
        how many were written. Raises TierUnavailable while the durable store is down."""
        ...

    def lost_nodes(self) -> list[str]:
        """Nodes found dead since the last call (Ray's node table)."""
        ...

    def actor_counts(self, step: int) -> tuple[int, int]:
        """Actors of ``step`` so far: retired for failing too often, and standby spares that
        took over ((0, 0) for task stages)."""
        ...

    def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> None:
        """Start copying a block whose copies are now only at ``locations`` to new nodes."""
        ...

    def new_copies(self) -> list[tuple[int, int, tuple[str, ...]]]:
        """``(step, block, locations added)`` of the re-replications finished since the last call."""
        ...

    def shutdown(self) -> None:
        """Wait for dead letters to be written, then stop every actor."""
        ...


_T = TypeVar("_T")


def pop_answered(calls: dict[Any, _T]) -> tuple[list[tuple[_T, Any]], list[_T]]:
    """Take the Ray calls answered by now out of ``calls`` (call -> what it is for): what
    each one that returned was for, with its result, and what each one that failed with a
    Ray error (its worker, actor or node died) was for."""
    if not calls:
        return [], []
    ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0)
    results, failed = [], []
    for ref in ready:
        what = calls.pop(ref)
        try:
            results.append((what, ray.get(ref)))
        except RayError:
            failed.append(what)
    return results, failed


class ActorPool:
    """The actors of one stage, each taking one block at a time, reused across blocks.

    Scales between ``min_size`` and ``max_size``: a block that finds every actor busy
    starts a new one at once (Ray queues the call until it is constructed), and an actor
    idle for ``idle_s`` is stopped while more than ``min_size`` remain. An actor whose
    blocks fail ``RETIRE_AFTER`` times within ``RETIRE_WINDOW_S`` gets no more work: it is
    stopped and a fresh one takes its place (a poisoned model, a broken device, a leak).
    The actors of a lost node are dropped as soon as the node's death is known, so no block
    is sent to them, and a pool left under ``min_size`` starts their successors at once.

    ``standby`` spares are constructed ahead, away from the nodes of the working actors,
    and get no blocks: a new actor (a successor, or growth under backlog) is a constructed
    spare when there is one, so it takes over in the time of a call instead of a process
    start and the stage's construction. Each spare is also sent one call on the first row
    of a block (:meth:`warm`), so the lazy costs of a first call are paid before it takes
    over, not on the block it takes over. A new spare starts in its place ``SPARE_REFILL_S``
    later (:meth:`refill`), not during the recovery it would compete with for CPU.
    ``place(cpus, avoid)`` picks the node of an actor started mid-run, packed so that a
    task step keeps a slot: a spare's off ``avoid`` (the working actors' nodes) where it
    can, or None when there is no room for it beside the pipeline's own work (after a node
    is lost there may not be: the pool then keeps fewer, and asks again later); a working
    actor's (``avoid`` None) in any case. ``factory(node)`` starts an actor there, or where
    Ray places it when ``node`` is None.
    """

    def __init__(
        self,
        stage: StagePlan,
        factory: Callable[[str | None], Any],
        min_size: int,
        max_size: int,
        idle_s: float = 30.0,
        standby: int = 0,
        place: Callable[[float, Collection[str] | None], str | None] = lambda cpus, avoid: "",
    ) -> None:
        self.stage = stage
        self._factory = factory
        self._place = place
        self.cpus = stage.config.num_cpus if stage is not None else 0.0
        self.max_size = max_size
        self.min_size = min_size
        self.idle_s = idle_s
        self.standby = standby
        self.actors = [factory(None) for _ in range(min_size)]
        self._idle: deque[tuple[Any, float]] = deque((a, time.monotonic()) for a in self.actors)
        self.started = len(self.actors)
        self.retired = 0
        self.took_over = 0  # spares that became working actors
        self._spares: dict[Any, Any] = {}  # spare -> its ready() call (resolves to its node)
        self._cold: set[Any] = set()  # spares not yet sent a warm-up call
        self._placed: dict[Any, str] = {}  # actor or spare started mid-run -> the node it was sent to
        self._strikes: dict[Any, deque[float]] = {}
        self._where: dict[Any, str] = {}  # actor -> node, once known (constructed, or a block ran)
        self._starting: dict[Any, tuple[Any, float]] = {}  # actor started mid-run -> (ready() call, when)
        self._refill_at = 0.0

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every actor is constructed. Raises naming the stage."""
        refs = [a.ready.remote() for a in self.actors]
        try:
            self._where.update(zip(self.actors, ray.get(refs, timeout=timeout_s)))
            self._add_spares()
        except GetTimeoutError:
            raise self._cannot_start(len(self.actors), timeout_s) from None
        except RayActorError as exc:
            raise StageError(self.stage.name, -1, f"actor failed to start: {exc}") from None

    def check_starting(self, timeout_s: float) -> None:
        """Note where the actors started mid-run (successors, growth) run once constructed.

        Raises:
            TierflowError: The stage has no constructed actor and one has been starting for
                longer than ``timeout_s``, e.g. the nodes lost took the CPUs it needs and
                none joined: a clear failure, not a run that waits for ever. (An actor
                waiting while others of the stage work only slows it.)
        """
        built, dead = self._answered({a: ref for a, (ref, _) in self._starting.items()})
        for actor in [*built, *dead]:  # a dead one's block fails and it is replaced
            del self._starting[actor]
        late = [t0 for _, t0 in self._starting.values() if time.monotonic() - t0 > timeout_s]
        if late and not any(a in self._where for a in self.actors):
            raise self._cannot_start(len(late), timeout_s)

    def _cannot_start(self, count: int, timeout_s: float) -> TierflowError:
        return TierflowError(
            f"stage {self.stage.name!r}: {count} actor(s) needing {self.cpus} CPU each could not "
            f"start within {timeout_s:.0f} s (not enough CPU in the cluster?)"
        )

    @property
    def idle(self) -> int:
        """Blocks that could start now: idle actors plus room to grow."""
        return len(self._idle) + self.max_size - len(self.actors)

    def acquire(self, near: Collection[str] = ()) -> Any:
        """An idle actor for one block, preferring one on a node in ``near`` (where the
        block's input has a copy: the read is then local), else the most recently used
        (which keeps the others idle, to shrink); a new one when none is idle."""
        for i in range(len(self._idle) - 1, -1, -1):
            actor = self._idle[i][0]
            if self._where.get(actor) in near:
                del self._idle[i]
                return actor
        if self._idle:
            return self._idle.pop()[0]
        return self._start()

    def _start(self) -> Any:
        actor = self._take_spare()
        if actor is None:
            node = self._place(self.cpus, None) or ""
            actor = self._factory(node or None)
            self._placed[actor] = node
            self._starting[actor] = (actor.ready.remote(), time.monotonic())
            self.started += 1
        else:
            self._refill_at = time.monotonic() + SPARE_REFILL_S
        self.actors.append(actor)
        return actor

    def refill(self) -> None:
        """Start the spares that took over, once the last takeover is ``SPARE_REFILL_S`` old."""
        if time.monotonic() >= self._refill_at:
            self._add_spares()

    def _add_spares(self) -> None:
        working = {self._where[a] for a in self.actors if a in self._where}
        while len(self._spares) < self.standby:
            node = self._place(self.cpus, working)
            if node is None:
                return
            spare = self._factory(node or None)
            self._spares[spare] = spare.ready.remote()
            self._placed[spare] = node
            self._cold.add(spare)
            self.started += 1

    def warm(self, source: Any, io: Any) -> None:
        """Send the spares not yet warmed one call on the first row of a block being
        dispatched now (its input exists now): ``StageActor.warm``, queued behind their
        construction, output discarded."""
        for spare in self._cold:
            spare.warm.remote(source, io)
        self._cold.clear()

    def _take_spare(self) -> Any | None:
        """A constructed spare, or None (one still starting is left to start: it may have
        no node to run on yet)."""
        built = self._built_spares()
        if not built:
            return None
        del self._spares[built[0]]
        self._cold.discard(built[0])
        self._placed.pop(built[0], None)
        self.took_over += 1
        return built[0]

    def _built_spares(self) -> list[Any]:
        """The spares constructed by now, their nodes noted; dead ones dropped."""
        built, dead = self._answered(self._spares)
        for spare in dead:  # died while waiting (its node was lost)
            self.drop_spare(spare)
        return built

    def _answered(self, calls: dict[Any, Any]) -> tuple[list[Any], list[Any]]:
        """Of ``calls`` (actor -> its ready() call), the actors constructed by now, their
        nodes noted, and those that died starting."""
        built, dead = pop_answered({ref: actor for actor, ref in calls.items()})
        self._where.update(built)
        return [actor for actor, _ in built], dead

    def built_spares(self) -> list[tuple[Any, str]]:
        """(spare, node) of the spares constructed by now."""
        return [(a, self._where[a]) for a in self._built_spares()]

    def drop_spare(self, spare: Any) -> None:
        del self._spares[spare]
        self._cold.discard(spare)
        self._placed.pop(spare, None)
        self._where.pop(spare, None)
        ray.kill(spare, no_restart=True)

    def release(self, actor: Any, node: str, failed: bool = False) -> None:
        """Take an actor back after a block that ran on ``node``; one that failed too often
        is retired instead."""
        if actor not in self.actors:
            return  # dropped meanwhile (its node was lost)
        if node:
            self._where[actor] = node
        now = time.monotonic()
        if failed:
            strikes = self._strikes.setdefault(actor, deque())
            strikes.append(now)
            while now - strikes[0] > RETIRE_WINDOW_S:
                strikes.popleft()
            if len(strikes) >= RETIRE_AFTER:
                self.retired += 1
                self.replace(actor)
                return
        self._idle.append((actor, now))

    def replace(self, actor: Any) -> None:
        """Drop a dead, hung or retired actor. Its successor starts now if the pool fell
        under ``min_size``, else when a block needs it."""
        if actor not in self.actors:
            return  # already dropped
        self._stop(actor)
        self._idle = deque(entry for entry in self._idle if entry[0] is not actor)
        if len(self.actors) < self.min_size:
            self._idle.append((self._start(), time.monotonic()))

    def lose_node(self, node: str) -> None:
        """Drop the actors and spares known to run on a dead node (no block goes there);
        successors come from the spares left."""
        for spare in [a for a in self._built_spares() if self._where[a] == node]:
            self.drop_spare(spare)
        for actor in [a for a, n in self._where.items() if n == node and a in self.actors]:
            self.replace(actor)

    def shrink(self) -> None:
        """Stop actors idle for longer than ``idle_s``, keeping ``min_size``."""
        now = time.monotonic()
        while self._idle and len(self.actors) > self.min_size and now - self._idle[0][1] > self.idle_s:
            self._stop(self._idle.popleft()[0])

    def _stop(self, actor: Any) -> None:
        """Kill a working actor and forget it (the caller takes it out of ``_idle``)."""
        ray.kill(actor, no_restart=True)
        self.actors.remove(actor)
        self._starting.pop(actor, None)
        self._placed.pop(actor, None)
        self._strikes.pop(actor, None)
        self._where.pop(actor, None)

    def idle_actors(self) -> list[tuple[Any, str]]:
        """(actor, node) of the idle working actors whose node is known."""
        return [(a, self._where[a]) for a, _ in self._idle if a in self._where]

    def placements(self) -> list[tuple[str, float]]:
        """(node, CPUs) of each actor and spare: where it runs, else where it was sent;
        "" where neither is known yet. Spares that died meanwhile are dropped first."""
        self._built_spares()
        return [(self._where.get(a) or self._placed.get(a, ""), self.cpus) for a in [*self.actors, *self._spares]]

    def shutdown(self) -> None:
        for a in [*self.actors, *self._spares]:
            ray.kill(a, no_restart=True)


class RayBackend:
    """Function stages as Ray tasks; ``cls`` and Triton stages as actor pools; the sink as
    tasks. Only ``Outcome`` metadata comes back; data moves through the cache by key."""

    def __init__(self) -> None:
        self._pools: dict[int, ActorPool] = {}
        self._served: CacheSettings | None = None  # the settings this backend started servers with
        self._pending: dict[Any, tuple[Dispatch, Any]] = {}
        self._discard: dict[Any, tuple[Dispatch, Any]] = {}  # cancelled copies still finishing
        self._synthetic: list[tuple[Dispatch, Outcome]] = []
        self._deletions: list[Any] = []
        self._letters: list[Any] = []
        self._copies: dict[Any, tuple[int, int]] = {}  # re-replications in flight
        self._excluded: dict[int, set[str]] = {}
        self._lost: list[str] = []
        self._nodes: set[str] = set()  # nodes with a cache server, i.e. alive at the last look
        self._joining: dict[Any, str] = {}  # node() calls of cache servers starting on new nodes
        self._probes: dict[Any, str] = {}  # node() calls checking that running servers live
        self._restart: set[str] = set()  # live nodes whose cache server was found dead
        self._nodes_at = 0.0
        self._table: dict[str, float] = {}  # alive node -> its CPUs, read at _table_at
        self._table_at = -NODE_TABLE_TTL_S

    def start(self, plan: Plan, sink: Sink, settings: CacheSettings, triton_url: str | tuple[str, ...] | None) -> list[int]:
        self._plan, self._sink, self._settings = plan, sink, settings
        self._durable = [durable_output(settings, s.config.checkpoint) for s in plan.stages]
        self._settings_ref = ray.put(settings)
        self._source_ref = ray.put(plan.source)
        self._letters_at = dead_letters_target(plan, sink)
        for s in plan.stages:  # actors start in the background while the cache servers do
            if isinstance(s.config, PythonStage) and s.config.cls is None:
                continue
            self._pools[s.index] = ActorPool(
                s,
                lambda node, s=s: StageActor.options(**self._options(s.index, node)).remote(  # type: ignore[attr-defined]
                    s.chain, triton_url, settings
                ),
                *s.config.concurrency_range,
                standby=s.config.standby,
                place=lambda cpus, avoid, s=s: self._place(s.index, cpus, avoid),
            )
        tasks = [s.config.num_cpus for s in plan.stages if s.index not in self._pools]
        self._task_cpus = max([SINK_CPUS, *tasks])  # what one task step needs, kept free of spares
        self._servers_at = time.monotonic()
        self._served = settings
        self._nodes = set(start_cache_servers(settings))  # peer replicas go through these
        for pool in self._pools.values():
            pool.wait_ready(ACTOR_START_TIMEOUT_S)
        return stage_limits(plan)

    def _io(self, step: int, block: int, input_locations: tuple[str, ...]) -> StepIO:
        plan, n = self._plan, len(self._plan.stages)
        if step == n:
            return StepIO(plan.key(n - 1, block), "", input_locations)
        cfg = plan.stages[step].config
        inp = plan.blocks[block] if step == 0 else plan.key(step - 1, block)
        rejects = None
        if cfg.on_error == "skip_rows":
            url, options = self._letters_at
            rejects = (f"{url.rstrip('/')}/{cfg.name}/block-{block:06d}", options)
        return StepIO(inp, plan.key(step, block), input_locations, self._durable[step], cfg.retry_on, rejects)

    def submit(self, d: Dispatch, input_locations: tuple[str, ...] = ()) -> None:
        plan, n = self._plan, len(self._plan.stages)
        actor = None
        io = self._io(d.step, d.block, input_locations)
        if d.step == n:
            ref = sink_task.options(num_cpus=SINK_CPUS, **self._near(d.step, input_locations)).remote(
                self._sink, io, d.block, self._settings_ref
            )
        else:
            src = self._source_ref if d.step == 0 else None
            if d.step in self._pools:
                pool = self._pools[d.step]
                actor = pool.acquire(lmdb_nodes(input_locations))
                ref = actor.run.remote(src, io)
                pool.warm(src, io)
            else:
                chain = plan.stages[d.step].chain
                opts = {**self._options(d.step), **self._near(d.step, input_locations)}
                ref = run_task.options(**opts).remote(chain, src, io, self._settings_ref)
        self._pending[ref] = (d, actor)

    def _alive(self, fresh: bool = False) -> dict[str, float]:
        """The alive nodes and their CPUs, from Ray's node table (read at most every
        ``NODE_TABLE_TTL_S``, unless ``fresh``)."""
        now = time.monotonic()
        if fresh or now - self._table_at >= NODE_TABLE_TTL_S:
            nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
            self._table = {str(n["NodeID"]): float(n["Resources"].get("CPU", 0.0)) for n in nodes if n.get("Alive")}
            self._table_at = now
        return self._table

    def _free_cpus(self) -> dict[str, float]:
        """Per alive node, its CPUs not held by an actor or spare of this run. Actors whose
        node is not known yet count against the freest node (the worst case for tasks)."""
        free = dict(self._alive())
        unplaced = 0.0
        for pool in self._pools.values():
            for node, held in pool.placements():
                if node in free:
                    free[node] -= held
                else:
                    unplaced += held
        if unplaced and free:
            free[max(free, key=free.__getitem__)] -= unplaced
        return free

    def _place(self, step: int, cpus: float, avoid: Collection[str] | None) -> str | None:
        """The node for a new actor of ``cpus`` CPUs: the fullest node that fits it (off
        ``avoid`` while another node can take it, never one excluded from the stage) such
        that some node keeps a free slot for a task step. Actors spread over half-free
        nodes would stop the task steps and the sink for good (a node's free CPUs count,
        not the cluster's: two half-free nodes make no slot).

        ``avoid`` None is a working actor (a successor, growth), which starts in any case:
        the fullest node that fits it when none keeps a slot, Ray's choice ("") when none
        fits. For a spare, None: no room for it.
        """
        free = self._free_cpus()
        fits = [n for n in free if free[n] >= cpus and n not in self._excluded.get(step, ())]
        fits.sort(key=free.__getitem__)
        for node in [n for n in fits if n not in (avoid or ())] or fits:
            if max(free[n] - (cpus if n == node else 0.0) for n in free) >= self._task_cpus:
                return node
        if avoid is not None:
            return None
        return fits[0] if fits else ""

    def _keep_task_slot(self) -> None:
        """While no node has a task slot free of actors (a lost node can leave the
        survivors full, or their actors spread over half-free nodes): stop spares first
        (a spare must never stop the work it stands by for), then move idle working actors
        off a node they would free, their successors packed onto the fullest node that
        fits (:meth:`_place`). Without a slot the task steps and the sink wait for ever."""
        free = self._free_cpus()
        if max(free.values(), default=0.0) >= self._task_cpus:
            return
        for pool in self._pools.values():
            for spare, node in sorted(pool.built_spares(), key=lambda sn: -free.get(sn[1], 0.0)):
                pool.drop_spare(spare)
                free[node] = free.get(node, 0.0) + pool.cpus
                if max(free.values()) >= self._task_cpus:
                    return
        for pool in self._pools.values():
            for actor, node in pool.idle_actors():
                others = [n for n in free if n != node and free[n] >= pool.cpus]
                if node in free and free[node] + pool.cpus >= self._task_cpus and others:
                    pool.replace(actor)  # its successor (if the pool needs one) goes elsewhere
                    return  # placements changed: look again next round

    def _options(self, step: int, node: str | None = None) -> dict[str, Any]:
        """Resources, and where: on ``node`` (chosen by :meth:`_place`), else off the nodes
        excluded from the stage."""
        opts: dict[str, Any] = {"num_cpus": self._plan.stages[step].config.num_cpus}
        if node:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        elif self._excluded.get(step):
            opts["label_selector"] = {NODE_ID_LABEL: f"!in({', '.join(sorted(self._excluded[step]))})"}
        return opts

    def _near(self, step: int, input_locations: tuple[str, ...]) -> dict[str, Any]:
        """Run a task where its input block has a copy when that node has a free slot (the
        read is then local), anywhere else at once when it has not."""
        node = next(iter(lmdb_nodes(input_locations)), None)
        if node is None or node not in self._nodes or self._excluded.get(step):
            return {}
        # A private flag (Ray Serve uses it the same way): spill rather than wait for the node.
        near = NodeAffinitySchedulingStrategy(node, soft=True, _spill_on_unavailable=True)
        return {"scheduling_strategy": near}

    def exclude(self, step: int, node: str) -> bool:
        excluded = self._excluded.setdefault(step, set())
        if not set(self._alive()) - excluded - {node} - {ray.get_runtime_context().get_node_id()}:
            return False  # never leave a stage without a node to run on
        excluded.add(node)
        return True

    def flush(self, prefix: str) -> int:
        refs = [
            flush_blocks.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(prefix, self._settings_ref)
            for node in self._alive(fresh=True)
        ]
        total = 0
        for ref in refs:
            try:
                total += ray.get(ref)
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, TierflowError) else None
                if cause is not None:
                    raise cause from None
                raise
            except (TaskUnschedulableError, NodeDiedError):
                continue  # the node went since the table was read: what it held is lost with it
        return total

    def lost_nodes(self) -> list[str]:
        if time.monotonic() - self._nodes_at > NODES_REFRESH_S:
            self._nodes_at = time.monotonic()
            gone = self._nodes - set(self._alive())
            self._nodes -= gone
            self._lost.extend(sorted(gone))
            for node in gone:
                for pool in self._pools.values():
                    pool.lose_node(node)
            if gone:
                self._keep_task_slot()
        lost, self._lost = self._lost, []
        return lost

    def actor_counts(self, step: int) -> tuple[int, int]:
        pool = self._pools.get(step)
        return (pool.retired, pool.took_over) if pool is not None else (0, 0)

    def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> None:
        holders = lmdb_nodes(locations)
        if not holders or not self._nodes - set(holders):
            return  # only the durable copy is left (it needs no help), or no other node to copy to
        holder = holders[0]
        on_holder = NodeAffinitySchedulingStrategy(holder, soft=False)
        ref = rereplicate_block.options(num_cpus=0, scheduling_strategy=on_holder).remote(
            key, locations, self._settings_ref
        )
        self._copies[ref] = (step, block)

    def new_copies(self) -> list[tuple[int, int, tuple[str, ...]]]:
        # A failed copy's holder died too: the block is read from what is left.
        copied, _ = pop_answered(self._copies)
        return [(step, block, tuple(locations)) for (step, block), locations in copied if locations]

    def wait(self, timeout_s: float) -> list[tuple[Dispatch, Outcome]]:
        if time.monotonic() - self._servers_at > SERVERS_REFRESH_S:
            self._servers_at = time.monotonic()
            self._check_servers()
            self._serve_joined()
            for pool in self._pools.values():
                pool.check_starting(ACTOR_START_TIMEOUT_S)
                pool.shrink()
                pool.refill()
            self._keep_task_slot()
        served, _ = pop_answered(self._joining)  # a failed one's node went again
        self._nodes.update(node for node, _ in served)
        done, self._synthetic = self._synthetic, []
        if not self._pending and not self._discard:
            if not done:
                time.sleep(timeout_s)  # nothing runs (retries waiting out their backoff)
            return done
        refs = [*self._pending, *self._discard]
        ready, _ = ray.wait(refs, num_returns=1, timeout=0 if done else timeout_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            finished = self._finish(ref)
            if finished is not None:
                done.append(finished)
        return done

    def _check_servers(self) -> None:
        """Probe each node's cache server (the answers are read one round later); a server
        found dead on a live node is started again by :meth:`_serve_joined`, so the node's
        copies are served again. Ray 2.60 crashed one in a recovery run (a core-worker
        check in the actor argument-fetch path, cf. ray-project/ray#63079) while the owner
        of a call's argument, a block from another node, had just died with its node."""
        _, dead = pop_answered(self._probes)
        if dead:
            alive = self._alive(fresh=True)
            for node in dead:
                if node in alive:  # a lost node's is left for lost_nodes() to report
                    self._restart.add(node)  # still in _nodes, so its loss would be seen
                    forget_server(node, self._settings)
        probed = set(self._probes.values())
        for node in self._nodes - probed - self._restart:
            server = started_server(node, self._settings)
            if server is not None:
                self._probes[server.node.remote()] = node

    def _serve_joined(self) -> None:
        """Start a cache server on each node that joined (or whose server died), without
        waiting for it: on a new node that means a worker process first, seconds in which
        no block would move."""
        joining = set(self._joining.values())
        alive = self._alive()
        joined = [n for n in sorted(alive) if (n not in self._nodes or n in self._restart) and n not in joining]
        self._restart &= set(alive)  # a node lost meanwhile: lost_nodes() reports it
        for node, server in start_cache_servers(self._settings, joined, wait=False).items():
            self._restart.discard(node)
            self._joining[server.node.remote()] = node

    def _finish(self, ref: Any) -> tuple[Dispatch, Outcome] | None:
        discarded = ref in self._discard
        d, actor = self._discard.pop(ref) if discarded else self._pending.pop(ref)
        try:
            outcome: Outcome = ray.get(ref)
        except RayError as exc:  # the worker, actor or node died: the system's fault, retry
            if actor is not None:
                self._pools[d.step].replace(actor)
            outcome = Outcome(False, error=f"{type(exc).__name__}: {exc}", retryable=True, crashed=True)
        else:
            if actor is not None:
                self._pools[d.step].release(actor, outcome.node, failed=not outcome.ok)
        return None if discarded else (d, outcome)

    def can_add(self, step: int) -> bool:
        pool = self._pools.get(step)
        return pool is None or pool.idle > 0

    def cancel(self, d: Dispatch, reason: str | None) -> None:
        for ref, (pd, actor) in list(self._pending.items()):
            if (pd.step, pd.block) != (d.step, d.block):
                continue
            del self._pending[ref]
            if actor is None:
                ray.cancel(ref, force=True)
                self._discard[ref] = (pd, None)
            elif reason is not None:  # a hung actor: replace it, its call will fail
                self._discard[ref] = (pd, None)
                self._pools[pd.step].replace(actor)
            else:  # a speculative loser on an actor: let it finish, keep the actor
                self._discard[ref] = (pd, actor)
        if reason is not None:
            self._synthetic.append((d, Outcome(False, error=reason, retryable=True)))

    def dead_letter(self, step: int, block: int, error: str, input_locations: tuple[str, ...]) -> None:
        io = self._io(step, block, input_locations)
        name = self._plan.stages[step].name if step < len(self._plan.stages) else "sink"
        self._letters.append(
            write_dead_letter.remote(self._letters_at, name, block, io, self._source_ref, error, self._settings_ref)
        )

    def delete(self, keys: list[str], wait: bool = False) -> None:
        if self._deletions:  # forget finished batches
            _, self._deletions = ray.wait(self._deletions, num_returns=len(self._deletions), timeout=0)
        if keys:
            self._deletions.append(delete_blocks.remote(keys, self._settings_ref))
        if wait and self._deletions:
            ray.get(self._deletions)
            self._deletions = []

    def shutdown(self) -> None:
        if self._letters:
            ray.get(self._letters)
            self._letters = []
        for pool in self._pools.values():
            pool.shutdown()
        self._pools.clear()
        if self._served is not None:  # the servers carry this run's settings: they end with it
            stop_cache_servers(self._served)
            self._served = None


def stage_limits(plan: Plan) -> list[int]:
    """Per step, dispatches at once: each stage's concurrency, then the sink's."""
    return [*(s.config.concurrency_range[1] for s in plan.stages), SINK_CONCURRENCY]
