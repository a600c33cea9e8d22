"""Journal, lease and resume points on a real local filesystem (no Ray)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tierflow.engine.journal import Journal, PipelineBusy
from tierflow.io.sink import PartMeta


def fresh(tmp_path: Path) -> Journal:
    return Journal.load(str(tmp_path / "j"))


def test_round_trip_and_fingerprint_change_forgets_the_stage(tmp_path: Path) -> None:
    j = fresh(tmp_path)
    j.begin("p", 3, {"a": "fa", "b": "fb"}, "fs")
    j.record_block("a", 0, 10, 100, "xxh3-128:00", ("lmdb:n1", "remote"))
    j.record_block("b", 1, 10, 100, "xxh3-128:01", ("remote",))
    j.record_part(2, PartMeta("part-000002.parquet", 10, 500, "ab"))
    j.finish("failed")
    back = fresh(tmp_path)
    assert back.state == "failed" and back.committed("a", "fa") == {0: [10, 100, "xxh3-128:00", ["lmdb:n1", "remote"]]}
    assert back.parts[2] == PartMeta("part-000002.parquet", 10, 500, "ab")
    back.begin("p", 3, {"a": "fa", "b": "fb-changed"}, "fs")
    assert back.committed("a", "fa") and back.committed("b", "fb-changed") == {}
    back.begin("p", 3, {"a": "fa", "b": "fb-changed"}, "fs-changed")
    assert back.parts == {}  # parts of another final output are not ours


def test_flush_is_rate_limited_and_atomic(tmp_path: Path) -> None:
    j = Journal.load(str(tmp_path / "j"), interval_s=3600)
    j.begin("p", 1, {"a": "fa"}, "fs")
    j.record_block("a", 0, 1, 1, "c", ())
    assert j.flush() is False  # too soon
    assert j.flush(force=True) is True
    files = sorted(p.name for p in (tmp_path / "j").iterdir())
    assert files == ["journal.json", "lease.json"]  # no temp files left behind
    assert json.loads((tmp_path / "j" / "journal.json").read_text())["stages"]["a"]["done"] == {"0": [1, 1, "c", []]}


def test_lease_refuses_a_live_holder_and_expires(tmp_path: Path) -> None:
    first = fresh(tmp_path)
    first.acquire_lease()
    second = fresh(tmp_path)
    with pytest.raises(PipelineBusy, match=f"pid {os.getpid()}"):
        second.acquire_lease()
    lease = json.loads((tmp_path / "j" / "lease.json").read_text())
    lease["expires_at"] = time.time() - 1
    (tmp_path / "j" / "lease.json").write_text(json.dumps(lease))
    second.acquire_lease()  # expired: taken over
    assert second.lease()["owner"] == second.owner  # type: ignore[index]
    second.release_lease()
    assert second.lease() is None


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    first = fresh(tmp_path)
    first.acquire_lease()
    lease = json.loads((tmp_path / "j" / "lease.json").read_text())
    lease["pid"] = 2**22 + 12345  # no such process
    (tmp_path / "j" / "lease.json").write_text(json.dumps(lease))
    fresh(tmp_path).acquire_lease()
