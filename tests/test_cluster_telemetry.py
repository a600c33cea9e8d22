"""Telemetry on a real 2-node cluster: reads from a peer node are counted as such (measured
in the workers), and a node lost mid-run shows on the run's timeline.

Stage ``a`` is a checkpoint that runs only on the first node (a resource only that node
has, with a CPU more than the second), so with ``replicas: 2`` and a durable store each of its blocks is on that node's LMDB
and in the durable store, not on the second node. Stage ``b`` takes a whole node per step
(``num_cpus: 2``), two at a time: one runs beside the copy, the other spills to the second
node (the first is busy) and reads the copy from its peer. Midway through ``b`` the test
removes the second node; ``b`` finishes on the first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from example_copy import make_example
from tierflow.testing import BackgroundRun, LocalCluster

pytestmark = [pytest.mark.ray]

ROWS, BLOCK_ROWS = 2400, 100
BLOCKS = ROWS // BLOCK_ROWS

CODE = '''
import os
import time


def a(t):
    return t


def b(t, gate, log):
    deadline = time.monotonic() + 300
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)  # held until stage a is ahead
    time.sleep(0.3)
    with open(log, "a") as fh:
        fh.write("b\\n")
    return t
'''


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    # The first node has a CPU more than a step of b takes: a b held at the gate there
    # never starves a, and a second b never fits beside it.
    with LocalCluster(nodes=1, cpus_per_node=2, pythonpath=[str(tmp_path / "ex")],
                      node_args={"resources": {"writer": 4}, "num_cpus": 3}) as c:
        c.add_node(resources={}, num_cpus=2)
        c.cluster.wait_for_nodes()
        yield c


def test_peer_reads_are_counted_and_a_lost_node_is_on_the_timeline(tmp_path: Path, cluster: LocalCluster) -> None:
    ex = make_example(tmp_path / "ex", rows=ROWS)
    (ex / "steps.py").write_text(CODE)
    gate, log = tmp_path / "go", tmp_path / "b.log"
    doc = {
        "name": "peers",
        "source": {"format": "parquet", "path": "data/", "block_rows": BLOCK_ROWS, "columns": ["id"]},
        "stages": [
            {"name": "a", "kind": "python", "fn": "steps:a", "concurrency": 4, "checkpoint": True,
             "resources": {"writer": 1}},
            {"name": "b", "kind": "python", "fn": "steps:b", "concurrency": 2, "num_cpus": 2,
             "params": {"gate": str(gate), "log": str(log)}},
        ],
        "sink": {"path": "out/", "mode": "overwrite"},
        "cache": {"dir": str(tmp_path / "cache-{node}"), "remote_url": f"file://{tmp_path}/durable", "replicas": 2},
    }
    manifest = ex / "peers.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    done_a: list[str] = []
    run = BackgroundRun(manifest, on_event=lambda e: done_a.append("a") if (e.kind, e.stage) == (
        "block_committed", "a") else None)
    try:
        # the admission window (16 blocks here) lets a get this far ahead of the gated b
        assert run.wait_for(lambda: len(done_a) >= 12, timeout_s=180), "stage a never got ahead"
        gate.touch()
        assert run.wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 10,
                            timeout_s=180), "stage b never got going"
        cluster.remove_node(cluster.workers[1])  # the one without copies: a can still run
    finally:
        gate.touch()
    report = run.report(timeout_s=300)

    tel = report["telemetry"]
    _, b, sink = tel["steps"]
    assert sum(b["reads"].values()) == BLOCKS
    assert b["reads"].get("peer", 0) > 0, b["reads"]  # measured where the step ran
    assert b["read_bytes"].get("peer", 0) > 0
    lost = [f for f in tel["faults"] if f["kind"] == "node_lost"]
    assert [f["detail"] for f in lost] == [n["node"] for n in report["nodes_lost"]] and len(lost) == 1
    # on the timeline: the loss falls inside the run, while b still had blocks to do
    at = lost[0]["t"]
    assert 0 < at < b["t"][-1]
    done_then = max(d for t, d in zip(b["t"], b["done"]) if t <= at)
    assert done_then < BLOCKS
    # held bytes: b's copies on the lost node left the totals once (at the loss, not again
    # when their blocks were consumed); a's checkpoint copies were never on it
    assert set(b["held"].values()) == {0}, b["held"]
    a = tel["steps"][0]
    assert a["held"]["local"] == a["writes"]["local"]["bytes"] > 0 and a["held"].get("peer", 0) == 0
