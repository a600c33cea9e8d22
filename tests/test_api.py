"""The front door from a notebook's point of view: ``tierflow.run`` twice in one process,
a manifest built in Python, a typed report, events instead of monkeypatching, and
``tierflow.status`` without Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tierflow

CODE = '''
import pyarrow.compute as pc


def double(t):
    return t.set_column(0, "id", pc.multiply(t["id"], 2))
'''


def manifest(tmp_path: Path, cache: str) -> tierflow.Manifest:
    """A manifest built in Python (no YAML file), with its own cache directory."""
    from tierflow.manifest import parse_manifest

    if not (tmp_path / "data").exists():  # written once: a rewritten source is a new source
        (tmp_path / "api_stages.py").write_text(CODE)
        (tmp_path / "data").mkdir()
        pq.write_table(pa.table({"id": pa.array(range(500), pa.int64())}), tmp_path / "data" / "a.parquet")
    doc = {"name": "api", "source": {"format": "parquet", "path": "data/", "block_rows": 100},
           "stages": [{"name": "double", "kind": "python", "fn": "api_stages:double"}],
           "sink": {"path": f"out-{cache}/", "mode": "overwrite"}, "cache": {"dir": cache}}
    return parse_manifest(doc, base_dir=str(tmp_path))


def test_the_public_names_import_neither_ray_nor_tritonclient() -> None:
    code = "import sys, tierflow; print(sorted(m for m in ('ray', 'tritonclient') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_validate_names_the_problem_before_any_cluster_work(tmp_path: Path) -> None:
    m = manifest(tmp_path, "c0").model_copy(update={"stages": (
        manifest(tmp_path, "c0").stages[0].model_copy(update={"fn": "api_stages:absent"}),)})
    with pytest.raises(tierflow.ManifestError, match="absent"):
        tierflow.validate(m)


@pytest.mark.ray
def test_two_runs_in_one_process_each_with_its_own_cache_and_events(tmp_path: Path) -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        events: list[tierflow.Event] = []
        first = tierflow.run(manifest(tmp_path, "c1"), on_event=events.append)
        assert isinstance(first, tierflow.RunReport) and first.status == "succeeded"
        assert first.rows_out == 500 and first.stage("double").blocks_done == 5
        kinds = [e.kind for e in events]
        assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
        committed = [(e.stage, e.block) for e in events if e.kind == "block_committed"]
        assert sorted(committed) == sorted([(s, b) for s in ("double", "sink") for b in range(5)])
        assert [e.stage for e in events if e.kind == "stage_started"] == ["double", "sink"]

        second = tierflow.run(manifest(tmp_path, "c2"))  # again, same process, same Ray, another cache
        assert second.rows_out == 500 and second.stage("double").reused == 0
        assert (tmp_path / "c2").is_dir()
        out = pq.read_table(tmp_path / "out-c2").column("id").to_pylist()
        assert sorted(out) == [2 * i for i in range(500)]
        again = tierflow.run(manifest(tmp_path, "c2"))  # resumes: nothing recomputed
        assert again.stage("double").reused == 5 and again.stage("double").executions == 0
        assert tierflow.RunReport.from_dict(again.to_dict()) == again
    finally:
        ray.shutdown()
    st = tierflow.status(manifest(tmp_path, "c2"))
    assert st.state == "succeeded" and st.sink_parts == 5 and st.sink_rows == 500
