"""What a run tells whoever listens while it goes: stages starting, blocks committed or
failing, nodes lost, blocks copied again. Tools and tests pass ``on_event`` to
:func:`tierflow.run` instead of reaching into the engine.

A listener is called on the driver's loop, in order; it must return quickly (it delays
the run) and must not raise (an exception from it fails the run, like any driver error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Event", "EventKind", "Listener"]

EventKind = Literal[
    "run_started",  # the backend is ready: actors constructed, cache servers up
    "stage_started",  # the first block of a step (a stage, or "sink") was dispatched
    "block_committed",  # a step's output block is written (and journaled)
    "block_failed",  # one attempt failed; ``retryable`` says whether another may follow
    "node_lost",  # a node of the cluster died; its copies are no longer read
    "block_rereplicated",  # a block that lost a copy with a node was copied to ``node``
    "run_finished",  # after the sink committed, or with ``error`` when the run failed
]


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, ``at_s`` seconds after the run began.

    ``stage`` names the step (a stage's name, or ``"sink"``); ``block`` its block index.
    """

    kind: EventKind
    at_s: float
    stage: str | None = None
    block: int | None = None
    attempt: int | None = None
    node: str | None = None
    error: str | None = None
    retryable: bool | None = None


Listener = Callable[[Event], None]
