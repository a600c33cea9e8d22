"""The progress and summary tables show what went wrong, and only that."""

from __future__ import annotations

import io

from rich.console import Console

from tierflow.engine.progress import Progress, StepView, backpressured, summary_table, tables
from tierflow.engine.telemetry import StepUsage


def test_notes_list_only_the_trouble_that_happened() -> None:
    quiet = StepView("parse", "task", 10, done=10)
    assert quiet.notes == ""
    rough = StepView("embed", "triton", 10, done=10, timeouts=2, dead_letter_rows=5, retired_actors=1,
                     excluded_nodes=["0123456789abcdef"])
    assert rough.notes == "timed out 2, dead rows 5, actors retired 1, excluded 01234567"
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table([quiet, rough], 1.0))
    lines = out.getvalue().splitlines()
    assert any("embed" in line and "dead rows 5" in line for line in lines)
    assert not any("parse" in line and "timed out" in line for line in lines)


def _busy_run() -> tuple[list[StepView], list[StepUsage]]:
    """20 stages and the sink of a big run: large figures in every column."""
    gib = 1 << 30
    steps, usage = [], []
    for i in range(20):
        steps.append(StepView(f"stage_{i:02d}_embedder", "triton:minilm" if i % 2 else "actor", 120_000,
                              done=118_765, inflight=64, queued=1_234, rows_out=987_654_321, limit=64,
                              executions=120_000, retries=12, timeouts=3, started=0.0))
        u = StepUsage(cpus=1.5, gpus=0.25, rss_peak=37 * gib, grew_peak=3 * gib, spilled=1234 * gib,
                      rss_now=512 * gib, memory_tier_now=64 * gib,
                      held={"local": 1500 * gib, "peer": 1500 * gib, "remote": 2 * gib},
                      evicted={"memory": 900 * gib, "local": 99 * gib})
        u.reads = {"memory": [12_345, 0], "local": [99_999, 0], "peer": [8_000, 0], "remote": [123, 0],
                   "source": [120_000, 0]}
        u.workers = {(f"n{w}", w): (0.0, gib, 0) for w in range(64)}
        usage.append(u)
    steps.append(StepView("sink", "parquet", 120_000, done=100, limit=2))
    usage.append(StepUsage(cpus=1.0))
    return steps, usage


def test_live_tables_fit_120_columns_one_line_per_stage() -> None:
    steps, usage = _busy_run()
    out = io.StringIO()
    console = Console(file=out, width=120)
    for t in tables("a-pipeline", steps, usage, now=10.0):
        console.print(t)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 120
    for name in ("stage_00_embedder", "sink"):
        rows = [line for line in lines if name in line]
        assert len(rows) == 3, rows  # one row per table, none folded onto a second line
    first = next(line for line in lines if "stage_00_embedder" in line and "CPU" not in line and "1.5T" in line)
    assert "1.5T" in first and "1.2T" in first and "999G" in first  # held on the node's LMDB, spilled, evicted
    assert "96/96" in out.getvalue() and "16/16" in out.getvalue()  # CPUs and GPUs in use / at most
    assert "12k/100k/8000/123/120k" in out.getvalue()  # reads per tier
    assert "93%" in out.getvalue()  # on node: memory + local of the cache reads (the source's not counted)


def test_held_back_flags_a_stage_whose_next_one_is_saturated() -> None:
    parse = StepView("parse", "task", 100, done=40, inflight=1, queued=0, limit=4)
    embed = StepView("embed", "actor", 100, done=10, inflight=2, queued=30, limit=2)
    sink = StepView("sink", "parquet", 100, done=10, inflight=0, limit=2)
    steps = [parse, embed, sink]
    assert [backpressured(steps, i) for i in range(3)] == [True, False, False]
    embed.inflight = 1  # a free slot: not saturated, nothing holds parse back
    assert not backpressured(steps, 0)


def test_plain_lines_carry_the_resource_and_cache_figures() -> None:
    steps, usage = _busy_run()
    out = io.StringIO()
    Progress("p", steps[:1], out=out, usage=usage[:1]).refresh(force=True)
    line = out.getvalue()
    assert "queued 1234" in line and "cpus 96" in line and "peak 37G" in line and "on-node reads 93%" in line
    assert "evicted 999G" in line and "gpus 16" in line
    out = io.StringIO()  # a CPU stage that evicted nothing: those two figures are left out
    Progress("p", steps[-1:], out=out, usage=usage[-1:]).refresh(force=True)
    assert "cpus " in out.getvalue() and "gpus" not in out.getvalue() and "evicted" not in out.getvalue()
