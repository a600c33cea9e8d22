"""``tierflow bench cache``: figures per tier, the bytes asked for, no trace left, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tierflow.cache.bench import TIERS, parse_size
from tierflow.cli import main


def test_bench_cache_json_has_a_put_and_a_get_per_tier_moving_the_bytes_asked_for(tmp_path: Path) -> None:
    cache, store = tmp_path / "cache", tmp_path / "store"
    res = CliRunner().invoke(main, ["bench", "cache", "--dir", str(cache), "--remote-url", f"file://{store}",
                                    "--block-size", "64K", "--count", "3", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["block_size"] == 65536
    assert [(f["tier"], f["op"]) for f in doc["figures"]] == [(t, op) for t in TIERS for op in ("put", "get")]
    for f in doc["figures"]:
        assert f["ops"] == 3 and f["bytes"] == 3 * 65536, f
        assert f["mb_s"] > 0 and 0 < f["p50_ms"] <= f["p90_ms"] <= f["p99_ms"] <= f["max_ms"], f
    # scratch copies only, all removed: nothing of the benchmark's is left in the cache or the store
    assert not any(cache.iterdir())
    assert not store.exists() or not any(store.rglob("*"))


def test_bench_cache_table_names_only_the_tiers_asked_for(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["bench", "cache", "--dir", str(tmp_path), "-s", "4K", "-n", "2", "-t", "lmdb"])
    assert res.exit_code == 0, res.output
    assert "lmdb" in res.output and "4 KiB blocks" in res.output
    assert "memory" not in res.output and "remote" not in res.output


def test_bench_cache_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "cache", "--dir", str(tmp_path), "--block-size", "12Q"])
    assert res.exit_code == 2 and "not a size: '12Q'" in res.output
    (tmp_path / "bad.yaml").write_text("name: x\n")
    res = runner.invoke(main, ["bench", "cache", "-m", str(tmp_path / "bad.yaml")])
    assert res.exit_code == 2 and "bad.yaml" in res.output
    (tmp_path / "a-file").touch()  # a store under a regular file cannot be written: the tier fails
    res = runner.invoke(main, ["bench", "cache", "--dir", str(tmp_path / "c"), "-s", "4K", "-n", "2", "-t", "remote",
                               "--remote-url", f"file://{tmp_path}/a-file/store"])
    assert res.exit_code == 1 and "unavailable" in res.output, res.output


def test_parse_size() -> None:
    assert [parse_size(s) for s in ("64K", "4MiB", "1g", "1000")] == [65536, 4 << 20, 1 << 30, 1000]
