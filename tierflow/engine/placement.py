"""Where an actor of this run goes: bin-packing over each node's resources that keeps a
slot free for every task step. Pure.

Ray places each actor on its own; what it does not know is that this run's task steps
and its sink need a node with a whole task step's resources free *of this run's actors*.
Actors spread over half-free nodes stop the task steps and the sink for good (a node's
free resources count, not the cluster's: two half-free nodes make no slot). These
functions decide from the node table and the pools' placements; the Ray backend carries
them out. Resources are Ray's names -> amounts (``{"CPU": 1, "GPU": 0.5}``, custom ones
alike), as one task or actor of a stage holds them (``PythonStage.demand``).

>>> cpu = lambda n: {"CPU": n}
>>> free = free_resources({"A": cpu(2), "B": cpu(2)}, [("A", cpu(.5)), ("A", cpu(.5)), ("A", cpu(.5)), ("B", cpu(.5))])
>>> free
{'A': {'CPU': 0.5}, 'B': {'CPU': 1.5}}
>>> place(free, cpu(.5), avoid={"B"}, tasks=[cpu(1)])   # off the working node; B keeps 1.5 free
'A'
>>> place({"A": cpu(0), "B": cpu(1)}, cpu(.5), avoid=set(), tasks=[cpu(1)]) is None  # B would keep no slot
True
>>> gpu = {"A": {"CPU": 4, "GPU": 0}, "B": {"CPU": 1, "GPU": 1}}
>>> place(gpu, {"CPU": 1, "GPU": 0.5}, avoid=None, tasks=[cpu(1)])  # only B has the GPU
'B'
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Resources", "SlotMove", "at_once", "describe", "free_resources", "has_slot", "holds", "keep_task_slot", "place",
]

Resources = Mapping[str, float]

_EPS = 1e-9  # Ray's fractional resources are fixed-point: 0.1 + 0.2 must hold 0.3


def holds(have: Resources, demand: Resources) -> bool:
    """Whether ``have`` covers every amount of ``demand`` (a missing name is 0).

    >>> holds({"CPU": 2, "GPU": 1}, {"GPU": 0.5}), holds({"CPU": 2}, {"CPU": 1, "GPU": 0.5})
    (True, False)
    """
    return all(have.get(k, 0.0) + _EPS >= v for k, v in demand.items())


def describe(demand: Resources) -> str:
    """``"1 CPU, 0.5 GPU, 1 a100"``: a demand as messages name it (CPU, GPU, then the rest)."""
    keys = sorted(demand, key=lambda k: (k != "CPU", k != "GPU", k))
    return ", ".join(f"{demand[k]:g} {k}" for k in keys) or "nothing"


def at_once(nodes: Mapping[str, Resources], demand: Resources) -> int | None:
    """How many workers of ``demand`` the nodes' GPUs and custom resources can hold at
    the same time (summed over nodes); None when it asks for neither (CPUs are left out:
    tasks queued for CPUs are how a stage shares a node, see :func:`place`).

    >>> at_once({"A": {"GPU": 1}, "B": {"GPU": 2}, "C": {"CPU": 8}}, {"CPU": 1, "GPU": 0.5})
    6
    >>> at_once({"A": {"GPU": 1}}, {"CPU": 1}) is None
    True
    """
    scarce = {k: v for k, v in demand.items() if k != "CPU"}
    if not scarce:
        return None
    return sum(math.floor(min(res.get(k, 0.0) / v for k, v in scarce.items()) + _EPS) for res in nodes.values())


def free_resources(
    alive: Mapping[str, Resources], placements: Iterable[tuple[str, Resources]]
) -> dict[str, dict[str, float]]:
    """Per alive node (node -> its resources), what is not held by an actor or spare of this run.

    ``placements`` is ``(node, demand)`` of every actor and spare; one whose node is not
    known yet ("") or not alive counts against the freest node (per resource), the worst
    case for tasks.
    """
    free = {node: dict(res) for node, res in alive.items()}
    unplaced: dict[str, float] = {}
    for node, held in placements:
        for k, v in held.items():
            if node in free:
                free[node][k] = free[node].get(k, 0.0) - v
            else:
                unplaced[k] = unplaced.get(k, 0.0) + v
    for k, v in unplaced.items():
        if free:
            freest = max(free, key=lambda n: free[n].get(k, 0.0))
            free[freest][k] = free[freest].get(k, 0.0) - v
    return free


def has_slot(free: Mapping[str, Resources], tasks: Sequence[Resources]) -> bool:
    """Whether every task step of ``tasks`` (one demand each) has a node holding it."""
    return all(any(holds(res, task) for res in free.values()) for task in tasks)


def _moved(res: Resources, demand: Resources, sign: float) -> dict[str, float]:
    return {**res, **{k: res.get(k, 0.0) + sign * v for k, v in demand.items()}}


def _fullness(res: Resources, demand: Resources) -> tuple[float, ...]:
    """Sort key, fullest first: an actor asking for no GPU goes to a node without free
    GPUs first (their CPUs are for the GPU stages), then the least free of what it asks,
    its scarce resources before its CPUs."""
    keys = sorted(demand, key=lambda k: (k == "CPU", k))
    spare_gpus = float("GPU" not in demand and res.get("GPU", 0.0) > _EPS)
    return (spare_gpus, *(res.get(k, 0.0) for k in keys))


def place(
    free: Mapping[str, Resources],
    demand: Resources,
    avoid: Collection[str] | None,
    tasks: Sequence[Resources],
    excluded: Collection[str] = (),
) -> str | None:
    """The node for a new actor holding ``demand``: the fullest node that holds it (off
    ``avoid`` while another node can take it, never one in ``excluded``) such that every
    task step of ``tasks`` keeps a node where it fits.

    ``avoid`` None is a working actor (a successor, growth), which starts in any case: the
    fullest node that fits it when none keeps the slots, ``""`` (Ray's choice) when none
    fits. For a spare (``avoid`` a set), None: no room for it.
    """
    fits = sorted((n for n in free if holds(free[n], demand) and n not in excluded),
                  key=lambda n: _fullness(free[n], demand))
    for node in [n for n in fits if n not in (avoid or ())] or fits:
        if has_slot({**free, node: _moved(free[node], demand, -1)}, tasks):
            return node
    if avoid is not None:
        return None
    return fits[0] if fits else ""


@dataclass(frozen=True, slots=True)
class SlotMove:
    """One step towards a free task slot: stop a ``spare`` (drop), or move an idle working
    ``actor`` off its node (its successor is placed by :func:`place`)."""

    pool: int
    actor: Any
    drop_spare: bool


def keep_task_slot(
    free: Mapping[str, Resources],
    tasks: Sequence[Resources],
    pools: Mapping[int, tuple[Resources, list[tuple[Any, str]], list[tuple[Any, str]]]],
) -> list[SlotMove]:
    """What to stop while some task step of ``tasks`` has no node with its resources free
    of actors (a lost node can leave the survivors full, or their actors spread over
    half-free nodes).

    ``pools`` maps a step to ``(demand per actor, built spares, idle working actors)``,
    the last two as ``(actor, node)``. Spares go first, from the freest node (a spare must
    never stop the work it stands by for); then at most one idle working actor, on a node
    it would free while another node can take its successor. Without a slot the task steps
    and the sink wait for ever. ``tasks`` should hold only what some node can hold at all
    (the caller leaves out a step no node has the resources for: stopping actors would not
    help it).
    """
    left = {node: dict(res) for node, res in free.items()}
    if has_slot(left, tasks):
        return []
    moves: list[SlotMove] = []
    for step, (demand, spares, _) in pools.items():
        freest_first = sorted(spares, key=lambda sn: tuple(-x for x in _fullness(left.get(sn[1], {}), demand)))
        for spare, node in freest_first:
            moves.append(SlotMove(step, spare, drop_spare=True))
            left[node] = _moved(left.get(node, {}), demand, +1)
            if has_slot(left, tasks):
                return moves
    for step, (demand, _, idle) in pools.items():
        for actor, node in idle:
            others = [n for n in left if n != node and holds(left[n], demand)]
            if node in left and others and has_slot({**left, node: _moved(left[node], demand, +1)}, tasks):
                return [*moves, SlotMove(step, actor, drop_spare=False)]  # placements change: look again
    return moves
