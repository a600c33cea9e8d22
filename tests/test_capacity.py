"""The check that the cluster can ever hold each stage (``tierflow.capacity``), on node tables."""

from __future__ import annotations

from typing import Any

import pytest

from tierflow.capacity import check_cluster
from tierflow.errors import ManifestError
from tierflow.manifest import parse_manifest

NODES = {"head": {"CPU": 4.0, "memory": 8e9}, "g1": {"CPU": 2.0, "GPU": 1.0}, "g2": {"CPU": 2.0, "GPU": 1.0}}


def manifest(*stages: dict[str, Any], **top: Any) -> Any:
    doc = {"name": "p", "source": {"format": "csv", "path": "x"}, "sink": {"path": "o"}, "stages": list(stages), **top}
    return parse_manifest(doc)


def fn(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "kind": "python", "fn": "m:f", **fields}


def actors(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "kind": "python", "cls": "m:C", **fields}


def problems(m: Any, nodes: dict[str, dict[str, float]] = NODES) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as info:
        check_cluster(m, "m.yaml", nodes)
    assert str(info.value).startswith("m.yaml: ")
    return info.value.problems


@pytest.mark.parametrize(
    "stages",
    [
        [fn("clean")],
        [fn("embed", num_gpus=0.5, concurrency=4)],  # two per GPU
        [fn("embed", num_gpus=1, num_cpus=2)],  # a whole GPU node
        [actors("embed", num_gpus=0.5, concurrency=3), fn("post", num_gpus=0.5)],  # the last half GPU for the tasks
        [actors("embed", num_gpus=1, concurrency=8), fn("post")],  # a pool is capped at the GPUs there are
        [fn("pre", fuse=True), fn("embed", num_gpus=1)],  # a fused stage runs on the next one's resources
    ],
)
def test_what_the_nodes_can_hold_passes(stages: list[dict[str, Any]]) -> None:
    check_cluster(manifest(*stages), "m.yaml", NODES)


def test_a_stage_no_node_can_hold_names_the_stage_the_resource_and_the_offers() -> None:
    probs = problems(manifest(fn("clean"), fn("embed", num_gpus=2)))
    assert len(probs) == 1
    where, reason = probs[0]
    assert where == "stages[1].num_gpus"
    assert reason.startswith("stage 'embed' asks for 1 CPU, 2 GPU per worker; no alive node has that "
                             "(largest offers: 2 nodes with 2 CPU, 1 GPU; 1 node with 4 CPU, 0 GPU)")
    assert "ray.autoscaler: true" in reason


@pytest.mark.parametrize(
    ("stage", "where", "asked"),
    [
        (fn("big", num_cpus=8), "stages[0].num_cpus", "8 CPU"),
        (fn("a100", resources={"a100": 1}), "stages[0].resources.a100", "1 CPU, 1 a100"),
        # each node lacks something else: the stage as a whole is named
        (fn("both", num_cpus=3, num_gpus=1), "stages[0]", "3 CPU, 1 GPU"),
        ({"name": "classify", "kind": "triton", "model": "m", "inputs": {"a": "A"}, "outputs": {"B": "b"},
          "num_cpus": 16}, "stages[0].num_cpus", "16 CPU"),
    ],
)
def test_each_resource_is_named(stage: dict[str, Any], where: str, asked: str) -> None:
    [(loc, reason)] = problems(manifest(stage, triton={"url": "h:1"}))
    assert loc == where and f"asks for {asked} per worker" in reason


def test_a_triton_deployment_is_checked_too() -> None:
    m = manifest(fn("clean"), triton={"deploy": {"num_gpus": 1, "resources": {"triton_node": 1}}})
    [(loc, reason)] = problems(m)
    assert loc == "triton.deploy.resources.triton_node" and reason.startswith("a Triton server asks for 1 CPU, 1 GPU, 1 triton_node")


def test_actors_that_hold_every_gpu_leave_a_gpu_task_stage_none() -> None:
    # Four half-GPU actors and a one-GPU server hold all 3 GPUs: the tasks would wait for ever.
    m = manifest(actors("embed", num_gpus=0.5, concurrency=[4, 6]), fn("post", num_gpus=0.5),
                 triton={"deploy": {"num_gpus": 1, "replicas": 1}})
    [(loc, reason)] = problems(m, {**NODES, "g3": {"CPU": 2, "GPU": 1}})
    assert loc == "stages"
    assert reason.startswith("stage 'post' needs 0.5 GPU per task, but stage 'embed' (4 actors), Triton (1 server) "
                             "hold 3 GPU for the whole run, of the cluster's 3")


def test_an_autoscaling_cluster_is_not_checked() -> None:
    check_cluster(manifest(fn("embed", num_gpus=8), ray={"autoscaler": True}), "m.yaml", NODES)
    check_cluster(manifest(fn("embed", num_gpus=8), ray={"autoscaler": True}), "m.yaml", {})  # not even read


def test_no_nodes_at_all() -> None:
    [(loc, reason)] = problems(manifest(fn("clean")), {})
    assert loc == "stages[0].num_cpus" and "(largest offers: no nodes)" in reason
