"""Failures of user code and hung work on a real local Ray: retry_on, dead letters,
per-block timeouts and speculative copies of stragglers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from example_copy import make_example

pytestmark = pytest.mark.ray

ROWS, BLOCK_ROWS = 1200, 100
BLOCKS = ROWS // BLOCK_ROWS

CODE = '''
import os
import time


class Flaky(Exception):
    pass


def _first_time(marker):
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def once(t, marker, block, action, seconds=0.0):
    """On block ``block``, the first attempt ever misbehaves: raise, hang or dawdle."""
    if t["id"][0].as_py() // %d == block and _first_time(marker):
        if action == "raise":
            raise Flaky("transient trouble")
        time.sleep(seconds)
    return t


def always_fails_on(t, block):
    if t["id"][0].as_py() // %d == block:
        raise ValueError(f"block {block} is poison")
    return t


def rejects_ids(t, bad):
    """Fails on any batch holding one of the ``bad`` ids (a row-level problem)."""
    hit = sorted(set(bad) & set(t["id"].to_pylist()))
    if hit:
        raise ValueError(f"id {hit[0]} cannot be parsed")
    return t


class BrokenFirst:
    """The first actor ever constructed fails every block it gets; later ones work."""

    def __init__(self, marker):
        self.broken = _first_time(marker)

    def __call__(self, t):
        if self.broken:
            raise Flaky("this actor is broken")
        return t


def steady(t, seconds):
    time.sleep(seconds)
    return t
''' % (BLOCK_ROWS, BLOCK_ROWS)


def pipeline(tmp_path: Path, stages: list[dict]) -> Path:  # type: ignore[type-arg]
    ex = make_example(tmp_path / "ex", rows=ROWS)
    (ex / "trouble.py").write_text(CODE)
    doc = {
        "name": "failures",
        "source": {"format": "parquet", "path": "data/", "block_rows": BLOCK_ROWS, "columns": ["id"]},
        "stages": stages,
        "sink": {"path": "out/", "mode": "error"},
    }
    path = ex / "failures.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(manifest: Path) -> tuple[subprocess.CompletedProcess[str], dict]:  # type: ignore[type-arg]
    res = subprocess.run(
        [sys.executable, "-m", "tierflow", "run", "--quiet", str(manifest)],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=300,
    )
    report = json.loads((manifest.parent / ".tierflow" / "failures" / "report.json").read_text())
    return res, report


def ids(manifest: Path) -> list[int]:
    t = ds.dataset(str(manifest.parent / "out"), format="parquet", exclude_invalid_files=True).to_table()
    return sorted(t["id"].to_pylist())


def test_retry_on_lists_the_user_exceptions_worth_retrying(tmp_path: Path) -> None:
    marker = str(tmp_path / "m")
    stage = {"name": "flaky", "kind": "python", "fn": "trouble:once",
             "params": {"marker": marker, "block": 3, "action": "raise"}}
    res, report = run(pipeline(tmp_path / "a", [{**stage, "retry_on": ["trouble.Flaky"]}]))
    assert res.returncode == 0, res.stderr
    assert ids(tmp_path / "a" / "ex" / "failures.yaml") == list(range(ROWS))
    assert report["stages"][0]["retries"] == 1

    os.remove(marker)
    res, report = run(pipeline(tmp_path / "b", [stage]))  # not listed: fail fast
    assert res.returncode == 1
    assert "stage 'flaky' failed on block 3" in res.stderr and "Flaky: transient trouble" in res.stderr
    assert report["stages"][0]["retries"] == 0


def test_on_error_skip_writes_dead_letters_and_counts_them(tmp_path: Path) -> None:
    manifest = pipeline(tmp_path, [
        {"name": "poison", "kind": "python", "fn": "trouble:always_fails_on", "params": {"block": 5},
         "on_error": "skip", "max_attempts": 2, "retry_on": ["ValueError"]},
    ])
    res, report = run(manifest)
    assert res.returncode == 0, res.stderr
    out = manifest.parent / "out"
    assert ids(manifest) == [i for i in range(ROWS) if i // BLOCK_ROWS != 5]
    letter = json.loads((out / "_dead_letters" / "poison" / "block-000005.json").read_text())
    assert letter["rows"] == BLOCK_ROWS and "block 5 is poison" in letter["error"]
    saved = ds.dataset(str(out / "_dead_letters" / "poison" / "block-000005.parquet")).to_table()
    assert saved["id"].to_pylist() == list(range(500, 600))
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["dead_letters"] == {"poison": {"blocks": 1, "rows": 0}}
    assert success["rows"] == ROWS - BLOCK_ROWS
    stage = report["stages"][0]
    assert (stage["dead_letters"], stage["retries"]) == (1, 1)


def test_on_error_skip_rows_sets_aside_only_the_failing_rows(tmp_path: Path) -> None:
    bad = [7, 250, 251, 1199]
    manifest = pipeline(tmp_path, [
        {"name": "parse", "kind": "python", "fn": "trouble:rejects_ids", "params": {"bad": bad},
         "on_error": "skip_rows", "checkpoint": True},
        {"name": "after", "kind": "python", "fn": "trouble:steady", "params": {"seconds": 0}},
    ])
    res, report = run(manifest)
    assert res.returncode == 0, res.stderr
    assert ids(manifest) == [i for i in range(ROWS) if i not in bad]
    letters = manifest.parent / "out" / "_dead_letters" / "parse"
    saved = ds.dataset(str(letters), format="parquet").to_table().sort_by("id")
    assert saved["id"].to_pylist() == bad
    assert saved["_row"].to_pylist() == [i % BLOCK_ROWS for i in bad]
    assert saved["_error"].to_pylist() == [f"ValueError: id {i} cannot be parsed" for i in bad]
    assert sorted(p.name for p in letters.iterdir()) == [
        "block-000000.rows.parquet", "block-000002.rows.parquet", "block-000011.rows.parquet"]
    success = json.loads((manifest.parent / "out" / "_SUCCESS").read_text())
    assert success["rows"] == ROWS - len(bad)
    assert success["dead_letters"] == {"parse": {"blocks": 0, "rows": len(bad)}}
    stage = report["stages"][0]
    assert (stage["dead_letters"], stage["dead_letter_rows"], stage["retries"]) == (0, len(bad), 0)
    assert stage["rows_out"] == ROWS - len(bad) and report["stages"][1]["rows_out"] == ROWS - len(bad)

    # A re-run reuses the committed blocks and still reports the rows set aside before.
    manifest.with_name("again.yaml").write_text(
        manifest.read_text().replace("mode: error", "mode: overwrite"))
    res, report = run(manifest.with_name("again.yaml"))
    assert res.returncode == 0, res.stderr
    assert report["stages"][0]["executions"] == 0 and report["stages"][0]["reused"] == BLOCKS
    success = json.loads((manifest.parent / "out" / "_SUCCESS").read_text())
    assert success["dead_letters"] == {"parse": {"blocks": 0, "rows": len(bad)}}


def test_an_actor_that_keeps_failing_is_retired(tmp_path: Path) -> None:
    manifest = pipeline(tmp_path, [
        {"name": "model", "kind": "python", "cls": "trouble:BrokenFirst", "concurrency": 1,
         "params": {"marker": str(tmp_path / "m")}, "retry_on": ["Flaky"], "max_attempts": 4},
    ])
    res, report = run(manifest)
    assert res.returncode == 0, res.stderr
    assert ids(manifest) == list(range(ROWS))
    stage = report["stages"][0]
    assert stage["retired_actors"] == 1 and stage["retries"] == 3  # 3 strikes, then a fresh actor


def test_block_timeout_cancels_a_hung_attempt_and_retries_it(tmp_path: Path) -> None:
    manifest = pipeline(tmp_path, [
        {"name": "hang", "kind": "python", "fn": "trouble:once", "block_timeout_s": 8, "speculate_after": None,
         "params": {"marker": str(tmp_path / "m"), "block": 2, "action": "sleep", "seconds": 120}},
    ])
    started = time.monotonic()
    res, report = run(manifest)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started < 90
    assert ids(manifest) == list(range(ROWS))
    stage = report["stages"][0]
    # the hung attempt was cancelled; on a loaded machine a slow retry may time out too
    assert stage["timeouts"] >= 1 and stage["retries"] == stage["timeouts"]


def test_straggler_gets_a_speculative_copy(tmp_path: Path) -> None:
    manifest = pipeline(tmp_path, [
        {"name": "steady", "kind": "python", "fn": "trouble:steady", "params": {"seconds": 0.05}},
        {"name": "slowpoke", "kind": "python", "fn": "trouble:once", "speculate_after": 2,
         "params": {"marker": str(tmp_path / "m"), "block": 10, "action": "sleep", "seconds": 120}},
    ])
    started = time.monotonic()
    res, report = run(manifest)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started < 90  # the copy finished; the straggler was abandoned
    assert ids(manifest) == list(range(ROWS))
    slow = report["stages"][1]
    assert slow["speculated"] == 1 and slow["executions"] == BLOCKS + 1
