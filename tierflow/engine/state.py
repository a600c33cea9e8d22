"""The scheduler's decisions as an I/O-free state machine.

A run is ``n_blocks`` blocks moving through ``n_steps`` steps (the user's stages, then the
sink). The executor feeds past-tense events in (``Completed``, ``Failed``) and gets
imperative actions back (``Dispatch``); nothing here touches Ray, the cache or a clock, so
every decision is unit-tested without a cluster.

Policy:
- A block enters the pipeline only while fewer than ``window`` blocks are open (admitted,
  not yet through the sink): this bounds cache and memory use however long the source is.
- Each step has at most ``limits[s]`` dispatches in flight (its tasks or pool actors).
- Downstream steps are served first, so finished work drains before new work enters.
- A retryable failure goes back to the front of its step's queue, up to ``max_attempts``;
  any other failure is fatal: nothing new is dispatched and the run ends with that error.
- A block that fails for good at a step with ``skip`` set leaves the pipeline as a
  ``DeadLetter`` instead of failing the run.
- A step whose input block was lost (no copy left anywhere) sends the block back to the
  step before, which recomputes it (a re-execution, counted; ``max_attempts`` per block).

Every event costs O(1) amortised: no decision scans the blocks or the steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run step ``step`` on block ``block`` (``attempt`` counts from 1)."""

    step: int
    block: int
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Set block ``block`` aside with its error: it failed for good at ``step`` and the
    step says ``on_error: skip``. The block leaves the pipeline."""

    step: int
    block: int
    error: str


Action = Dispatch | DeadLetter


@dataclass(frozen=True, slots=True)
class Completed:
    step: int
    block: int
    meta: Any = None


@dataclass(frozen=True, slots=True)
class Failed:
    """``lost_input``: every copy of the block's input was gone; the step before is re-run."""

    step: int
    block: int
    error: str
    retryable: bool = False
    lost_input: bool = False


@dataclass(slots=True)
class StepCounters:
    done: int = 0
    inflight: int = 0
    queued: int = 0
    executions: int = 0
    retries: int = 0
    reexecutions: int = 0  # committed blocks run again because every copy was lost
    dead_letters: int = 0


@dataclass(frozen=True, slots=True)
class Fatal:
    step: int
    block: int
    error: str


@dataclass
class PipelineState:
    """Block-by-step progress of one run.

    Args:
        n_blocks: blocks in the plan.
        limits: per step, the most dispatches in flight.
        window: the most blocks open at once.
        max_attempts: tries per (step, block) for retryable failures (one for all steps,
            or one per step).
        skip: per step, whether a block failing for good there becomes a dead letter.
        start_step: per block, the first step still to run (0 = all; ``len(limits)`` =
            nothing left). Resume passes what the journal says is committed.
    """

    n_blocks: int
    limits: Sequence[int]
    window: int
    max_attempts: int | Sequence[int] = 3
    start_step: Sequence[int] | None = None
    skip: Sequence[bool] | None = None
    counters: list[StepCounters] = field(init=False)
    fatal: Fatal | None = field(init=False, default=None)
    _ready: list[deque[tuple[int, int]]] = field(init=False)
    _next_block: int = field(init=False, default=0)
    _open: int = field(init=False, default=0)
    _finished: int = field(init=False, default=0)
    _attempts: dict[tuple[int, int], int] = field(init=False, default_factory=dict)
    _recovered: dict[int, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.window < 1 or any(limit < 1 for limit in self.limits):
            raise ValueError("window and every step limit must be >= 1")
        if self.start_step is not None and len(self.start_step) != self.n_blocks:
            raise ValueError("start_step needs one entry per block")
        self.counters = [StepCounters() for _ in self.limits]
        self._ready = [deque() for _ in self.limits]
        n = len(self.limits)
        self._max = [self.max_attempts] * n if isinstance(self.max_attempts, int) else list(self.max_attempts)
        self._skip = list(self.skip) if self.skip is not None else [False] * n

    @property
    def n_steps(self) -> int:
        return len(self.limits)

    @property
    def finished(self) -> bool:
        """True when every block is through the sink, or a fatal error drained."""
        if self.fatal is not None:
            return all(c.inflight == 0 for c in self.counters)
        return self._finished == self.n_blocks

    @property
    def blocks_done(self) -> int:
        return self._finished

    def start(self) -> list[Action]:
        """The first dispatches of the run."""
        return self._fill()

    def handle(self, event: Completed | Failed) -> list[Action]:
        """Apply one event; return what to dispatch now."""
        c = self.counters[event.step]
        c.inflight -= 1
        if isinstance(event, Completed):
            c.done += 1
            return self._advance(event.step, event.block)
        attempt = self._attempts.pop((event.step, event.block), 1)
        if event.lost_input and event.step > 0 and self.fatal is None:
            redone = self._recovered.get(event.block, 0) + 1
            if redone <= self._max[event.step - 1]:
                self._recovered[event.block] = redone
                prev = self.counters[event.step - 1]
                prev.reexecutions += 1
                prev.queued += 1
                self._ready[event.step - 1].appendleft((event.block, 1))
                return self._fill(event.step, event.step - 1)
        if event.retryable and attempt < self._max[event.step] and self.fatal is None:
            c.retries += 1
            self._ready[event.step].appendleft((event.block, attempt + 1))
            c.queued += 1
            return self._fill(event.step)
        if self._skip[event.step] and self.fatal is None:
            c.dead_letters += 1
            self._open -= 1
            self._finished += 1
            return [DeadLetter(event.step, event.block, event.error), *self._fill(event.step)]
        if self.fatal is None:
            self.fatal = Fatal(event.step, event.block, event.error)
        return []

    # -- internals -------------------------------------------------------------------------

    def _advance(self, step: int, block: int) -> list[Action]:
        if step + 1 < self.n_steps:
            self._enqueue(step + 1, block)
            return self._fill(step + 1, step)
        self._open -= 1
        self._finished += 1
        return self._fill(step)

    def _enqueue(self, step: int, block: int) -> None:
        self._ready[step].append((block, 1))
        self.counters[step].queued += 1

    def _admit(self) -> int | None:
        """Open the next block at its first unfinished step; None when none can open."""
        while self._next_block < self.n_blocks and self._open < self.window:
            block = self._next_block
            self._next_block += 1
            first = self.start_step[block] if self.start_step is not None else 0
            if first >= self.n_steps:
                self._finished += 1  # already through the sink in an earlier run
                continue
            self._open += 1
            self._enqueue(first, block)
            return first
        return None

    def _fill(self, *steps: int) -> list[Action]:
        """Dispatch from ``steps`` (downstream first), then admit blocks while the window
        allows.

        One event can only free a slot at its own step and add work to the next one, so
        only those are looked at: every other step already has no work or no free slot.
        """
        out: list[Action] = []
        if self.fatal is not None:
            return out
        for step in steps:
            self._drain(step, out)
        while (first := self._admit()) is not None:
            self._drain(first, out)
        return out

    def _drain(self, step: int, out: list[Action]) -> None:
        c, ready, limit = self.counters[step], self._ready[step], self.limits[step]
        while ready and c.inflight < limit:
            block, attempt = ready.popleft()
            c.queued -= 1
            c.inflight += 1
            c.executions += 1
            if attempt > 1:
                self._attempts[(step, block)] = attempt
            out.append(Dispatch(step, block, attempt))
