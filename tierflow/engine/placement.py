"""Where an actor of this run goes: CPU bin-packing that keeps a task slot free. Pure.

Ray places each actor on its own; what it does not know is that this run's task steps
and its sink need a node with a whole task step of CPUs free *of this run's actors*.
Actors spread over half-free nodes stop the task steps and the sink for good (a node's
free CPUs count, not the cluster's: two half-free nodes make no slot). These functions
decide from the node table and the pools' placements; the Ray backend carries them out.

>>> free = free_cpus({"A": 2.0, "B": 2.0}, [("A", 0.5), ("A", 0.5), ("A", 0.5), ("B", 0.5)])
>>> free
{'A': 0.5, 'B': 1.5}
>>> place(free, 0.5, avoid={"B"}, task_cpus=1.0)   # off the working node; B keeps 1.5 free
'A'
>>> place({"A": 0.0, "B": 1.0}, 0.5, avoid=set(), task_cpus=1.0) is None  # B would keep no slot
True
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SlotMove", "free_cpus", "keep_task_slot", "place"]


def free_cpus(alive: Mapping[str, float], placements: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Per alive node (node -> its CPUs), the CPUs not held by an actor or spare of this run.

    ``placements`` is ``(node, CPUs)`` of every actor and spare; one whose node is not known
    yet ("") or not alive counts against the freest node, the worst case for tasks.
    """
    free = dict(alive)
    unplaced = 0.0
    for node, held in placements:
        if node in free:
            free[node] -= held
        else:
            unplaced += held
    if unplaced and free:
        free[max(free, key=free.__getitem__)] -= unplaced
    return free


def place(
    free: Mapping[str, float],
    cpus: float,
    avoid: Collection[str] | None,
    task_cpus: float,
    excluded: Collection[str] = (),
) -> str | None:
    """The node for a new actor of ``cpus`` CPUs: the fullest node that fits it (off
    ``avoid`` while another node can take it, never one in ``excluded``) such that some node
    keeps ``task_cpus`` free for a task step.

    ``avoid`` None is a working actor (a successor, growth), which starts in any case: the
    fullest node that fits it when none keeps a slot, ``""`` (Ray's choice) when none fits.
    For a spare (``avoid`` a set), None: no room for it.
    """
    fits = sorted((n for n in free if free[n] >= cpus and n not in excluded), key=free.__getitem__)
    for node in [n for n in fits if n not in (avoid or ())] or fits:
        if max(free[n] - (cpus if n == node else 0.0) for n in free) >= task_cpus:
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
    free: Mapping[str, float],
    task_cpus: float,
    pools: Mapping[int, tuple[float, list[tuple[Any, str]], list[tuple[Any, str]]]],
) -> list[SlotMove]:
    """What to stop while no node has ``task_cpus`` free of actors (a lost node can leave
    the survivors full, or their actors spread over half-free nodes).

    ``pools`` maps a step to ``(CPUs per actor, built spares, idle working actors)``, the
    last two as ``(actor, node)``. Spares go first, from the freest node (a spare must
    never stop the work it stands by for); then at most one idle working actor, on a node
    it would free while another node can take its successor. Without a slot the task steps
    and the sink wait for ever.
    """
    left = dict(free)
    if max(left.values(), default=0.0) >= task_cpus:
        return []
    moves: list[SlotMove] = []
    for step, (cpus, spares, _) in pools.items():
        for spare, node in sorted(spares, key=lambda sn: -left.get(sn[1], 0.0)):
            moves.append(SlotMove(step, spare, drop_spare=True))
            left[node] = left.get(node, 0.0) + cpus
            if max(left.values()) >= task_cpus:
                return moves
    for step, (cpus, _, idle) in pools.items():
        for actor, node in idle:
            others = [n for n in left if n != node and left[n] >= cpus]
            if node in left and left[node] + cpus >= task_cpus and others:
                return [*moves, SlotMove(step, actor, drop_spare=False)]  # placements change: look again
    return moves
