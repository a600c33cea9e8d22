"""The driver's judgement calls, as pure code: when to retry, when a block is overdue or
slow enough for a second copy, when a node has failed a stage often enough to be left out.

Nothing here reads a clock, draws a random number or calls Ray: the time and the draws
come in as arguments, the decisions go out as values, and the executor carries them out.
So every rule is tested with plain numbers (``tests/engine/test_policy.py``), next to the
state machine (``engine/state.py``) that decides what runs next.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tierflow.retry import RetryPolicy

__all__ = ["RETRY", "Cancel", "Speculate", "Strikes", "Watched", "watch"]

# A failed step waits before its next attempt (outages of Triton or a store need time):
# 1 s before the 2nd, doubling, capped at 15 s, shortened by up to half at random.
RETRY = RetryPolicy(base_delay_s=1.0, max_delay_s=15.0, jitter=0.5)
SPECULATE_MIN_SAMPLES = 8  # finished blocks of a stage before its median means anything
SPECULATE_MIN_S = 1.0  # never speculate on blocks that take less than this x the factor


@dataclass
class Strikes:
    """Failures per key within a sliding window: :meth:`hit` says when one makes ``limit``.

    >>> s = Strikes(limit=3, window_s=10.0)
    >>> [s.hit("n1", t) for t in (0.0, 1.0, 20.0, 21.0, 22.0)]
    [False, False, False, False, True]
    """

    limit: int
    window_s: float
    _times: dict[Hashable, deque[float]] = field(default_factory=lambda: defaultdict(deque), repr=False)

    def hit(self, key: Hashable, now: float) -> bool:
        times = self._times[key]
        times.append(now)
        while times and now - times[0] > self.window_s:
            times.popleft()
        return len(times) >= self.limit

    def forget(self, key: Hashable) -> None:
        self._times.pop(key, None)


@dataclass(frozen=True, slots=True)
class Watched:
    """A dispatch in flight as :func:`watch` sees it."""

    key: tuple[int, int]  # (step, block)
    elapsed_s: float
    copies: int
    timeout_s: float | None  # the stage's block_timeout_s
    speculate_after: float | None  # the stage's factor over its median
    queued: int  # blocks of the stage waiting for a slot
    can_add: bool  # whether the backend has room for one more copy of the stage


@dataclass(frozen=True, slots=True)
class Cancel:
    key: tuple[int, int]
    reason: str


@dataclass(frozen=True, slots=True)
class Speculate:
    key: tuple[int, int]


def watch(running: Iterable[Watched], durations: Mapping[int, Sequence[float]]) -> list[Cancel | Speculate]:
    """Cancel attempts past their stage's timeout; start a second copy of a block slower
    than ``speculate_after`` x its stage's median (``durations``: recent block times per
    step; the first copy to finish wins) when no block of that stage waits for a slot: on
    a busy machine every block looks slow, and a copy would take the CPU the queue needs.
    """
    out: list[Cancel | Speculate] = []
    for w in running:
        if w.timeout_s is not None and w.elapsed_s > w.timeout_s:
            out.append(Cancel(w.key, f"timed out after {w.timeout_s} s (block_timeout_s)"))
            continue
        past = durations.get(w.key[0], ())
        if (
            w.speculate_after is not None and w.copies == 1 and len(past) >= SPECULATE_MIN_SAMPLES
            and w.elapsed_s > w.speculate_after * max(statistics.median(past), SPECULATE_MIN_S)
            and w.queued == 0 and w.can_add
        ):
            out.append(Speculate(w.key))
    return out
