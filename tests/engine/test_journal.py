"""Journal, lease and resume points on a real local filesystem (no Ray)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from s3_endpoint import S3Endpoint

from tierflow.engine.journal import BlockEntry, Journal
from tierflow.errors import PipelineBusy, StoreError
from tierflow.io.fs import filesystem
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
    assert back.state == "failed" and back.committed("a", "fa") == {0: BlockEntry(10, 100, "xxh3-128:00", ("lmdb:n1", "remote"))}
    assert back.parts[2] == PartMeta("part-000002.parquet", 10, 500, "ab")
    back.begin("p", 3, {"a": "fa", "b": "fb-changed"}, "fs")
    assert back.committed("a", "fa") and back.committed("b", "fb-changed") == {}
    back.begin("p", 3, {"a": "fa", "b": "fb-changed"}, "fs-changed")
    assert back.parts == {}  # parts of another final output are not ours


def test_block_entries_are_typed_in_memory_and_rows_on_disk(tmp_path: Path) -> None:
    j = fresh(tmp_path)
    j.begin("p", 1, {"a": "fa"}, "fs")
    j.record_block("a", 0, 10, 100, "xxh3-128:00", ("lmdb:n1",))
    j.add_locations("a", 0, ("lmdb:n2",))
    assert j.flush(force=True)
    delta = json.loads((tmp_path / "j" / "delta-000000000001.json").read_text())
    assert delta["ops"] == [["done", "a", 0, [10, 100, "xxh3-128:00", ["lmdb:n1", "lmdb:n2"]]]]
    j.finish("succeeded")
    snapshot = json.loads((tmp_path / "j" / "journal.json").read_text())
    assert snapshot["stages"]["a"]["done"] == {"0": [10, 100, "xxh3-128:00", ["lmdb:n1", "lmdb:n2"]]}
    entry = fresh(tmp_path).committed("a", "fa")[0]
    assert (entry.rows, entry.nbytes, entry.checksum, entry.locations) == (10, 100, "xxh3-128:00", ("lmdb:n1", "lmdb:n2"))
    assert BlockEntry.from_row(entry.row()) == entry


def test_flush_is_rate_limited_and_atomic(tmp_path: Path) -> None:
    j = Journal.load(str(tmp_path / "j"), interval_s=3600)
    j.begin("p", 1, {"a": "fa"}, "fs")
    j.record_block("a", 0, 1, 1, "c", ())
    assert j.flush() is False  # too soon
    assert j.flush(force=True) is True
    files = sorted(p.name for p in (tmp_path / "j").iterdir())
    assert files == ["delta-000000000001.json", "journal.json", "lease.json"]  # no temp files left behind
    delta = json.loads((tmp_path / "j" / "delta-000000000001.json").read_text())
    assert delta["ops"] == [["done", "a", 0, [1, 1, "c", []]]]
    assert json.loads((tmp_path / "j" / "journal.json").read_text())["stages"]["a"]["done"] == {}


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


# -- the log: snapshot + deltas ------------------------------------------------------------

def deltas(d: Path) -> list[Path]:
    return sorted(d.glob("delta-*.json"))


def state(j: Journal) -> dict:  # type: ignore[type-arg]
    doc = j.document()
    return {k: v for k, v in json.loads(json.dumps(doc)).items() if k not in ("updated_at", "seq")}


def periodic(j: Journal) -> bool:
    """A periodic flush, once its spacing (10x the last write's time) has passed."""
    time.sleep(10 * j._write_s + 0.001)
    return j.flush()


def big_begun_at(url: str, storage_options: dict | None = None, parts: int = 2000) -> Journal:  # type: ignore[type-arg]
    """A running journal whose snapshot holds ``parts`` parts, so that small deltas stay
    below the compaction threshold."""
    j = Journal.load(url, storage_options, interval_s=0)
    j.begin("p", parts + 100, {"a": "fa", "b": "fb"}, "fs")
    for b in range(parts):
        j.record_part(b, PartMeta(f"part-{b:06d}.parquet", 100, 5000, f"{b:032x}"))
    assert j.flush(force=True)
    assert j._delta_count == 0  # that delta outweighed the snapshot: compacted
    return j


def big_begun(tmp_path: Path, parts: int = 2000) -> Journal:
    return big_begun_at(str(tmp_path / "j"), parts=parts)


def test_round_trip_through_deltas(tmp_path: Path) -> None:
    j = big_begun(tmp_path)
    j.record_block("a", 5000, 10, 100, "c0", ("lmdb:n1",))
    j.record_block("a", 5001, 10, 100, "c1", ("lmdb:n1",))
    j.record_rejected("a", 5001, 3)
    assert j.flush(force=True)
    j.add_locations("a", 5000, ("remote",))
    j.record_block("b", 5000, 10, 100, "c2", ("lmdb:n2",))
    j.forget_block("a", 5001)  # its rejected count stays
    j.record_part(1999, PartMeta("part-001999.parquet", 1, 2, "ff"))  # replaced
    assert j.flush(force=True)
    j.forget_block("b", 5000)
    j.record_block("b", 5000, 11, 101, "c3", ())  # forgotten and recorded again in one delta
    j.record_part(5000, PartMeta("part-005000.parquet", 10, 500, "ab"))
    assert j.flush(force=True)
    assert len(deltas(tmp_path / "j")) == 3
    back = Journal.load(str(tmp_path / "j"))
    assert back.seq == j.seq and state(back) == state(j)
    assert back.committed("a", "fa") == {5000: BlockEntry(10, 100, "c0", ("lmdb:n1", "remote"))}
    assert back.committed("b", "fb") == {5000: BlockEntry(11, 101, "c3", ())}
    assert back.rejected("a", "fa") == {5001: 3}
    assert back.parts[1999] == PartMeta("part-001999.parquet", 1, 2, "ff") and len(back.parts) == 2001
    assert back.state == "running"


def test_a_flush_writes_only_what_changed(tmp_path: Path) -> None:
    j = big_begun(tmp_path, parts=5000)
    snapshot = (tmp_path / "j" / "journal.json").stat().st_size
    j.record_part(5000, PartMeta("part-005000.parquet", 100, 5000, "ab" * 16))
    assert j.flush(force=True)
    (newest,) = deltas(tmp_path / "j")
    assert newest.stat().st_size < 1024 < 200 * 1024 < snapshot
    assert json.loads(newest.read_text())["ops"] == [["part", 5000, ["part-005000.parquet", 100, 5000, "ab" * 16]]]


def test_a_block_committed_and_forgotten_between_two_flushes_writes_nothing(tmp_path: Path) -> None:
    j = big_begun(tmp_path)
    j.record_block("a", 1, 10, 100, "c1", ())
    assert j.flush(force=True)
    for b in range(2, 500):  # a fast stage: committed and consumed within one interval
        j.record_block("a", b, 10, 100, f"c{b}", ())
        j.forget_block("a", b)
    j.forget_block("a", 1)  # in the store: its removal must be written
    j.record_block("a", 7, 10, 100, "c7", ())
    assert j.flush(force=True)
    newest = deltas(tmp_path / "j")[-1]
    assert json.loads(newest.read_text())["ops"] == [["done", "a", 1, None], ["done", "a", 7, [10, 100, "c7", []]]]
    assert state(Journal.load(str(tmp_path / "j"))) == state(j)


def test_compaction_folds_the_deltas_into_the_snapshot_and_deletes_them(tmp_path: Path) -> None:
    j = big_begun(tmp_path)
    for b in range(2000, 2005):
        j.record_part(b, PartMeta(f"part-{b:06d}.parquet", 1, 1, "x"))
        assert j.flush(force=True)
    assert len(deltas(tmp_path / "j")) == 5
    j.finish("succeeded")  # always a snapshot
    assert deltas(tmp_path / "j") == []
    doc = json.loads((tmp_path / "j" / "journal.json").read_text())
    assert doc["version"] == 2 and doc["seq"] == j.seq and doc["state"] == "succeeded" and len(doc["parts"]) == 2005
    # Deltas outweighing the snapshot are folded in by any flush too.
    j.begin("p", 1, {"a": "fa", "b": "fb"}, "fs")
    before = j.seq
    for b in range(2005, 6000):
        j.record_part(b, PartMeta(f"part-{b:06d}.parquet", 1, 1, "x"))
        if b % 500 == 0:
            assert j.flush(force=True)
    assert j.flush(force=True)
    assert j.seq > before and len(deltas(tmp_path / "j")) < 8
    assert len(Journal.load(str(tmp_path / "j")).parts) == 6000


def test_deltas_left_by_a_crash_between_snapshot_and_delete_are_ignored(tmp_path: Path) -> None:
    j = big_begun(tmp_path)
    j.record_block("a", 1, 1, 1, "c", ())
    assert j.flush(force=True)
    j.forget_block("a", 1)
    assert j.flush(force=True)
    kept = {p.name: p.read_bytes() for p in deltas(tmp_path / "j")}
    assert len(kept) == 2
    j.record_block("a", 2, 1, 1, "c", ())
    j.finish("failed")  # snapshot, then delete: put the deleted deltas back, as a crash would leave them
    for name, data in kept.items():
        (tmp_path / "j" / name).write_bytes(data)
    back = Journal.load(str(tmp_path / "j"))
    # Replayed, the old deltas would be harmless here; with seq <= the snapshot's they are not even read.
    assert back.seq == j.seq == 3 and state(back) == state(j) and back.state == "failed"
    back.begin("p", 1, {"a": "fa", "b": "fb"}, "fs")
    assert deltas(tmp_path / "j") == []  # the next compaction removes them


def test_a_torn_last_delta_ends_the_log(tmp_path: Path) -> None:
    j = big_begun(tmp_path)
    j.record_block("a", 1, 1, 1, "c1", ())
    assert j.flush(force=True)
    j.record_block("a", 2, 1, 1, "c2", ())
    assert j.flush(force=True)
    last = deltas(tmp_path / "j")[-1]
    last.write_bytes(last.read_bytes()[:25])  # a torn write
    back = Journal.load(str(tmp_path / "j"))
    assert back.committed("a", "fa") == {1: BlockEntry(1, 1, "c1", ())} and back.seq == j.seq - 1
    # The next writer's first write is a snapshot past the torn delta, which it deletes:
    # its own deltas never sit next to the torn one.
    back.begin("p", 1, {"a": "fa", "b": "fb"}, "fs")
    assert back.seq == j.seq and deltas(tmp_path / "j") == []
    back.record_block("a", 3, 1, 1, "c3", ())
    assert back.flush(force=True)
    assert sorted(Journal.load(str(tmp_path / "j")).committed("a", "fa")) == [1, 3]


def test_a_missing_delta_stops_the_replay_at_the_gap(tmp_path: Path) -> None:
    j = big_begun(tmp_path)
    for b in range(3):
        j.record_block("a", b, 1, 1, f"c{b}", ())
        assert j.flush(force=True)
    deltas(tmp_path / "j")[1].unlink()
    back = Journal.load(str(tmp_path / "j"))
    assert sorted(back.committed("a", "fa")) == [0]  # not 0 and 2: a later delta never skips an earlier one


def test_a_version_1_journal_loads(tmp_path: Path) -> None:
    d = tmp_path / "j"
    d.mkdir()
    v1 = {"version": 1, "pipeline": "p", "run_id": "r1", "state": "running", "updated_at": 1.0, "blocks": 3,
          "sink_fingerprint": "fs",
          "stages": {"a": {"fingerprint": "fa", "done": {"0": [10, 100, "c", ["remote"]]}, "rejected": {"1": 2}}},
          "parts": {"2": ["part-000002.parquet", 10, 500, "ab"]}}
    (d / "journal.json").write_text(json.dumps(v1))
    j = fresh(tmp_path)
    assert j.seq == 0 and j.state == "running" and j.committed("a", "fa") == {0: BlockEntry(10, 100, "c", ("remote",))}
    assert j.rejected("a", "fa") == {1: 2} and j.parts == {2: PartMeta("part-000002.parquet", 10, 500, "ab")}
    j.begin("p", 3, {"a": "fa"}, "fs")
    assert json.loads((d / "journal.json").read_text())["version"] == 2
    assert fresh(tmp_path).committed("a", "fa") == {0: BlockEntry(10, 100, "c", ("remote",))}


def test_a_failed_periodic_flush_keeps_its_changes(tmp_path: Path) -> None:
    j = big_begun(tmp_path)
    j.record_block("a", 1, 1, 1, "c1", ())
    assert periodic(j)
    seq = j.seq
    j.record_block("a", 2, 1, 1, "c2", ())
    j.record_part(2, PartMeta("part-000002.parquet", 10, 500, "ab"))
    d, away = tmp_path / "j", tmp_path / "away"
    d.rename(away)
    d.write_text("not a directory")  # the store is unreachable
    assert periodic(j) is False and j.unreachable and j.seq == seq
    with pytest.raises(StoreError):  # a forced flush raises, naming the store
        j.flush(force=True)
    j.forget_block("a", 1)  # more changes while it is down
    d.unlink()
    away.rename(d)
    assert periodic(j) is True and j.unreachable == ""
    assert j.seq == seq + 1  # the changes kept, written once as the next delta
    back = Journal.load(str(d))
    assert back.committed("a", "fa") == {2: BlockEntry(1, 1, "c2", ())} and state(back) == state(j)


def test_a_fresh_journal_replaces_the_stored_log(tmp_path: Path) -> None:
    j = big_begun(tmp_path)
    for b in range(3):
        j.record_block("a", b, 1, 1, "c", ())
        assert j.flush(force=True)
    new = Journal(str(tmp_path / "j"), pipeline="p")  # what `tierflow run --fresh` does
    new.begin("p", 1, {"a": "fa"}, "fs")
    assert new.seq == j.seq and deltas(tmp_path / "j") == []
    new.record_block("a", 9, 1, 1, "c", ())
    assert new.flush(force=True)
    back = Journal.load(str(tmp_path / "j"))
    assert back.committed("a", "fa") == {9: BlockEntry(1, 1, "c", ())} and back.parts == {}


def test_round_trip_on_an_object_store(tmp_path: Path) -> None:
    """memory:// takes the object-store path: one PUT per object, listing for the deltas."""
    url = f"memory://journal-test/{tmp_path.name}/j"
    j = Journal.load(url, interval_s=0)
    j.begin("p", 3, {"a": "fa"}, "fs")
    j.record_part(0, PartMeta("part-000000.parquet", 1, 1, "x"))
    assert j.flush(force=True)
    j.record_block("a", 1, 1, 1, "c", ())
    assert j.flush(force=True)
    back = Journal.load(url)
    assert back.seq == j.seq and state(back) == state(j)
    j.finish("succeeded")
    assert state(Journal.load(url)) == state(j)


@pytest.mark.s3
def test_round_trip_on_s3(s3_env: S3Endpoint) -> None:
    """A real S3 endpoint: listings are cached per s3fs instance, so each load and
    compaction must list afresh; deleted deltas must not be replayed."""
    opts = s3_env.storage_options()
    s3_env.make_bucket("journal-test")
    fs, _ = filesystem("s3://journal-test", opts)
    url = "s3://journal-test/_journal/p"
    j = big_begun_at(url, opts, parts=500)
    for b in range(3):
        j.record_block("a", b, 1, 1, f"c{b}", ())
        assert j.flush(force=True)
    assert len(fs.glob("journal-test/_journal/p/delta-*.json")) == 3
    back = Journal.load(url, opts)
    assert back.seq == j.seq and state(back) == state(j)
    j.forget_block("a", 0)
    j.finish("succeeded")
    fs.invalidate_cache()
    assert fs.glob("journal-test/_journal/p/delta-*.json") == []
    back = Journal.load(url, opts)
    assert sorted(back.committed("a", "fa")) == [1, 2] and back.state == "succeeded"
