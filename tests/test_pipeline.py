"""``tierflow run`` end to end: the real CLI, a real local Ray, the real tritonserver.

The oracle is a plain single-process computation of the same stage functions and the
models' own NumPy code: the pipeline's output must hold exactly those rows and values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml

from example_copy import ROOT, make_example
from example_copy import load_module as load
pytestmark = [pytest.mark.ray, pytest.mark.triton]


def reference(example: Path) -> pa.Table:
    """The example pipeline computed in one process, without Ray or Triton."""
    stages = load(example / "review_stages.py", "ref_review_stages")
    embedder = load(ROOT / "triton_models/text_embedder/1/model.py", "ref_embedder")
    mlp = load(ROOT / "triton_models/mlp_classifier/1/model.py", "ref_mlp")
    doc = yaml.safe_load((example / "reviews.yaml").read_text())
    t = ds.dataset(example / "data").to_table()
    t = stages.clean(t, **doc["stages"][0]["params"])
    t = stages.featurize(t)
    text = np.array([s.encode() for s in t["text"].to_pylist()], dtype=object).reshape(-1, 1)
    emb = embedder.forward(text)["EMBEDDING"]
    t = t.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]))
    feats = t["features"].combine_chunks().values.to_numpy().reshape(t.num_rows, -1)
    out = mlp.forward(feats)
    t = t.append_column("probs", pa.FixedSizeListArray.from_arrays(pa.array(out["PROBS"].reshape(-1)), 4))
    t = t.append_column("label", pa.array(out["LABEL"].reshape(-1)))
    t = stages.Scorer(**doc["stages"][4]["params"])(t)
    return stages.finalize(t).sort_by("id")


def tierflow(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "tierflow", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    assert got.column_names == want.column_names
    ids = got["id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert ids == want["id"].to_pylist(), "missing or extra ids"
    for name in want.column_names:
        g, w = got[name].to_numpy(zero_copy_only=False), want[name].to_numpy(zero_copy_only=False)
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert g.tolist() == w.tolist(), name


def test_example_run_matches_single_process_reference(tmp_path: Path) -> None:
    ex = make_example(tmp_path / "ex", rows=3000)
    doc = yaml.safe_load((ex / "reviews.yaml").read_text())
    doc["source"]["block_rows"] = 500
    (ex / "reviews.yaml").write_text(yaml.safe_dump(doc))
    res = tierflow("run", str(ex / "reviews.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr
    out = ex / "out" / "reviews"
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows"] == 3000 and len(success["parts"]) == 6
    got = ds.dataset(out, format="parquet", exclude_invalid_files=True).to_table().sort_by("id")
    assert_same_rows(got, reference(ex))
    # the live table fell back to plain lines (stdout is a pipe) and a summary followed
    assert "[reviews] classify" in res.stdout and "summary" in res.stdout
    report = json.loads((ex / ".tierflow" / "reviews" / "report.json").read_text())
    assert report["status"] == "succeeded" and report["rows_out"] == 3000
    assert [s["blocks_done"] for s in report["stages"]] == [6] * 7


FAILING = """
name: failing
source: {format: parquet, path: data/, block_rows: 100}
stages:
  - {name: ok, kind: python, fn: "flaky:passthrough"}
  - {name: explode, kind: python, fn: "flaky:explode_on_block", params: {bad_id: 250}}
sink: {path: out/, mode: overwrite}
"""

FLAKY = '''
import pyarrow as pa

def passthrough(t: pa.Table) -> pa.Table:
    return t

def explode_on_block(t: pa.Table, bad_id: int) -> pa.Table:
    if bad_id in t["id"].to_pylist():
        raise ValueError(f"row {bad_id} is cursed")
    return t
'''


def test_failing_stage_names_stage_block_and_exception(tmp_path: Path) -> None:
    ex = make_example(tmp_path / "ex", rows=600)
    (ex / "flaky.py").write_text(FLAKY)
    (ex / "failing.yaml").write_text(FAILING)
    res = tierflow("run", "--quiet", str(ex / "failing.yaml"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "stage 'explode' failed on block 2" in res.stderr
    assert "ValueError: row 250 is cursed" in res.stderr
    assert not (ex / "out" / "_SUCCESS").exists()
    report = json.loads((ex / ".tierflow" / "failing" / "report.json").read_text())
    assert report["status"] == "failed" and "explode" in report["error"]


def test_triton_unreachable_names_the_url(tmp_path: Path) -> None:
    ex = make_example(tmp_path / "ex", rows=200)
    doc = yaml.safe_load((ex / "reviews.yaml").read_text())
    doc["triton"] = {"url": "127.0.0.1:9", "repository": str(ROOT / "triton_models"), "startup_timeout_s": 3}
    (ex / "reviews.yaml").write_text(yaml.safe_dump(doc))
    started = time.monotonic()
    res = tierflow("run", "--quiet", str(ex / "reviews.yaml"))
    assert res.returncode == 1
    assert "127.0.0.1:9" in res.stderr and "not live after 3s" in res.stderr
    assert time.monotonic() - started < 60
    assert not (ex / "out" / "reviews" / "_SUCCESS").exists()


def test_bad_manifest_is_rejected_before_any_cluster_work(tmp_path: Path) -> None:
    ex = make_example(tmp_path / "ex", rows=10)
    doc = yaml.safe_load((ex / "reviews.yaml").read_text())
    doc["stages"][0]["fn"] = "review_stages:missing"
    doc["stages"][1]["kind"] = "gpu"
    (ex / "reviews.yaml").write_text(yaml.safe_dump(doc))
    for cmd in ("validate", "run"):
        started = time.monotonic()
        res = tierflow(cmd, str(ex / "reviews.yaml"))
        assert res.returncode == 2, res.stderr
        assert str(ex / "reviews.yaml") in res.stderr
        assert "stages[1]" in res.stderr and "'gpu'" in res.stderr
        assert time.monotonic() - started < 30  # no Ray start, no Triton start
    assert not (ex / ".tierflow").exists()


def test_intermediate_blocks_are_deleted_unless_checkpointed(tmp_path: Path) -> None:
    ex = make_example(tmp_path / "ex", rows=600)
    (ex / "flaky.py").write_text(FLAKY)
    doc = yaml.safe_load(FAILING)
    doc["stages"][1]["params"] = {"bad_id": -1}
    doc["stages"].append({"name": "last", "kind": "python", "fn": "flaky:passthrough", "checkpoint": True})
    doc["stages"][0]["checkpoint"] = True
    (ex / "ok.yaml").write_text(yaml.safe_dump(doc))
    res = tierflow("run", "--quiet", str(ex / "ok.yaml"))
    assert res.returncode == 0, res.stderr
    keys = tierflow("cache", "ls", "-m", str(ex / "ok.yaml"), "--pipeline", "failing").stdout.split()
    stages = sorted({k.split("/")[2] for k in keys})
    assert stages == ["last", "ok"]  # 'explode' was consumed and dropped; checkpoints kept
    assert len(keys) == 12


def test_several_triton_urls_one_of_them_down(tmp_path: Path, triton_server) -> None:  # type: ignore[no-untyped-def]
    ex = make_example(tmp_path / "ex", rows=1000)
    doc = yaml.safe_load((ex / "reviews.yaml").read_text())
    doc["source"]["block_rows"] = 250
    doc["triton"] = {"url": ["127.0.0.1:9", triton_server.grpc_url], "repository": str(ROOT / "triton_models")}
    (ex / "reviews.yaml").write_text(yaml.safe_dump(doc))
    res = tierflow("run", "--quiet", str(ex / "reviews.yaml"))
    assert res.returncode == 0, res.stderr
    got = ds.dataset(ex / "out" / "reviews", format="parquet", exclude_invalid_files=True).to_table().sort_by("id")
    assert_same_rows(got, reference(ex))
