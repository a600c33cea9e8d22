"""The sink on a real filesystem: atomic parts, _SUCCESS last, modes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from tierflow.errors import SinkError
from tierflow.io.sink import SUCCESS, Sink, read_success
from tierflow.manifest import SinkConfig


def sink(tmp_path: Path, mode: str = "error") -> Sink:
    return Sink(SinkConfig(path="out", mode=mode), str(tmp_path / "out"))


def table(start: int, n: int) -> pa.Table:
    return pa.table({"id": list(range(start, start + n))})


def test_parts_then_success(tmp_path: Path) -> None:
    s = sink(tmp_path)
    s.prepare()
    parts = [s.write_part(b, table(b * 10, 10)) for b in (1, 0, 2)]
    assert not s.is_complete()
    s.commit(parts)
    doc = read_success(str(tmp_path / "out"))
    assert doc is not None and doc["rows"] == 30
    assert [p["name"] for p in doc["parts"]] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert sorted(ds.dataset(tmp_path / "out").to_table()["id"].to_pylist()) == list(range(30))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_mode_error_refuses_a_complete_output(tmp_path: Path) -> None:
    s = sink(tmp_path)
    s.prepare()
    s.commit([s.write_part(0, table(0, 3))])
    with pytest.raises(SinkError, match="mode: error"):
        sink(tmp_path).prepare()
    assert s.is_complete()  # untouched


def test_overwrite_unmarks_first_and_drops_stale_parts(tmp_path: Path) -> None:
    s = sink(tmp_path)
    s.prepare()
    s.commit([s.write_part(b, table(b, 1)) for b in range(3)])
    s2 = sink(tmp_path, "overwrite")
    s2.prepare()
    assert not (tmp_path / "out" / SUCCESS).exists()  # no window where it looks complete
    s2.commit([s2.write_part(0, table(100, 2))])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SUCCESS, "part-000000.parquet"]
    doc = json.loads((tmp_path / "out" / SUCCESS).read_text())
    assert doc["rows"] == 2
