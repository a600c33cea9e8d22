"""The progress and summary tables show what went wrong, and only that."""

from __future__ import annotations

import io

from rich.console import Console

from tierflow.engine.progress import StepView, summary_table


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
