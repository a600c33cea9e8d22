"""Where actors go (``tierflow.engine.placement``): tables of node resources, no Ray."""

from __future__ import annotations

import pytest

from tierflow.engine.placement import SlotMove, at_once, free_resources, has_slot, keep_task_slot, place


def cpu(n: float) -> dict[str, float]:
    return {"CPU": n}


def test_spares_leave_one_node_a_free_task_slot() -> None:
    alive = {"A": cpu(2), "B": cpu(2)}
    a, b = ["A", "A", "A"], ["B"]  # the nodes of two pools' actors, 0.5 CPU each

    def free() -> dict[str, dict[str, float]]:
        return free_resources(alive, [(n, cpu(0.5)) for n in [*a, *b]])

    assert free() == {"A": cpu(0.5), "B": cpu(1.5)}
    assert place(free(), cpu(0.5), avoid={"B"}, tasks=[cpu(1)]) == "A"  # off the working node, B keeps 1.5 free
    b.append("B")
    assert place(free(), cpu(0.5), avoid=set(), tasks=[cpu(1)]) == "A"  # the fullest node that fits: B keeps 1.0
    a.append("A")
    # 1.0 free on B alone: a spare there would leave two half slots and no task slot
    assert place(free(), cpu(0.5), avoid=set(), tasks=[cpu(1)]) is None
    assert place(free(), cpu(0.5), avoid=None, tasks=[cpu(1)]) == "B"  # a successor starts anyway, on the fullest that fits
    assert place(free(), {}, avoid=set(), tasks=[cpu(1)], excluded={"A"}) == "B"  # never on an excluded node
    assert place({"A": cpu(0.25)}, cpu(0.5), avoid=None, tasks=[cpu(1)]) == ""  # nowhere fits: Ray's choice
    # unknown: the freest node pays
    assert free_resources(alive, [("", cpu(1)), ("gone", cpu(0.5))]) == {"A": cpu(0.5), "B": cpu(2)}

    # e.g. the node that had room was lost: the survivors are full, a spare sits on B
    full = free_resources(alive, [(n, cpu(0.5)) for n in [*a, *b, "B"]])
    pools = {0: (cpu(0.5), [], []), 1: (cpu(0.5), [("spare", "B")], [])}
    assert keep_task_slot(full, [cpu(1)], pools) == [SlotMove(1, "spare", drop_spare=True)]
    assert keep_task_slot(free(), [cpu(1)], pools) == []  # a slot is free: nothing stopped
    # no spare left: an idle working actor moves off a node it would free, one at a time
    half = {"A": cpu(0.5), "B": cpu(0.5)}
    idle = {0: (cpu(0.5), [], [("x", "A"), ("y", "B")])}
    assert keep_task_slot(half, [cpu(1)], idle) == [SlotMove(0, "x", drop_spare=False)]
    assert keep_task_slot({"A": cpu(0.5)}, [cpu(1)], {0: (cpu(0.5), [], [("x", "A")])}) == []  # nowhere for its successor


GPU_NODES = {"head": {"CPU": 4}, "g1": {"CPU": 2, "GPU": 1}, "g2": {"CPU": 2, "GPU": 1}}
HALF = {"CPU": 0.5, "GPU": 0.5}


@pytest.mark.parametrize(
    ("held", "demand", "avoid", "tasks", "expected"),
    [
        # a GPU actor goes to a GPU node only, the one with the least GPU left that fits (packing)
        ([], HALF, None, [cpu(1)], "g1"),
        ([("g2", HALF)], HALF, None, [cpu(1)], "g2"),
        ([("g1", HALF), ("g2", HALF)], HALF, None, [cpu(1)], "g1"),
        # a spare avoids the working actors' GPU node when another has the GPU
        ([("g1", HALF)], HALF, {"g1"}, [cpu(1)], "g2"),
        # every GPU taken: a spare is not started, a working actor is left to Ray (it waits)
        ([("g1", {"GPU": 1}), ("g2", {"GPU": 1})], HALF, set(), [cpu(1)], None),
        ([("g1", {"GPU": 1}), ("g2", {"GPU": 1})], HALF, None, [cpu(1)], ""),
        # a CPU actor keeps off the GPU nodes' CPUs while a node without free GPUs has room
        ([], cpu(1), None, [cpu(1)], "head"),
        ([("head", cpu(4))], cpu(1), None, [cpu(1)], "g1"),
        # a GPU task stage needs a GPU slot: a GPU spare may not take the last one
        ([("g1", {"GPU": 1})], {"GPU": 1}, set(), [{"GPU": 0.5}], None),
        ([("g1", {"GPU": 0.5})], {"GPU": 0.5}, set(), [{"GPU": 0.5}], "g1"),  # g2 keeps its GPU for the tasks
        # custom resources count like GPUs
        ([], {"a100": 1}, None, [cpu(1)], ""),
    ],
)
def test_gpu_actors_go_where_the_gpus_are(
    held: list[tuple[str, dict[str, float]]], demand: dict[str, float], avoid: set[str] | None,
    tasks: list[dict[str, float]], expected: str | None,
) -> None:
    assert place(free_resources(GPU_NODES, held), demand, avoid, tasks) == expected


def test_every_task_step_needs_its_own_slot() -> None:
    # one CPU slot on the head and half a GPU on g1: a CPU task stage and a GPU task stage both run
    free = free_resources(GPU_NODES, [("head", cpu(3)), ("g1", HALF), ("g2", {"GPU": 1})])
    assert has_slot(free, [cpu(1), {"CPU": 0.5, "GPU": 0.5}])
    assert not has_slot(free, [cpu(1), {"GPU": 1}])
    # a GPU spare on g1 stands in the GPU task stage's way: it goes, the CPU slot was never short
    pools = {3: (HALF, [("spare", "g1")], [])}
    taken = free_resources(GPU_NODES, [("head", cpu(3)), ("g1", HALF), ("g1", HALF), ("g2", {"GPU": 1})])
    assert keep_task_slot(taken, [cpu(1), {"GPU": 0.5}], pools) == [SlotMove(3, "spare", drop_spare=True)]


@pytest.mark.parametrize(
    ("demand", "expected"),
    [
        (cpu(1), None),  # CPUs are shared by queueing, not capped
        ({"CPU": 1, "GPU": 0.5}, 4),  # two workers per GPU, two GPUs
        ({"GPU": 1}, 2),
        ({"GPU": 0.3}, 6),  # 3 per GPU (0.9), never a fourth of 0.1
        ({"GPU": 2}, 0),  # no node has two: the check before the run says so
        ({"GPU": 0.5, "a100": 1}, 0),
    ],
)
def test_workers_the_nodes_hold_at_once(demand: dict[str, float], expected: int | None) -> None:
    assert at_once(GPU_NODES, demand) == expected
