"""Live per-stage progress: rich tables on a TTY, plain periodic lines otherwise.

Three tables, each readable in 120 columns (a single one with every figure would need
~180): progress (blocks, state, queue, rows, trouble), resources (CPUs and GPUs in use
out of the most the stage may hold, its workers' memory, backpressure) and cache (bytes
held per tier, spilled, evicted, reads per tier and the share served on the node). Tables are
rebuilt at most ``REDRAW_S`` apart, not every driver round: rich's layout costs a few ms.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from tierflow.engine.telemetry import LOCAL, MEMORY, PEER, REMOTE, SOURCE, StepUsage, backpressured

__all__ = ["Progress", "StepView", "backpressured", "human_bytes", "summary_table", "tables"]

REDRAW_S = 0.25


@dataclass(slots=True)
class StepView:
    """What the table shows for one step (a stage, or the sink)."""

    name: str
    kind: str
    total: int
    done: int = 0
    inflight: int = 0
    queued: int = 0
    rows_out: int = 0
    executions: int = 0
    retries: int = 0
    reused: int = 0
    reexecutions: int = 0
    dead_letters: int = 0
    dead_letter_rows: int = 0
    timeouts: int = 0
    speculated: int = 0
    retired_actors: int = 0
    spares_used: int = 0  # standby actors that took over (a dead actor, growth)
    rereplicated: int = 0  # blocks copied to a new node after losing a copy
    excluded_nodes: list[str] = field(default_factory=list)
    busy_s: float = 0.0
    limit: int = 0  # the most attempts it may run at once (0: not known yet)
    failed: bool = False
    started: float | None = None
    finished: float | None = None

    @property
    def state(self) -> str:
        if self.failed:
            return "failed"
        if self.done >= self.total:
            return "done"
        if self.inflight:
            return "running"
        return "waiting" if self.done == 0 else "idle"

    @property
    def notes(self) -> str:
        """The trouble worth a glance, only what happened: 'timed out 2, dead rows 5, ...'."""
        counts = (
            ("re-executed", self.reexecutions), ("timed out", self.timeouts), ("speculated", self.speculated),
            ("dead blocks", self.dead_letters), ("dead rows", self.dead_letter_rows),
            ("actors retired", self.retired_actors), ("spares used", self.spares_used),
            ("re-replicated", self.rereplicated),
        )
        parts = [f"{label} {n}" for label, n in counts if n]
        if self.excluded_nodes:
            parts.append("excluded " + ", ".join(n[:8] for n in self.excluded_nodes))
        return ", ".join(parts)

    def rate(self, now: float) -> float:
        if self.started is None:
            return 0.0
        end = self.finished if self.finished is not None else now
        return self.rows_out / max(end - self.started, 1e-9)


def human_bytes(n: float) -> str:
    """``1.5G``, ``320M``, ``12K``, ``0``: at most 5 characters for anything below 1000 P."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" or abs(n) >= 10 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.0f}P"


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.0f}%" if total else "-"


def tables(title: str, steps: Sequence[StepView], usage: Sequence[StepUsage] | None, now: float) -> list[Table]:
    """The live tables: progress, then (with ``usage``) resources and cache."""
    t = _table(title)
    for col in ("stage", "kind", "state", "blocks", "in flight", "queued", "rows out", "rows/s", "notes"):
        t.add_column(col, justify="left" if col in ("stage", "kind", "state", "notes") else "right",
                     overflow="fold")
    for s in steps:
        t.add_row(s.name, s.kind, s.state, f"{s.done}/{s.total}", str(s.inflight), str(s.queued),
                  f"{s.rows_out:,}", f"{s.rate(now):,.0f}", s.notes)
    if usage is None:
        return [t]
    res = _table("resources (memory: the stage's workers; step +peak: the most one step added)")
    for col in ("stage", "CPUs", "GPUs", "workers", "RSS now", "RSS peak", "step +peak", "held back"):
        res.add_column(col, justify="left" if col in ("stage", "held back") else "right", overflow="fold")
    cache = _table("cache (held: not yet consumed; evicted: memory + local; reads: blocks per tier; "
                   "on node: memory + local)")
    for col in ("stage", "memory", "local", "peers", "durable", "spilled", "evicted", "reads mem/loc/peer/rem/src",
                "on node"):
        cache.add_column(col, justify="left" if col == "stage" else "right", overflow="fold")
    for i, (s, u) in enumerate(zip(steps, usage)):
        cap = max(s.limit, s.inflight)
        res.add_row(
            s.name, f"{s.inflight * u.cpus:g}/{cap * u.cpus:g}", f"{s.inflight * u.gpus:g}/{cap * u.gpus:g}",
            str(len(u.workers)), human_bytes(u.rss_now), human_bytes(u.rss_peak), human_bytes(u.grew_peak),
            f"by {steps[i + 1].name}" if backpressured(steps, i) else "",
        )
        reads = [u.reads.get(k, (0, 0))[0] for k in (MEMORY, LOCAL, PEER, REMOTE, SOURCE)]
        ratio = u.hit_ratio()
        cache.add_row(
            s.name, human_bytes(u.memory_tier_now), human_bytes(u.held.get(LOCAL, 0)),
            human_bytes(u.held.get(PEER, 0)), human_bytes(u.held.get(REMOTE, 0)), human_bytes(u.spilled),
            human_bytes(sum(u.evicted.values())), "/".join(_count(n) for n in reads),
            "-" if ratio is None else f"{100 * ratio:.0f}%",
        )
    return [t, res, cache]


def _table(title: str) -> Table:
    # no vertical rules: two characters a column instead of three, what 9 columns need in 120
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def _count(n: int) -> str:
    return str(n) if n < 10_000 else f"{n / 1000:.0f}k"


def plain_line(title: str, s: StepView, u: StepUsage | None, now: float) -> str:
    """One step as a log line (stdout is not a terminal)."""
    line = (f"[{title}] {s.name:<16} {s.state:<8} {s.done}/{s.total} blocks "
            f"{s.rows_out} rows {s.rate(now):,.0f} rows/s queued {s.queued}")
    if u is not None:  # figures that are always zero for this step are left out: lines stay short
        ratio = u.hit_ratio()
        evicted = sum(u.evicted.values())
        line += (f" cpus {s.inflight * u.cpus:g}" + (f" gpus {s.inflight * u.gpus:g}" if u.gpus else "")
                 + f" rss {human_bytes(u.rss_now)} peak {human_bytes(u.rss_peak)}"
                 f" held {human_bytes(sum(u.held.values()))}" + (f" evicted {human_bytes(evicted)}" if evicted else "")
                 + f" on-node reads {'-' if ratio is None else f'{100 * ratio:.0f}%'}")
    return line


@dataclass
class Progress:
    """Renders ``StepView``s (and, given ``usage``, their resource and cache figures).
    ``interval_s`` applies to plain (non-TTY) output."""

    title: str
    steps: Sequence[StepView]
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    interval_s: float = 5.0
    usage: Sequence[StepUsage] | None = None
    _live: Live | None = field(init=False, default=None)
    _last_plain: float = field(init=False, default=0.0)
    _drawn: float = field(init=False, default=0.0)
    _console: Console = field(init=False)

    def __post_init__(self) -> None:
        self._console = Console(file=self.out)
        if self._console.is_terminal:
            self._live = Live(self._group(), console=self._console, refresh_per_second=4, transient=False)
            self._live.start()

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._live is not None:
            if force or now - self._drawn >= REDRAW_S:
                self._drawn = now
                self._live.update(self._group())
        elif force or now - self._last_plain >= self.interval_s:
            self._last_plain = now
            usage = self.usage if self.usage is not None else [None] * len(self.steps)
            for s, u in zip(self.steps, usage):
                print(plain_line(self.title, s, u, now), file=self.out, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._group())
            self._live.stop()
            self._live = None

    def _group(self) -> Group:
        return Group(*tables(self.title, self.steps, self.usage, time.monotonic()))


def summary_table(steps: Sequence[StepView], elapsed_s: float) -> Table:
    """The end-of-run summary per stage."""
    t = Table(title=f"summary ({elapsed_s:.1f} s)", title_justify="left")
    cols = ("stage", "blocks", "rows out", "executions", "retries", "reused", "busy s", "rows/s", "notes")
    for col in cols:
        t.add_column(col, justify="left" if col in ("stage", "notes") else "right")
    now = time.monotonic()
    for s in steps:
        t.add_row(
            s.name, f"{s.done}/{s.total}", f"{s.rows_out:,}", str(s.executions), str(s.retries),
            str(s.reused), f"{s.busy_s:.1f}", f"{s.rate(now):,.0f}", s.notes,
        )
    return t
