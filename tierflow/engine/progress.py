"""Live per-stage progress: a rich table on a TTY, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.table import Table


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


@dataclass
class Progress:
    """Renders ``StepView``s. ``interval_s`` applies to plain (non-TTY) output."""

    title: str
    steps: Sequence[StepView]
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    interval_s: float = 5.0
    _live: Live | None = field(init=False, default=None)
    _last_plain: float = field(init=False, default=0.0)
    _console: Console = field(init=False)

    def __post_init__(self) -> None:
        self._console = Console(file=self.out)
        if self._console.is_terminal:
            self._live = Live(self._table(), console=self._console, refresh_per_second=4, transient=False)
            self._live.start()

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._live is not None:
            self._live.update(self._table())
        elif force or now - self._last_plain >= self.interval_s:
            self._last_plain = now
            for s in self.steps:
                print(
                    f"[{self.title}] {s.name:<16} {s.state:<8} {s.done}/{s.total} blocks "
                    f"{s.rows_out} rows {s.rate(now):,.0f} rows/s",
                    file=self.out,
                    flush=True,
                )

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            self._live = None

    def _table(self) -> Table:
        now = time.monotonic()
        t = Table(title=self.title, title_justify="left")
        for col in ("stage", "kind", "state", "blocks", "in flight", "rows out", "rows/s", "notes"):
            t.add_column(col, justify="left" if col in ("stage", "kind", "state", "notes") else "right")
        for s in self.steps:
            t.add_row(
                s.name, s.kind, s.state, f"{s.done}/{s.total}", str(s.inflight),
                f"{s.rows_out:,}", f"{s.rate(now):,.0f}", s.notes,
            )
        return t


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
