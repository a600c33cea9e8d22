"""``RayBackend``: the driver's steps carried out on a Ray cluster.

Function stages run as Ray tasks, ``cls`` and Triton stages as actor pools
(:mod:`tierflow.engine.pool`), the sink as tasks. Only ``Outcome`` metadata comes back;
data moves through the cache by key. Where an actor goes is decided by
:mod:`tierflow.engine.placement`, which nodes live by :mod:`tierflow.engine.nodes`; this
module submits, waits, cancels, flushes and deletes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Collection
from typing import Any

import ray
from ray.exceptions import NodeDiedError, RayError, RayTaskError, TaskUnschedulableError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tierflow.cache.locations import lmdb_nodes
from tierflow.cache.settings import CacheSettings
from tierflow.engine.backend import SINK_CPUS, stage_limits
from tierflow.engine.nodes import NodeWatcher
from tierflow.engine.placement import Resources, free_resources, holds, keep_task_slot, place
from tierflow.engine.pool import ActorPool, pop_answered
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
from tierflow.errors import TierflowError
from tierflow.io.sink import Sink
from tierflow.manifest import PythonStage
from tierflow.plan import Plan, StagePlan

__all__ = ["RayBackend"]

ACTOR_START_TIMEOUT_S = 120.0
SERVERS_REFRESH_S = 10.0  # how often to look for nodes that joined and need a cache server
NODE_ID_LABEL = "ray.io/node-id"


class RayBackend:
    """Function stages as Ray tasks; ``cls`` and Triton stages as actor pools; the sink as
    tasks. Only ``Outcome`` metadata comes back; data moves through the cache by key."""

    def __init__(self, stage_env: dict[str, Any] | None = None) -> None:
        self._stage_env = stage_env  # the runtime_env the stages' code needs, if the job's lacks it
        self._pools: dict[int, ActorPool] = {}
        self._watcher: NodeWatcher | None = None  # this run's nodes and cache servers
        self._pending: dict[Any, tuple[Dispatch, Any]] = {}
        self._discard: dict[Any, tuple[Dispatch, Any]] = {}  # cancelled copies still finishing
        self._synthetic: list[tuple[Dispatch, Outcome]] = []
        self._deletions: list[Any] = []
        self._letters: list[Any] = []
        self._copies: dict[Any, tuple[int, int]] = {}  # re-replications in flight
        self._excluded: dict[int, set[str]] = {}
        self._triton_lost: Any = None  # LostServers of the Triton deployment the stages use, if any

    def start(self, plan: Plan, sink: Sink, settings: CacheSettings, triton_url: str | tuple[str, ...] | None) -> list[int]:
        self._plan, self._sink, self._settings = plan, sink, settings
        self._durable = [durable_output(settings, s.config.checkpoint) for s in plan.stages]
        self._settings_ref = ray.put(settings)
        self._source_ref = ray.put(plan.source)
        self._letters_at = dead_letters_target(plan, sink)
        self._watcher = NodeWatcher(settings)
        self._triton_lost = _lost_servers(triton_url)
        limits = stage_limits(plan, self._watcher.resources(fresh=True))  # GPU stages: what the nodes hold
        for s in plan.stages:  # actors start in the background while the cache servers do
            if isinstance(s.config, PythonStage) and s.config.cls is None:
                continue
            low, high = s.config.concurrency_range
            self._pools[s.index] = ActorPool(
                s,
                functools.partial(self._start_actor, s, triton_url),
                min(low, limits[s.index]),
                min(high, limits[s.index]),
                standby=s.config.standby,
                place=functools.partial(self._place, s.index),
            )
        # What one step of each task stage and the sink needs, kept free of spares.
        self._task_demands: list[Resources] = []
        for demand in [{"CPU": SINK_CPUS}, *(s.config.demand for s in plan.stages if s.index not in self._pools)]:
            if demand not in self._task_demands:
                self._task_demands.append(demand)
        self._servers_at = time.monotonic()
        self._watcher.start()
        for pool in self._pools.values():
            pool.wait_ready(ACTOR_START_TIMEOUT_S)
        return limits

    def _start_actor(self, s: StagePlan, triton_url: str | tuple[str, ...] | None, node: str | None) -> Any:
        return StageActor.options(**self._options(s.index, node)).remote(  # type: ignore[attr-defined]
            s.chain, triton_url, self._settings
        )

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
                ref = run_task.options(**opts).remote(chain, src, io, self._settings_ref)  # type: ignore[arg-type]
        self._pending[ref] = (d, actor)

    @property
    def nodes(self) -> NodeWatcher:
        if self._watcher is None:
            raise RuntimeError("the backend has not started")
        return self._watcher

    def _alive(self, fresh: bool = False) -> dict[str, float]:
        return self.nodes.alive(fresh)

    def _free(self) -> dict[str, dict[str, float]]:
        held = (p for pool in self._pools.values() for p in pool.placements())
        return free_resources(self.nodes.resources(), held)

    def _task_slots(self) -> list[Resources]:
        """The task steps' demands that some alive node can hold at all (the slots worth
        keeping: for one no node has the GPUs for, stopping actors would not help)."""
        nodes = self.nodes.resources().values()
        return [d for d in self._task_demands if any(holds(res, d) for res in nodes)]

    def _place(self, step: int, demand: Resources, avoid: Collection[str] | None) -> str | None:
        return place(self._free(), demand, avoid, self._task_slots(), self._excluded.get(step, ()))

    def _keep_task_slot(self) -> None:
        pools = {i: (p.demand, p.built_spares(), p.idle_actors()) for i, p in self._pools.items()}
        for move in keep_task_slot(self._free(), self._task_slots(), pools):
            pool = self._pools[move.pool]
            if move.drop_spare:
                pool.drop_spare(move.actor)
            else:
                pool.replace(move.actor)  # its successor (if the pool needs one) goes elsewhere

    def _options(self, step: int, node: str | None = None) -> dict[str, Any]:
        """Resources, and where: on ``node`` (chosen by :meth:`_place`), else off the nodes
        excluded from the stage. Ray sets the worker's ``CUDA_VISIBLE_DEVICES`` from
        ``num_gpus`` (fractions share a device)."""
        cfg = self._plan.stages[step].config
        opts: dict[str, Any] = {"num_cpus": cfg.num_cpus}
        if isinstance(cfg, PythonStage) and cfg.num_gpus:
            opts["num_gpus"] = cfg.num_gpus
        if isinstance(cfg, PythonStage) and cfg.resources:
            opts["resources"] = dict(cfg.resources)
        if self._stage_env:
            opts["runtime_env"] = self._stage_env
        if node:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        elif self._excluded.get(step):
            opts["label_selector"] = {NODE_ID_LABEL: f"!in({', '.join(sorted(self._excluded[step]))})"}
        return opts

    def _near(self, step: int, input_locations: tuple[str, ...]) -> dict[str, Any]:
        """Run a task where its input block has a copy when that node has a free slot (the
        read is then local), anywhere else at once when it has not."""
        node = next(iter(lmdb_nodes(input_locations)), None)
        if node is None or node not in self.nodes.nodes or self._excluded.get(step):
            return {}
        # A private flag (Ray Serve uses it the same way): spill rather than wait for the node.
        near = NodeAffinitySchedulingStrategy(node, soft=True, _spill_on_unavailable=True)
        return {"scheduling_strategy": near}

    def exclude(self, step: int, node: str) -> bool:
        excluded = self._excluded.setdefault(step, set())
        stages = self._plan.stages
        demand = stages[step].config.demand if step < len(stages) else {"CPU": SINK_CPUS}
        able = {n for n, res in self.nodes.resources().items() if holds(res, demand)}  # e.g. its GPU nodes
        if not able - excluded - {node} - {ray.get_runtime_context().get_node_id()}:
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
        gone = self.nodes.lost()
        for node in gone:
            for pool in self._pools.values():
                pool.lose_node(node)
        if gone:
            self._keep_task_slot()
        return gone

    def restarted_servers(self) -> list[str]:
        """``cache:<node>`` for each cache server started again since the last call, and
        ``triton:<node>`` for each server of the run's Triton deployment lost since (its
        controller starts a replacement)."""
        restarted = [f"cache:{node}" for node in self.nodes.restarted_servers()]
        if self._triton_lost is not None:
            restarted += [f"triton:{lost['node_id']}" for lost in self._triton_lost.poll()]
        return restarted

    def actor_counts(self, step: int) -> tuple[int, int]:
        pool = self._pools.get(step)
        return (pool.retired, pool.took_over) if pool is not None else (0, 0)

    def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> bool:
        holders = lmdb_nodes(locations)
        if not holders or not self.nodes.nodes - set(holders):
            return False  # only the durable copy is left (it needs no help), or no other node to copy to
        holder = holders[0]
        on_holder = NodeAffinitySchedulingStrategy(holder, soft=False)
        ref = rereplicate_block.options(num_cpus=0, scheduling_strategy=on_holder).remote(
            key, locations, self._settings_ref
        )
        self._copies[ref] = (step, block)
        return True

    def new_copies(self) -> list[tuple[int, int, tuple[str, ...]]]:
        # A failed copy's holder died too: the block is read from what is left.
        copied, failed = pop_answered(self._copies)
        return [(step, block, tuple(locations)) for (step, block), locations in copied] + [
            (step, block, ()) for step, block in failed
        ]

    def wait(self, timeout_s: float) -> list[tuple[Dispatch, Outcome]]:
        if time.monotonic() - self._servers_at > SERVERS_REFRESH_S:
            self._servers_at = time.monotonic()
            self.nodes.check_servers()
            self.nodes.serve_joined()
            for pool in self._pools.values():
                pool.check_starting(ACTOR_START_TIMEOUT_S)
                pool.shrink()
                pool.refill()
            self._keep_task_slot()
        self.nodes.joined()
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
        self._triton_lost = None
        if self._letters:
            ray.get(self._letters)
            self._letters = []
        for pool in self._pools.values():
            pool.shutdown()
        self._pools.clear()
        if self._watcher is not None:  # the servers carry this run's settings: they end with it
            self._watcher.stop()
            self._watcher = None


def _lost_servers(triton_url: str | tuple[str, ...] | None) -> Any:
    """A :class:`~tierflow.triton.deploy.LostServers` when the Triton stages use servers that
    tierflow deployed on the cluster (a ``DeployedEndpoints``: their losses are this run's
    faults), else None. The Triton package is imported only then."""
    deployment = getattr(triton_url, "deployment", None)
    if not isinstance(deployment, str):
        return None
    from tierflow.triton.deploy import LostServers

    return LostServers(deployment)
