"""Row-level dead letters: ``isolate_rows`` finds the rows of a failing block that fail on
their own (pure logic, no Ray; the end-to-end run is in tests/test_failures.py)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tierflow.engine.runners import isolate_rows
from tierflow.errors import TritonUnavailable


class Counting:
    """Doubles ``x``; raises ValueError if any row's id is in ``bad``."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, t: pa.Table) -> pa.Table:
        self.calls += 1
        hit = sorted(self.bad & set(t["id"].to_pylist()))
        if hit:
            raise ValueError(f"row {hit[0]} is poison")
        return t.append_column("y", pc.multiply(t["x"], 2))


def _table(n: int) -> pa.Table:
    return pa.table({"id": pa.array(range(n), pa.int64()), "x": pa.array([float(i) for i in range(n)])})


def _first_error(fn: Counting, t: pa.Table) -> Exception:
    try:
        fn(t)
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("did not fail")


@pytest.mark.parametrize("bad", [{0}, {999}, {3, 4, 500}, set(range(100, 110))])
def test_only_the_rows_that_fail_alone_are_set_aside(bad: set[int]) -> None:
    t = _table(1000)
    fn = Counting(bad)
    out, rejects = isolate_rows(fn, t, _first_error(fn, t))
    assert out["id"].to_pylist() == [i for i in range(1000) if i not in bad]  # order kept
    assert out["y"].to_pylist() == [2.0 * i for i in out["id"].to_pylist()]
    assert rejects["id"].to_pylist() == sorted(bad) == rejects["_row"].to_pylist()
    assert rejects["_error"].to_pylist() == [f"ValueError: row {i} is poison" for i in sorted(bad)]
    assert rejects.column_names == ["id", "x", "_row", "_error"]
    k = len(bad)
    assert fn.calls <= 1 + 2 * k * math.ceil(math.log2(1000)) + 2  # bisection, not a row-by-row scan


def test_rows_keep_their_index_within_the_block_after_a_slice() -> None:
    t = _table(300).slice(100, 100)  # block rows 0..99 hold ids 100..199
    fn = Counting({150})
    _, rejects = isolate_rows(fn, t, _first_error(fn, t))
    assert rejects["_row"].to_pylist() == [50] and rejects["id"].to_pylist() == [150]


def test_a_block_that_fails_only_as_a_whole_fails() -> None:
    def needs_small_batches(t: pa.Table) -> pa.Table:
        if t.num_rows > 64:
            raise MemoryError("too big")
        return t

    t = _table(100)
    with pytest.raises(MemoryError, match="too big"):
        isolate_rows(needs_small_batches, t, MemoryError("too big"))


def test_a_block_whose_every_row_fails_fails() -> None:
    t = _table(8)
    fn = Counting(set(range(8)))
    err = _first_error(fn, t)
    with pytest.raises(ValueError) as info:
        isolate_rows(fn, t, err)
    assert info.value is err


def test_a_retryable_failure_on_the_way_is_raised_for_a_whole_block_retry() -> None:
    calls = 0

    def flaky(t: pa.Table) -> pa.Table:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise TritonUnavailable("127.0.0.1:8001", "UNAVAILABLE: restarting")
        if 5 in t["id"].to_pylist():
            raise ValueError("poison")
        return t

    t = _table(16)
    with pytest.raises(TritonUnavailable):
        isolate_rows(flaky, t, ValueError("poison"))

    calls = 100  # a user exception the stage lists in retry_on counts as retryable too
    listed = Counting({5})
    with pytest.raises(ValueError):
        isolate_rows(listed, t, ValueError("poison"), retry_on=("ValueError",))
    assert listed.calls == 1
