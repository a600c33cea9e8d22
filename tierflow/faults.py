"""Named crash points for fault tests of real processes.

``TIERFLOW_CRASH_AT=<point>[:<n>]`` makes the process SIGKILL itself the n-th time (default
the first) it passes ``crash_point(<point>)``. Unset, a crash point costs one dict lookup.
Points (all in the driver): ``before_success`` (every part written and journaled,
``_SUCCESS`` not yet), ``journal_write`` (the journal's temp file written, not yet renamed).
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("TIERFLOW_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
