"""Kill a real ``tierflow run`` and run it again: it resumes with exactly-once output.

The CLI runs as a subprocess; tests wait on the journal (never on sleeps) before killing.
Every stage appends "<stage> <block>" to an execution log from inside the worker, so
re-executions are counted outside the engine's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml
from example_copy import make_example

from tierflow.engine.journal import Journal

pytestmark = pytest.mark.ray

ROWS, BLOCK_ROWS = 2000, 100
BLOCKS = ROWS // BLOCK_ROWS
STAGES = ["a", "b", "c"]

STEP_CODE = '''
import time
import pyarrow as pa
import pyarrow.compute as pc


def _log(path, tag, t):
    with open(path, "a") as fh:
        fh.write(f"{tag} {t['id'][0].as_py() // %d}\\n")


def step(t, tag, log, delay_s=0.0, factor=2):
    _log(log, tag, t)
    time.sleep(delay_s)
    return t.append_column(f"v_{tag}", pc.multiply(t["id"], factor))


class Step:
    def __init__(self, tag, log, delay_s=0.0):
        self.tag, self.log, self.delay_s = tag, log, delay_s

    def __call__(self, t):
        return step(t, self.tag, self.log, self.delay_s, 3)
''' % BLOCK_ROWS


def make_pipeline(
    d: Path, mode: str = "error", checkpoint_a: bool = False, factor_b: int = 2, delay_b: float = 0.25
) -> Path:
    make_example(d, rows=ROWS) if not (d / "data").exists() else None
    (d / "steps.py").write_text(STEP_CODE)
    log = str(d / "executions.log")
    doc = {
        "name": "resumable",
        "source": {"format": "parquet", "path": "data/", "block_rows": BLOCK_ROWS, "columns": ["id", "rating"]},
        "stages": [
            {"name": "a", "kind": "python", "fn": "steps:step", "checkpoint": checkpoint_a,
             "params": {"tag": "a", "log": log, "delay_s": 0.02}},
            {"name": "b", "kind": "python", "fn": "steps:step", "concurrency": 2,
             "params": {"tag": "b", "log": log, "delay_s": delay_b, "factor": factor_b}},
            {"name": "c", "kind": "python", "cls": "steps:Step", "concurrency": 1, "num_cpus": 0.5,
             "params": {"tag": "c", "log": log}},
        ],
        "sink": {"path": "out/", "mode": mode},
    }
    path = d / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start(manifest: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tierflow", "run", "--quiet", str(manifest)],
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def run(manifest: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierflow", "run", "--quiet", *args, str(manifest)],
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **env}, capture_output=True, text=True, timeout=300,
    )


def journal_path(d: Path) -> Path:
    return d / ".tierflow" / "store" / "_journal" / "resumable" / "journal.json"


def read_journal(d: Path) -> dict:  # type: ignore[type-arg]
    """The journal's whole state (its snapshot plus deltas), as the snapshot's JSON has it."""
    if not journal_path(d).exists():
        return {}
    return json.loads(json.dumps(Journal.load(str(journal_path(d).parent)).document()))  # type: ignore[no-any-return]


def wait_for(cond, proc: subprocess.Popen[str], timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def committed_pairs(journal: dict) -> set[tuple[str, int]]:  # type: ignore[type-arg]
    """(stage, block) pairs the journal says were committed: a block's later output implies
    its earlier stages were done too."""
    reach: dict[int, int] = {}
    for i, name in enumerate(STAGES):
        for b in journal.get("stages", {}).get(name, {}).get("done", {}):
            reach[int(b)] = max(reach.get(int(b), -1), i)
    for b in journal.get("parts", {}):
        reach[int(b)] = len(STAGES)
    return {(STAGES[i], b) for b, r in reach.items() for i in range(min(r + 1, len(STAGES)))}


def log_lines(d: Path) -> list[tuple[str, int]]:
    try:
        text = (d / "executions.log").read_text()
    except FileNotFoundError:
        return []
    return [(tag, int(b)) for tag, b in (line.split() for line in text.splitlines())]


def output(d: Path):  # type: ignore[no-untyped-def]
    success = json.loads((d / "out" / "_SUCCESS").read_text())
    files = [str(d / "out" / p["name"]) for p in success["parts"]]
    return ds.dataset(files).to_table().sort_by("id"), success


def report(d: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((d / ".tierflow" / "resumable" / "report.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("reference")
    res = run(make_pipeline(d))
    assert res.returncode == 0, res.stderr
    table, _ = output(d)
    assert table.num_rows == ROWS
    return table


def assert_exactly_once(d: Path, reference) -> None:  # type: ignore[no-untyped-def]
    table, success = output(d)
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == ROWS and success["rows"] == ROWS
    assert table.equals(reference)


def test_sigkill_at_half_then_resume(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    manifest = make_pipeline(tmp_path)
    proc = start(manifest)
    wait_for(lambda: len(read_journal(tmp_path).get("parts", {})) >= BLOCKS // 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = read_journal(tmp_path)
    done_before = committed_pairs(at_kill)
    seen_before = len(log_lines(tmp_path))
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert at_kill["state"] == "running"

    res = run(manifest)
    assert res.returncode == 0, res.stderr
    assert_exactly_once(tmp_path, reference)
    redone = [p for p in log_lines(tmp_path)[seen_before:] if p in done_before]
    assert redone == [], f"committed blocks executed again: {redone}"
    rep = report(tmp_path)
    assert all(s["reexecutions"] == 0 for s in rep["stages"])
    sink = rep["stages"][-1]
    assert sink["reused"] >= BLOCKS // 2 and sink["executions"] + sink["reused"] == BLOCKS


def test_sigkill_between_last_part_and_success(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    manifest = make_pipeline(tmp_path)
    res = run(manifest, TIERFLOW_CRASH_AT="before_success")
    assert res.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == BLOCKS
    seen_before = len(log_lines(tmp_path))

    res = run(manifest)
    assert res.returncode == 0, res.stderr
    assert_exactly_once(tmp_path, reference)
    assert log_lines(tmp_path)[seen_before:] == []  # nothing recomputed, nothing rewritten
    assert [s["executions"] for s in report(tmp_path)["stages"]] == [0, 0, 0, 0]


def test_sigkill_while_the_journal_is_written(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    manifest = make_pipeline(tmp_path)
    res = run(manifest, TIERFLOW_CRASH_AT="journal_write:3")
    assert res.returncode == -signal.SIGKILL
    # the third write is the first delta or a compaction's snapshot, depending on sizes
    leftovers = list(journal_path(tmp_path).parent.glob(".*.json.*.tmp"))
    assert leftovers, "the crash should have left the journal's temp file behind"
    journal = read_journal(tmp_path)
    assert journal["state"] == "running"  # the previous, complete journal is still readable
    done_before = committed_pairs(journal)
    seen_before = len(log_lines(tmp_path))

    res = run(manifest)
    assert res.returncode == 0, res.stderr
    assert_exactly_once(tmp_path, reference)
    assert [p for p in log_lines(tmp_path)[seen_before:] if p in done_before] == []


def test_changing_one_stage_reruns_it_and_later_stages_only(tmp_path: Path) -> None:
    manifest = make_pipeline(tmp_path, mode="overwrite", checkpoint_a=True)
    assert run(manifest).returncode == 0
    seen_before = len(log_lines(tmp_path))
    make_pipeline(tmp_path, mode="overwrite", checkpoint_a=True, factor_b=5)

    res = run(manifest)
    assert res.returncode == 0, res.stderr
    executed = {tag for tag, _ in log_lines(tmp_path)[seen_before:]}
    assert executed == {"b", "c"}
    stages = {s["name"]: s for s in report(tmp_path)["stages"]}
    assert (stages["a"]["executions"], stages["a"]["reused"]) == (0, BLOCKS)
    assert stages["b"]["executions"] == stages["c"]["executions"] == BLOCKS
    table, _ = output(tmp_path)
    assert table["v_b"].to_pylist() == [i * 5 for i in range(ROWS)]


def test_second_driver_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    manifest = make_pipeline(tmp_path, delay_b=1.0)
    first = start(manifest)
    wait_for(lambda: read_journal(tmp_path).get("state") == "running", first)
    second = run(manifest)
    assert second.returncode == 1
    assert "is being run by" in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_fresh_starts_over(tmp_path: Path) -> None:
    manifest = make_pipeline(tmp_path, mode="overwrite")
    assert run(manifest).returncode == 0
    res = run(manifest, "--fresh")
    assert res.returncode == 0, res.stderr
    assert [s["executions"] for s in report(tmp_path)["stages"]] == [BLOCKS] * 4
