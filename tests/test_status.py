"""``tierflow status``: progress read from the journal alone (typed block entries)."""

from __future__ import annotations

from pathlib import Path

from test_plan import two_stage_plan

from tierflow.engine.journal import Journal
from tierflow.io.sink import PartMeta
from tierflow.pipeline_status import pipeline_status


def test_status_counts_blocks_rows_and_copies_per_location_kind(tmp_path: Path) -> None:
    plan = two_stage_plan(tmp_path, blocks=4)
    j = Journal.load(str(tmp_path / "j"))
    j.begin("demo", 4, {s.name: s.fingerprint for s in plan.stages}, "fs")
    j.record_block("clean", 0, 10, 100, "c0", ("lmdb:n1", "remote"))
    j.record_block("clean", 1, 7, 70, "c1", ("lmdb:n1", "lmdb:n2"))
    j.record_block("embed", 0, 10, 100, "e0", ("lmdb:n2",))
    j.record_part(3, PartMeta("part-000003.parquet", 10, 500, "p3"))
    j.finish("failed")
    status = pipeline_status(plan, Journal.load(str(tmp_path / "j")))
    clean, embed = status.stages
    assert (clean.done, clean.held_blocks, clean.held_rows, clean.locations) == (3, 2, 17, {"lmdb": 3, "remote": 1})
    assert (embed.done, embed.held_blocks, embed.held_rows, embed.locations) == (2, 1, 10, {"lmdb": 1})
    assert clean.bytes_at == {"lmdb": 240, "remote": 100}  # each copy counted and embed.bytes_at == {"lmdb": 100}
    assert not clean.stale and status.state == "failed" and not status.running
    assert (status.sink_parts, status.blocks, status.sink_rows) == (1, 4, 10)


def test_status_adds_the_last_runs_reads_per_tier_from_its_report(tmp_path: Path) -> None:
    import json

    from tierflow.pipeline_status import last_reads

    plan = two_stage_plan(tmp_path, blocks=4)
    j = Journal.load(str(tmp_path / "j"))
    j.begin("demo", 4, {s.name: s.fingerprint for s in plan.stages}, "fs")
    report = tmp_path / "report.json"
    steps = [{"name": "clean", "reads": {"source": 4}}, {"name": "embed", "reads": {"local": 3, "peer": 1}}]
    report.write_text(json.dumps({"telemetry": {"steps": steps}}))
    clean, embed = pipeline_status(plan, j, last_reads(report)).stages
    assert clean.last_reads == {"source": 4} and embed.last_reads == {"local": 3, "peer": 1}
    assert last_reads(tmp_path / "missing.json") == {}
