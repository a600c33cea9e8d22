"""``tierflow run --address``: join an existing multi-node cluster whose nodes do not have
the stage code; the modules next to the manifest are shipped with the job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.ray

FN_MODULE = '''
import pyarrow.compute as pc


def triple(t):
    return t.append_column("tripled", pc.multiply(t["id"], 3))
'''

PACKAGE_INIT = '''
import os

import pyarrow as pa
import pyarrow.compute as pc


class Offset:
    def __init__(self, by):
        self.by = by
        self.pid = os.getpid()

    def __call__(self, t):
        return t.append_column("offset", pc.add(t["tripled"], self.by))
'''


@pytest.fixture()
def cluster() -> Any:
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=2)
    c.add_node(num_cpus=2)
    try:
        yield c
    finally:
        c.shutdown()


def test_run_joins_a_cluster_and_ships_the_stage_code(tmp_path: Path, cluster: Any) -> None:
    job = tmp_path / "job"
    (job / "data").mkdir(parents=True)
    (job / "my_fns.py").write_text(FN_MODULE)
    (job / "my_pkg").mkdir()
    (job / "my_pkg" / "__init__.py").write_text(PACKAGE_INIT)
    pq.write_table(pa.table({"id": pa.array(range(1000), pa.int64())}), job / "data" / "a.parquet")
    doc = {
        "name": "joined",
        "source": {"format": "parquet", "path": "data/", "block_rows": 100},
        "stages": [
            {"name": "triple", "kind": "python", "fn": "my_fns:triple"},
            {"name": "offset", "kind": "python", "cls": "my_pkg:Offset", "concurrency": 1, "num_cpus": 0.5,
             "params": {"by": 7}},
        ],
        "sink": {"path": "out/"},
        "cache": {"dir": str(tmp_path / "cache-{node}"), "remote_url": f"file://{tmp_path}/store"},
    }
    manifest = job / "joined.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def tierflow(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tierflow", *args], cwd=tmp_path, timeout=300,
                              env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True)

    # validate --address: the cluster's nodes checked before anything is started on them
    doc["stages"][0]["num_gpus"] = 1
    greedy = job / "greedy.yaml"
    greedy.write_text(yaml.safe_dump(doc))
    res = tierflow("validate", "--address", cluster.address, str(greedy))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "greedy.yaml" in res.stderr and "stages[0]" in res.stderr and "GPU" in res.stderr
    assert tierflow("validate", str(greedy)).returncode == 0  # without a cluster there is nothing to hold it to

    res = tierflow("run", "--quiet", "--address", cluster.address, str(manifest))
    assert res.returncode == 0, res.stderr[-3000:]
    out = ds.dataset(str(job / "out"), format="parquet", exclude_invalid_files=True).to_table().sort_by("id")
    assert out["id"].to_pylist() == list(range(1000))
    assert out["offset"].to_pylist() == [3 * i + 7 for i in range(1000)]
