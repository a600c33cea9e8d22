"""The driver's judgement calls with plain numbers: no Ray, no clock, no sleeps."""

from __future__ import annotations

import doctest

import tierflow.engine.placement
import tierflow.engine.policy
import tierflow.retry
from tierflow.engine.policy import RETRY, SPECULATE_MIN_SAMPLES, Cancel, Speculate, Strikes, Watched, watch


def test_doctests() -> None:
    for module in (tierflow.engine.policy, tierflow.engine.placement, tierflow.retry):
        assert doctest.testmod(module).failed == 0


def test_retry_backoff_doubles_is_capped_and_jittered_down_by_at_most_half() -> None:
    assert [RETRY.delay_s(k, 0.0) for k in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 15.0]
    assert RETRY.delay_s(1, 0.999) >= 0.5 and RETRY.delay_s(9, 0.5) == 15.0 * 0.75


def test_strikes_count_within_the_window_per_key() -> None:
    s = Strikes(limit=3, window_s=120.0)
    assert not s.hit(("s", "n1"), 0.0) and not s.hit(("s", "n2"), 1.0) and not s.hit(("s", "n1"), 2.0)
    assert s.hit(("s", "n1"), 3.0)  # the third on n1 within 120 s
    s.forget(("s", "n1"))
    assert not s.hit(("s", "n1"), 4.0)
    assert not s.hit(("s", "n2"), 200.0)  # n2's first failure has left the window


def w(elapsed: float, **kw: object) -> Watched:
    base: dict[str, object] = {"key": (0, 7), "elapsed_s": elapsed, "copies": 1, "timeout_s": None,
                               "speculate_after": None, "queued": 0, "can_add": True}
    return Watched(**{**base, **kw})  # type: ignore[arg-type]


def test_an_attempt_past_its_timeout_is_cancelled_naming_the_setting() -> None:
    assert watch([w(9.9, timeout_s=10.0)], {}) == []
    assert watch([w(10.1, timeout_s=10.0)], {}) == [Cancel((0, 7), "timed out after 10.0 s (block_timeout_s)")]


def test_a_slow_block_gets_a_second_copy_only_with_samples_room_and_no_queue() -> None:
    fast = {0: [2.0] * SPECULATE_MIN_SAMPLES}
    assert watch([w(6.1, speculate_after=3.0)], fast) == [Speculate((0, 7))]  # > 3 x median 2 s
    assert watch([w(5.9, speculate_after=3.0)], fast) == []
    assert watch([w(6.1, speculate_after=3.0)], {0: [2.0] * (SPECULATE_MIN_SAMPLES - 1)}) == []  # no median yet
    assert watch([w(6.1, speculate_after=3.0, queued=1)], fast) == []  # a queued block needs the slot
    assert watch([w(6.1, speculate_after=3.0, can_add=False)], fast) == []
    assert watch([w(6.1, speculate_after=3.0, copies=2)], fast) == []  # one copy more at most
    tiny = {0: [0.01] * SPECULATE_MIN_SAMPLES}  # short blocks: the median counts as 1 s
    assert watch([w(2.9, speculate_after=3.0)], tiny) == [] and watch([w(3.1, speculate_after=3.0)], tiny)
