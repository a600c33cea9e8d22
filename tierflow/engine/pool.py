"""The actors of one stage: scaling, retirement, standby spares and node loss.

An :class:`ActorPool` hands out an idle actor per block and takes it back; it knows where
each actor runs, so blocks go to an actor near their input and a lost node's actors are
dropped at once. Time comes from an injected clock (tests step it instead of sleeping);
where a new actor goes is the caller's ``place`` (``tierflow.engine.placement``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from tierflow.engine.placement import describe
from tierflow.engine.policy import Strikes
from tierflow.errors import StageError, TierflowError
from tierflow.plan import StagePlan

__all__ = ["RETIRE_AFTER", "RETIRE_WINDOW_S", "SPARE_REFILL_S", "ActorPool", "pop_answered"]

SPARE_REFILL_S = 10.0  # a spare that took over is replaced this long after (not mid-recovery)
RETIRE_AFTER, RETIRE_WINDOW_S = 3, 120.0  # an actor failing this often is replaced


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
    ``place(demand, avoid)`` picks the node of an actor started mid-run, packed so that a
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
        place: Callable[[Mapping[str, float], Collection[str] | None], str | None] = lambda demand, avoid: "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage = stage
        self._clock = clock
        self._factory = factory
        self._place = place
        self.demand: dict[str, float] = stage.config.demand if stage is not None else {}  # what each actor holds
        self.max_size = max_size
        self.min_size = min_size
        self.idle_s = idle_s
        self.standby = standby
        self.actors = [factory(None) for _ in range(min_size)]
        self._idle: deque[tuple[Any, float]] = deque((a, self._clock()) for a in self.actors)
        self.started = len(self.actors)
        self.retired = 0
        self.took_over = 0  # spares that became working actors
        self._spares: dict[Any, Any] = {}  # spare -> its ready() call (resolves to its node)
        self._cold: set[Any] = set()  # spares not yet sent a warm-up call
        self._placed: dict[Any, str] = {}  # actor or spare started mid-run -> the node it was sent to
        self._strikes = Strikes(RETIRE_AFTER, RETIRE_WINDOW_S)
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
        late = [t0 for _, t0 in self._starting.values() if self._clock() - t0 > timeout_s]
        if late and not any(a in self._where for a in self.actors):
            raise self._cannot_start(len(late), timeout_s)

    def _cannot_start(self, count: int, timeout_s: float) -> TierflowError:
        return TierflowError(
            f"stage {self.stage.name!r}: {count} actor(s) needing {describe(self.demand)} each could not "
            f"start within {timeout_s:.0f} s (not enough of it free in the cluster?)"
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
            node = self._place(self.demand, None) or ""
            actor = self._factory(node or None)
            self._placed[actor] = node
            self._starting[actor] = (actor.ready.remote(), self._clock())
            self.started += 1
        else:
            self._refill_at = self._clock() + SPARE_REFILL_S
        self.actors.append(actor)
        return actor

    def refill(self) -> None:
        """Start the spares that took over, once the last takeover is ``SPARE_REFILL_S`` old."""
        if self._clock() >= self._refill_at:
            self._add_spares()

    def _add_spares(self) -> None:
        working = {self._where[a] for a in self.actors if a in self._where}
        while len(self._spares) < self.standby:
            node = self._place(self.demand, working)
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
        now = self._clock()
        if failed and self._strikes.hit(actor, now):
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
            self._idle.append((self._start(), self._clock()))

    def lose_node(self, node: str) -> None:
        """Drop the actors and spares known to run on a dead node (no block goes there);
        successors come from the spares left."""
        for spare in [a for a in self._built_spares() if self._where[a] == node]:
            self.drop_spare(spare)
        for actor in [a for a, n in self._where.items() if n == node and a in self.actors]:
            self.replace(actor)

    def shrink(self) -> None:
        """Stop actors idle for longer than ``idle_s``, keeping ``min_size``."""
        now = self._clock()
        while self._idle and len(self.actors) > self.min_size and now - self._idle[0][1] > self.idle_s:
            self._stop(self._idle.popleft()[0])

    def _stop(self, actor: Any) -> None:
        """Kill a working actor and forget it (the caller takes it out of ``_idle``)."""
        ray.kill(actor, no_restart=True)
        self.actors.remove(actor)
        self._starting.pop(actor, None)
        self._placed.pop(actor, None)
        self._strikes.forget(actor)
        self._where.pop(actor, None)

    def idle_actors(self) -> list[tuple[Any, str]]:
        """(actor, node) of the idle working actors whose node is known."""
        return [(a, self._where[a]) for a, _ in self._idle if a in self._where]

    def placements(self) -> list[tuple[str, dict[str, float]]]:
        """(node, resources held) of each actor and spare: where it runs, else where it was
        sent; "" where neither is known yet. Spares that died meanwhile are dropped first."""
        self._built_spares()
        return [(self._where.get(a) or self._placed.get(a, ""), self.demand) for a in [*self.actors, *self._spares]]

    def shutdown(self) -> None:
        for a in [*self.actors, *self._spares]:
            ray.kill(a, no_restart=True)
