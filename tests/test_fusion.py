"""``fuse: true``: a fn stage runs in the same task or actor as the stage after it, and
its output is not cached. Validation and planning without Ray, then a real run."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from tierflow.errors import ManifestError
from tierflow.manifest import load_manifest
from tierflow.plan import make_plan

CODE = '''
import os

import pyarrow.compute as pc


def add(t, col, k):
    return t.append_column(col, pc.add(t["id"], k))


class Tag:
    def __init__(self):
        self.pid = os.getpid()

    def __call__(self, t):
        return t.append_column("pid", pc.add(pc.multiply(t["id"], 0), self.pid))
'''


def job(tmp_path: Path, stages: list[dict]) -> Path:  # type: ignore[type-arg]
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "fused_stages.py").write_text(CODE)
    pq.write_table(pa.table({"id": pa.array(range(600), pa.int64())}), tmp_path / "data" / "a.parquet")
    doc = {"name": "fusion", "source": {"format": "parquet", "path": "data/", "block_rows": 100},
           "stages": stages, "sink": {"path": "out/", "mode": "overwrite"}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def add(name: str, k: int, **extra: object) -> dict:  # type: ignore[type-arg]
    return {"name": name, "kind": "python", "fn": "fused_stages:add", "params": {"col": name, "k": k}, **extra}


TAG = {"name": "tag", "kind": "python", "cls": "fused_stages:Tag", "concurrency": 1, "num_cpus": 0.5}


@pytest.mark.parametrize(
    ("stages", "reason"),
    [
        ([add("a", 1), add("b", 2, fuse=True)], "needs a stage after it"),
        ([{**TAG, "fuse": True}, add("b", 2)], "only fn stages can be fused"),
        ([add("a", 1, fuse=True, concurrency=4, retry_on=["OSError"]), add("b", 2)],
         "runs it in stage 'b''s step, which decides concurrency, retry_on; set them there"),
    ],
)
def test_bad_fusion_is_rejected_before_any_work(tmp_path: Path, stages: list[dict], reason: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ManifestError) as info:
        load_manifest(job(tmp_path, stages))
    assert any(reason in why for _, why in info.value.problems), info.value.problems


def test_fused_stages_join_the_next_step_and_keep_its_keys(tmp_path: Path) -> None:
    digest = lambda model: model  # noqa: E731 - no Triton stage here
    fused = make_plan(load_manifest(job(tmp_path, [add("a", 1, fuse=True), add("b", 2, fuse=True), TAG,
                                                   add("c", 3)])), digest)
    plain_yaml = tmp_path / "plain.yaml"  # the same job (same data files), nothing fused
    plain_yaml.write_text((tmp_path / "m.yaml").read_text().replace("fuse: true", "fuse: false"))
    plain = make_plan(load_manifest(plain_yaml), digest)
    assert [(s.name, [f.name for f in s.fused]) for s in fused.stages] == [("tag", ["a", "b"]), ("c", [])]
    assert [s.name for s in fused.stages[0].chain] == ["a", "b", "tag"]
    # fusing changes where blocks are cached, not what they hold: the keys stay the same
    assert fused.key(0, 3) == plain.key(2, 3) and fused.key(1, 3) == plain.key(3, 3)


@pytest.mark.ray
def test_a_fused_run_gives_the_same_output_in_fewer_steps(tmp_path: Path) -> None:
    from tierflow.driver import run_pipeline

    manifest = job(tmp_path, [add("a", 1, fuse=True), add("b", 2, fuse=True), TAG, add("c", 3)])
    report = run_pipeline(manifest, progress_out=None)
    out = ds.dataset(str(tmp_path / "out"), format="parquet", exclude_invalid_files=True).to_table().sort_by("id")
    ids = out["id"].to_pylist()
    assert ids == list(range(600))
    assert out["a"].to_pylist() == [i + 1 for i in ids] and out["c"].to_pylist() == [i + 3 for i in ids]
    assert len(set(out["pid"].to_pylist())) == 1  # a and b ran inside the one Tag actor
    steps = {s["name"]: s for s in report["stages"]}
    assert list(steps) == ["tag", "c", "sink"]
    assert steps["tag"]["fused"] == ["a", "b"] and steps["tag"]["executions"] == 6
