"""The plan's block keys: built by ``cache/keys.py`` and pinned (journals and caches hold them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierflow.cache.keys import block_key, parse_block_key, stage_keys
from tierflow.errors import InvalidKey
from tierflow.io.source import BlockSpec, Source
from tierflow.manifest import parse_manifest
from tierflow.plan import Plan, StagePlan

FINGERPRINT = "3f9a1c0e5d7b2a41" + "9c" * 24  # a sha256 hex digest's length


def two_stage_plan(root: Path, blocks: int = 0) -> Plan:
    """Stages ``clean`` and ``embed`` of pipeline ``demo``, over ``blocks`` blocks of 10 rows."""
    doc = {
        "name": "demo",
        "source": {"format": "parquet", "path": str(root / "in"), "block_rows": 10},
        "stages": [{"name": n, "kind": "python", "fn": "tierflow.testing:identity"} for n in ("clean", "embed")],
        "sink": {"path": str(root / "out"), "mode": "overwrite"},
    }
    m = parse_manifest(doc, "demo.yaml", str(root))
    steps = (StagePlan(0, m.stages[0], FINGERPRINT), StagePlan(1, m.stages[1], "0" * 64))
    specs = tuple(BlockSpec(i, "in/a.parquet", i * 10, 10) for i in range(blocks))
    return Plan(m, Source(m.source, str(root / "in")), (), specs, steps)  # no file is read


def test_block_keys_are_pinned(tmp_path: Path) -> None:
    # Changing these strings orphans every cached block and every journal written before.
    plan = two_stage_plan(tmp_path)
    assert plan.key(0, 42) == "demo/3f9a1c0e5d7b2a41/clean/000042"
    assert plan.key(1, 1234567) == "demo/0000000000000000/embed/1234567"


def test_plan_keys_are_the_cache_key_builders(tmp_path: Path) -> None:
    plan = two_stage_plan(tmp_path)
    assert plan.key(0, 7) == block_key("demo", FINGERPRINT, "clean", 7)
    parsed = parse_block_key(plan.key(0, 7))
    assert (parsed.pipeline, parsed.fingerprint, parsed.stage, parsed.index) == ("demo", FINGERPRINT[:16], "clean", 7)


def test_stage_keys_check_their_parts_once() -> None:
    keys = stage_keys("demo", FINGERPRINT, "clean")
    assert keys(0) == "demo/3f9a1c0e5d7b2a41/clean/000000" and keys.prefix == "demo/3f9a1c0e5d7b2a41/clean/"
    with pytest.raises(InvalidKey):
        keys(-1)
    for bad in (("de/mo", "f", "s"), ("demo", ".f", "s"), ("demo", "f", "")):
        with pytest.raises(InvalidKey):
            stage_keys(*bad)


def test_resource_settings_keep_the_block_keys() -> None:
    # Moving a stage to GPUs (or other nodes) changes where it runs, not what it outputs.
    from tierflow.plan import stage_identity

    base = {"name": "embed", "kind": "python", "fn": "tierflow.testing:identity"}
    ids = [
        stage_identity(parse_manifest({"name": "p", "source": {"format": "csv", "path": "x"}, "sink": {"path": "o"},
                                       "stages": [{**base, **extra}]}).stages[0], str)
        for extra in ({}, {"num_gpus": 0.5, "num_cpus": 4}, {"resources": {"a100": 1}})
    ]
    assert ids[0] == ids[1] == ids[2]
    assert "num_gpus" not in ids[0]["config"] and "resources" not in ids[0]["config"]  # {} keeps older keys too
