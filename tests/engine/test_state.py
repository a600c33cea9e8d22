"""The scheduler state machine, driven by hand: no Ray, no I/O, no clock."""

from __future__ import annotations

import random

import pytest

from tierflow.engine.state import Completed, Dispatch, Failed, PipelineState


def drive(state: PipelineState, seed: int = 0, fail_rate: float = 0.0, fatal_at: tuple[int, int] | None = None):
    """Complete in-flight dispatches in random order; return every dispatch seen."""
    rng = random.Random(seed)
    inflight = list(state.start())
    seen = list(inflight)
    while inflight:
        d = inflight.pop(rng.randrange(len(inflight)))
        if fatal_at == (d.step, d.block):
            event: Completed | Failed = Failed(d.step, d.block, "boom", retryable=False)
        elif rng.random() < fail_rate and d.attempt < state.max_attempts:
            event = Failed(d.step, d.block, "worker died", retryable=True)
        else:
            event = Completed(d.step, d.block)
        new = state.handle(event)
        for c, limit in zip(state.counters, state.limits):
            assert 0 <= c.inflight <= limit
        assert state._open <= state.window
        inflight += new
        seen += new
    return seen


@pytest.mark.parametrize("seed", range(5))
def test_every_block_passes_every_step_once(seed: int) -> None:
    st = PipelineState(n_blocks=40, limits=[2, 3, 1, 2], window=5)
    seen = drive(st, seed)
    assert st.finished and st.fatal is None and st.blocks_done == 40
    assert sorted((d.step, d.block) for d in seen) == [(s, b) for s in range(4) for b in range(40)]
    assert [c.done for c in st.counters] == [40] * 4


def test_steps_run_in_order_per_block() -> None:
    st = PipelineState(n_blocks=10, limits=[1, 1, 1], window=3)
    seen = drive(st, 3)
    for b in range(10):
        assert [d.step for d in seen if d.block == b] == [0, 1, 2]


def test_retryable_failures_are_retried_then_succeed() -> None:
    st = PipelineState(n_blocks=30, limits=[2, 2], window=4, max_attempts=3)
    seen = drive(st, seed=1, fail_rate=0.3)
    assert st.finished and st.fatal is None
    retries = sum(c.retries for c in st.counters)
    assert retries > 0 and retries == sum(1 for d in seen if d.attempt > 1)


def test_retry_goes_to_the_front_of_the_queue() -> None:
    st = PipelineState(n_blocks=5, limits=[1], window=5)
    assert st.start() == [Dispatch(0, 0)]
    assert st.handle(Failed(0, 0, "lost", retryable=True)) == [Dispatch(0, 0, attempt=2)]


def test_exhausted_retries_are_fatal() -> None:
    st = PipelineState(n_blocks=2, limits=[1], window=1, max_attempts=2)
    st.start()
    assert st.handle(Failed(0, 0, "lost", retryable=True)) == [Dispatch(0, 0, 2)]
    assert st.handle(Failed(0, 0, "lost again", retryable=True)) == []
    assert st.fatal is not None and st.fatal.error == "lost again" and st.finished


def test_user_error_is_fatal_and_stops_dispatching() -> None:
    st = PipelineState(n_blocks=50, limits=[2, 2], window=6)
    seen = drive(st, seed=2, fatal_at=(1, 3))
    assert st.fatal is not None and (st.fatal.step, st.fatal.block) == (1, 3)
    assert st.finished
    assert all(c.inflight == 0 for c in st.counters)
    assert len({d.block for d in seen}) < 50  # admission stopped


def test_window_bounds_open_blocks() -> None:
    st = PipelineState(n_blocks=100, limits=[10, 10], window=3)
    assert len(st.start()) == 3  # only three blocks may open, though step 0 has 10 slots


def test_resume_starts_each_block_at_its_first_unfinished_step() -> None:
    st = PipelineState(n_blocks=4, limits=[4, 4, 4], window=4, start_step=[3, 2, 0, 3])
    first = st.start()
    assert sorted((d.step, d.block) for d in first) == [(0, 2), (2, 1)]
    seen = drive_rest(st, first)
    assert sorted((d.step, d.block) for d in seen) == [(0, 2), (1, 2), (2, 1), (2, 2)]
    assert st.finished and st.blocks_done == 4


def drive_rest(st: PipelineState, inflight: list[Dispatch]) -> list[Dispatch]:
    seen, todo = list(inflight), list(inflight)
    while todo:
        d = todo.pop(0)
        new = st.handle(Completed(d.step, d.block))
        todo += new
        seen += new
    return seen


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        PipelineState(n_blocks=1, limits=[0], window=1)


def test_lost_input_sends_the_block_back_one_step() -> None:
    st = PipelineState(n_blocks=1, limits=[1, 1, 1], window=1)
    assert st.start() == [Dispatch(0, 0)]
    assert st.handle(Completed(0, 0)) == [Dispatch(1, 0)]
    assert st.handle(Completed(1, 0)) == [Dispatch(2, 0)]
    # step 2 finds no copy of step 1's output: step 1 runs again, then step 2
    assert st.handle(Failed(2, 0, "ReplicaLost", retryable=True, lost_input=True)) == [Dispatch(1, 0)]
    assert st.counters[1].reexecutions == 1 and st.fatal is None
    assert st.handle(Completed(1, 0)) == [Dispatch(2, 0)]
    assert st.handle(Completed(2, 0)) == []
    assert st.finished and st.blocks_done == 1


def test_lost_input_recovery_is_bounded() -> None:
    st = PipelineState(n_blocks=1, limits=[1, 1], window=1, max_attempts=2)
    st.start()
    st.handle(Completed(0, 0))
    for _ in range(2):
        assert st.handle(Failed(1, 0, "lost", retryable=True, lost_input=True)) == [Dispatch(0, 0)]
        st.handle(Completed(0, 0))
    assert st.handle(Failed(1, 0, "lost", retryable=True, lost_input=True)) == [Dispatch(1, 0, 2)]


def test_skip_turns_a_final_failure_into_a_dead_letter() -> None:
    from tierflow.engine.state import DeadLetter

    st = PipelineState(n_blocks=3, limits=[1, 1], window=3, max_attempts=[1, 2], skip=[False, True])
    todo = list(st.start())
    letters = []
    failures = {(1, 0): 2}  # block 0 fails twice at step 1: once retried, then set aside
    while todo:
        d = todo.pop(0)
        assert isinstance(d, Dispatch)
        if failures.get((d.step, d.block)):
            failures[(d.step, d.block)] -= 1
            out = st.handle(Failed(d.step, d.block, "ValueError: bad row", retryable=True))
        else:
            out = st.handle(Completed(d.step, d.block))
        letters += [a for a in out if isinstance(a, DeadLetter)]
        todo += [a for a in out if isinstance(a, Dispatch)]
    assert letters == [DeadLetter(1, 0, "ValueError: bad row")]
    assert st.finished and st.blocks_done == 3 and st.fatal is None
    assert st.counters[1].dead_letters == 1 and st.counters[1].retries == 1 and st.counters[1].done == 2


def test_fail_fast_where_skip_is_not_set() -> None:
    st = PipelineState(n_blocks=2, limits=[1], window=2, max_attempts=[1], skip=[False])
    st.start()
    assert st.handle(Failed(0, 0, "KeyError", retryable=False)) == []
    assert st.fatal is not None
