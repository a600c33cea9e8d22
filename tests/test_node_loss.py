"""Lose a node mid-run on a real 3-node Ray cluster: blocks come from their replicas.

``ray.cluster_utils.Cluster`` runs a head (no CPUs; the driver) and three worker nodes on
this machine, each with its own LMDB environment (``cache.dir`` holds ``{node}``). With
``replicas: 2`` every intermediate block has a copy on its writer's node and one on a peer.
The test removes the node holding most of stage ``a``'s committed blocks while stage ``b``
still has to read them, and checks that the run finishes with exactly the right rows and
that no block of ``a`` committed before the removal ran again.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from example_copy import make_example
from tierflow.testing import BackgroundRun, LocalCluster

pytestmark = [pytest.mark.ray]

ROWS, BLOCK_ROWS = 4000, 100
BLOCKS = ROWS // BLOCK_ROWS

CODE = '''
import os
import time
import pyarrow.compute as pc


def step(t, tag, log, delay_s=0.0, gate=None):
    deadline = time.monotonic() + 300
    while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)  # held until the test has removed a node
    with open(log, "a") as fh:
        fh.write(f"{tag} {t['id'][0].as_py() // %d}\\n")
    time.sleep(delay_s)
    return t.append_column(f"v_{tag}", pc.add(t["id"], len(tag)))


def picky(t, bad_node):
    import ray

    if ray.get_runtime_context().get_node_id() == bad_node:
        raise OSError("this node's scratch disk is broken")
    time.sleep(0.1)  # good nodes stay busy long enough for the bad one to fail 3 times
    return t.append_column("v_p", t["id"])


class Step:
    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    def __call__(self, t):
        return step(t, self.tag, self.log)
''' % BLOCK_ROWS


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A head (no CPUs: the driver) and three worker nodes of 2 CPUs; node death noticed
    within ~1 s. Stage code comes from ``tmp_path/ex``."""
    with LocalCluster(nodes=3, cpus_per_node=2, pythonpath=[str(tmp_path / "ex")]) as c:
        yield c


def test_node_removed_mid_run_reads_replicas_not_lineage(tmp_path: Path, cluster: LocalCluster) -> None:
    from tierflow.cache.locations import lmdb_location, lmdb_nodes
    from tierflow.engine.journal import BlockEntry, Journal

    ex = make_example(tmp_path / "ex", rows=ROWS)
    (ex / "steps.py").write_text(CODE)
    log = str(ex / "executions.log")
    gate = tmp_path / "go"  # stage b waits for it: a gets ahead however slow the machine is
    doc = {
        "name": "nodeloss",
        "source": {"format": "parquet", "path": "data/", "block_rows": BLOCK_ROWS, "columns": ["id"]},
        "stages": [
            {"name": "a", "kind": "python", "fn": "steps:step", "concurrency": 4, "params": {"tag": "a", "log": log}},
            {"name": "b", "kind": "python", "fn": "steps:step", "concurrency": 2,
             "params": {"tag": "b", "log": log, "delay_s": 0.3, "gate": str(gate)}},
            {"name": "c", "kind": "python", "cls": "steps:Step", "concurrency": 1, "num_cpus": 0.5,
             "params": {"tag": "c", "log": log}},
        ],
        "sink": {"path": "out/", "mode": "error"},
        "cache": {"dir": str(tmp_path / "cache-{node}"), "remote_url": f"file://{tmp_path}/durable", "replicas": 2},
    }
    manifest = ex / "nodeloss.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    journal = str(tmp_path / "durable" / "_journal" / "nodeloss")

    noticed = threading.Event()  # the driver saw the node go (and started its top-up copies)
    copied = threading.Event()  # a block waiting for b got its second copy back
    on = {"node_lost": noticed, "block_rereplicated": copied}
    run = BackgroundRun(manifest, on_event=lambda e: on[e.kind].set() if e.kind in on else None)

    def committed_a() -> dict[int, BlockEntry]:
        """Stage a's committed blocks once there are 12 (b, held at the gate, consumes none)."""
        try:
            held = Journal.load(journal).stages["a"]["done"]
        except (FileNotFoundError, ValueError, KeyError):
            return {}
        return held if len(held) >= 12 else {}

    try:
        held = run.wait_for(committed_a, timeout_s=180)  # raises the run's error if it failed first
        assert len(held) >= 12, "stage a never got ahead"
        writers = Counter(lmdb_nodes(entry.locations)[0] for entry in held.values())
        victim_id, _ = writers.most_common(1)[0]
        on_victim = {b for b, entry in held.items() if entry.locations[0] == lmdb_location(victim_id)}
        assert all(len(entry.locations) >= 2 for entry in held.values()), "every block should have 2 copies"
        # b has consumed nothing, so the journal still holds every block a committed
        done_before = set(Journal.load(journal).stages["a"]["done"])
        seen_before = len(Path(log).read_text().splitlines())
        cluster.remove_node(next(w for w in cluster.workers if w.node_id == victim_id))
        # b stays held until the driver has noticed and a top-up copy has landed, so every
        # block of a is still waiting for it then, however loaded the machine (else b may
        # have read them all first)
        assert noticed.wait(timeout=120), "the driver never noticed the removed node"
        assert copied.wait(timeout=120), "no block that lost its copy was copied to another node"
    finally:
        gate.touch()  # b goes on, reading the removed node's blocks from their peer copies

    report = run.report(timeout_s=300)

    out = ds.dataset(str(ex / "out"), format="parquet", exclude_invalid_files=True).to_table().sort_by("id")
    ids = out["id"].to_pylist()
    assert ids == list(range(ROWS))
    assert out["v_a"].to_pylist() == [i + 1 for i in ids] and out["v_c"].to_pylist() == [i + 1 for i in ids]

    after = [line.split() for line in Path(log).read_text().splitlines()[seen_before:]]
    redone_a = sorted(int(b) for tag, b in after if tag == "a" and int(b) in done_before)
    assert redone_a == [], f"stage a re-ran committed blocks {redone_a}"
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["a"]["reexecutions"] == 0
    assert victim_id in [n["node"] for n in report["nodes_lost"]]  # noticed from Ray's node table
    # b read blocks whose writer node was gone: only their peer copies could serve them
    read_from_peer = {int(b) for tag, b in after if tag == "b"} & on_victim
    assert read_from_peer, "no block written on the removed node was read after its removal"
    assert stages["a"]["rereplicated"] >= 1  # blocks waiting for b were copied to a new node
    faults = report["telemetry"]["faults"]  # both on the run's timeline, the copies after the loss
    lost_at = min(f["t"] for f in faults if f["kind"] == "node_lost")
    assert any(f["kind"] == "rereplicated" and f["t"] >= lost_at for f in faults)


def test_a_node_that_keeps_failing_a_stage_is_excluded_from_it(tmp_path: Path, cluster: LocalCluster) -> None:
    from tierflow.driver import run_pipeline

    bad = cluster.workers[0].node_id
    ex = make_example(tmp_path / "ex", rows=2000)
    (ex / "steps.py").write_text(CODE)
    doc = {
        "name": "picky",
        "source": {"format": "parquet", "path": "data/", "block_rows": 100, "columns": ["id"]},
        "stages": [{"name": "p", "kind": "python", "fn": "steps:picky", "concurrency": 6, "max_attempts": 6,
                    "retry_on": ["OSError"], "params": {"bad_node": bad}}],
        "sink": {"path": "out/"},
        "cache": {"dir": str(tmp_path / "cache-{node}"), "remote_url": f"file://{tmp_path}/durable"},
    }
    manifest = ex / "picky.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    report = run_pipeline(manifest, progress_out=None)
    stage = report["stages"][0]
    assert stage["excluded_nodes"] == [bad], stage
    assert 3 <= stage["retries"] <= 3 + 6  # failures stop once the node is excluded (some were in flight)
    out = ds.dataset(str(ex / "out"), format="parquet", exclude_invalid_files=True).to_table()
    assert sorted(out["id"].to_pylist()) == list(range(2000))
