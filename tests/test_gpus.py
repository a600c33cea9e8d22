"""GPU stages on a real multi-node Ray cluster whose workers declare one GPU each (Ray
hands out the declared GPUs and sets ``CUDA_VISIBLE_DEVICES`` as on a GPU machine; no
device is touched): blocks run only on GPU nodes, half-GPU workers share a device, and a
stage no node can hold is rejected before any block runs."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from tierflow.driver import run_pipeline
from tierflow.errors import ManifestError

pytestmark = pytest.mark.ray

STAGES = '''
import json
import os

import ray


def _note(path, stage):
    ctx = ray.get_runtime_context()
    line = {"stage": stage, "node": ctx.get_node_id(), "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\\n")


def on_gpu(table, log):
    _note(log, "task")
    return table


class Model:
    def __init__(self, log):
        self.log = log
        _note(log, "actor started")

    def __call__(self, table):
        _note(self.log, "actor")
        return table
'''


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[Any]:
    """A head without GPUs and two worker nodes with one GPU each (~15 s)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_nodes = {c.add_node(num_cpus=2, num_gpus=1).node_id for _ in range(2)}
    ray.init(address=c.address)
    try:
        yield gpu_nodes
    finally:
        ray.shutdown()
        c.shutdown()


def write_job(root: Path, name: str, stages: list[dict[str, Any]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "gpu_stages.py").write_text(STAGES)
    (root / "data").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(range(40), pa.int64())}), root / "data" / "a.parquet")
    doc = {
        "name": name,
        "source": {"format": "parquet", "path": "data/", "block_rows": 10},
        "stages": stages,
        "sink": {"path": "out/", "mode": "overwrite"},
        "cache": {"dir": str(root / "cache-{node}"), "remote_url": f"file://{root}/store"},
    }
    (root / "m.yaml").write_text(yaml.safe_dump(doc))
    return root / "m.yaml"


def test_half_gpu_stages_run_on_the_gpu_nodes_and_share_a_device(tmp_path: Path, gpu_cluster: set[str]) -> None:
    log = str(tmp_path / "calls.jsonl")
    half = {"num_gpus": 0.5, "num_cpus": 0.5, "speculate_after": None, "params": {"log": log}}
    manifest = write_job(tmp_path, "gpus", [
        {"name": "pre", "kind": "python", "fn": "gpu_stages:on_gpu", "concurrency": 1, **half},
        # three half-GPU actors on two GPUs: two of them share one; the last half is the task stage's
        {"name": "model", "kind": "python", "cls": "gpu_stages:Model", "concurrency": 3, **half},
    ])
    report = run_pipeline(manifest, progress_out=None)
    assert report["status"] == "succeeded" and report["rows_out"] == 40

    calls = [json.loads(line) for line in Path(log).read_text().splitlines()]
    assert {c["stage"] for c in calls} == {"task", "actor", "actor started"}
    assert sum(c["stage"] == "task" for c in calls) >= 4 and sum(c["stage"] == "actor" for c in calls) >= 4
    assert {c["node"] for c in calls} <= gpu_cluster  # never the head, which has no GPU
    for c in calls:  # Ray gave each worker a device and told CUDA which
        assert len(c["gpus"]) == 1 and c["cuda"] == c["gpus"][0]
    actors: dict[tuple[str, str], set[int]] = defaultdict(set)
    for c in calls:
        if c["stage"] == "actor started":
            actors[(c["node"], c["gpus"][0])].add(c["pid"])
    assert sum(len(pids) for pids in actors.values()) == 3  # all three held their half GPU at once
    assert max(len(pids) for pids in actors.values()) == 2  # two actors on one node's one GPU

    steps = {s["name"]: s for s in report["telemetry"]["steps"]}
    assert steps["pre"]["gpus_per_attempt"] == steps["model"]["gpus_per_attempt"] == 0.5
    assert steps["sink"]["gpus_per_attempt"] == 0.0


def test_a_stage_no_node_can_hold_is_rejected_before_any_block_runs(tmp_path: Path, gpu_cluster: set[str]) -> None:
    log = tmp_path / "calls.jsonl"
    manifest = write_job(tmp_path, "too-big", [
        {"name": "pre", "kind": "python", "fn": "gpu_stages:on_gpu", "params": {"log": str(log)}},
        {"name": "embed", "kind": "python", "fn": "gpu_stages:on_gpu", "num_gpus": 2, "params": {"log": str(log)}},
    ])
    with pytest.raises(ManifestError) as info:
        run_pipeline(manifest, progress_out=None)
    assert info.value.path == str(manifest)
    [(where, reason)] = info.value.problems
    assert where == "stages[1].num_gpus"
    assert reason.startswith("stage 'embed' asks for 1 CPU, 2 GPU per worker; no alive node has that "
                             "(largest offers: 2 nodes with 2 CPU, 1 GPU; 1 node with 2 CPU, 0 GPU)")
    assert not log.exists()  # not even the first stage ran
    assert not os.path.exists(tmp_path / "out" / "_SUCCESS")
