"""Sources on real files: blocks, byte ranges of CSV/JSONL blocks, one schema per file, edge cases."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from s3_endpoint import S3Endpoint

import tierflow.io.source as source_mod
from tierflow.io.source import BlockSpec, Source, SourceFile
from tierflow.manifest import SourceConfig

FORMATS = ("parquet", "csv", "jsonl")
EXT = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}


def rows_table(start: int, n: int) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table({
        "id": ids,
        "text": [f"prompt {i}, with a comma" for i in ids],
        "score": [i / 4 for i in ids],
    })


def write(path: Path, table: pa.Table, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=4)
    elif fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))


def whole(path: Path, fmt: str) -> pa.Table:
    """The file as pyarrow reads it in one go: what the blocks together must equal."""
    if fmt == "parquet":
        return pq.read_table(path)
    return pacsv.read_csv(path) if fmt == "csv" else pajson.read_json(path)


def source(path: Path, fmt: str, block_rows: int, columns: tuple[str, ...] | None = None) -> Source:
    return Source(SourceConfig(format=fmt, path=str(path), block_rows=block_rows, columns=columns), str(path))


def read_all(src: Source) -> tuple[list[SourceFile], list[BlockSpec], list[pa.Table]]:
    files = src.files()
    blocks = src.plan(files)
    return files, blocks, [src.read(b) for b in blocks]


def one_file(tmp_path: Path, name: str, data: bytes, fmt: str, block_rows: int) -> tuple[list[BlockSpec], list[pa.Table]]:
    (tmp_path / name).write_bytes(data)
    _, blocks, tables = read_all(source(tmp_path / name, fmt, block_rows))
    return blocks, tables


@pytest.fixture(params=["default", "tiny"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The scan's chunk size: the default, and a few bytes so that rows cross chunk cuts."""
    if request.param == "tiny":
        monkeypatch.setattr(source_mod, "_CHUNK", 7)
    return int(source_mod._CHUNK)


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_counts_and_row_ranges(tmp_path: Path, fmt: str) -> None:
    write(tmp_path / f"a.{EXT[fmt]}", rows_table(0, 10), fmt)
    write(tmp_path / f"b.{EXT[fmt]}", rows_table(10, 3), fmt)
    files, blocks, tables = read_all(source(tmp_path, fmt, 4))
    assert [(Path(f.path).name, f.rows) for f in files] == [(f"a.{EXT[fmt]}", 10), (f"b.{EXT[fmt]}", 3)]
    assert [(b.index, Path(b.file).name[0], b.offset, b.rows) for b in blocks] == [
        (0, "a", 0, 4), (1, "a", 4, 4), (2, "a", 8, 2), (3, "b", 0, 3),
    ]
    assert [t["id"].to_pylist() for t in tables] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    if fmt != "parquet":  # contiguous byte ranges, each read on its own
        assert all(b.start >= 0 and b.end > b.start for b in blocks)
        assert blocks[0].end == blocks[1].start and blocks[1].end == blocks[2].start
        assert blocks[2].end == files[0].size


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block_rows", [1, 3, 7, 10, 11, 50])
def test_blocks_together_equal_the_whole_files(tmp_path: Path, fmt: str, block_rows: int, chunk: int) -> None:
    paths = [tmp_path / f"{name}.{EXT[fmt]}" for name in ("a", "b", "c")]
    for i, (p, n) in enumerate(zip(paths, (10, 1, 23))):
        write(p, rows_table(100 * i, n), fmt)
    files, blocks, tables = read_all(source(tmp_path, fmt, block_rows))
    assert [f.rows for f in files] == [10, 1, 23]
    assert len(blocks) == sum(-(-n // block_rows) for n in (10, 1, 23))
    for p in paths:  # types are inferred per file (b's one score is 25, an integer in CSV)
        got = [t for b, t in zip(blocks, tables) if b.file == str(p)]
        assert pa.concat_tables(got).equals(whole(p, fmt))


@pytest.mark.parametrize(
    ("data", "rows"),
    [
        (b"id,name\n1,a\n2,b\n3,c", [1, 2, 3]),  # no line break after the last row
        (b"id,name\r\n1,a\r\n2,b\r\n3,c\r\n", [1, 2, 3]),  # CRLF
        (b"\n\nid,name\n\n1,a\n\r\n\n2,b\n\n\n3,c\n\n", [1, 2, 3]),  # empty lines, before the header too
        (b"\xef\xbb\xbfid,name\n1,a\n2,b\n", [1, 2]),  # UTF-8 BOM
        (b"id,name\n1,a\n2,b\n3,c\n4,d\n", [1, 2, 3, 4]),  # an exact multiple of block_rows
        (b"id,name\n1,a\n", [1]),  # smaller than one block
    ],
)
def test_csv_lines(tmp_path: Path, data: bytes, rows: list[int], chunk: int) -> None:
    blocks, tables = one_file(tmp_path, "x.csv", data, "csv", 2)
    assert [b.rows for b in blocks] == [min(2, len(rows) - o) for o in range(0, len(rows), 2)]
    assert all(b.start >= 0 for b in blocks)
    got = pa.concat_tables(tables)
    assert got["id"].to_pylist() == rows and got.column_names == ["id", "name"]
    assert got.equals(pacsv.read_csv(tmp_path / "x.csv"))


@pytest.mark.parametrize(
    ("data", "rows"),
    [
        (b'{"id":1}\n{"id":2}\n{"id":3}', [1, 2, 3]),
        (b'{"id":1}\r\n{"id":2}\r\n{"id":3}\r\n', [1, 2, 3]),
        (b'\n{"id":1}\n\n   \n\t\r\n{"id":2}\n \t{"id":3}  \n\n', [1, 2, 3]),  # blank lines, blanks around
        (b'\xef\xbb\xbf{"id":1}\n{"id":2}\n', [1, 2]),
        (b'{"id":1}\n{"id":2}\n{"id":3}\n{"id":4}\n', [1, 2, 3, 4]),
        (b'{"id":1}\n', [1]),
    ],
)
def test_jsonl_lines(tmp_path: Path, data: bytes, rows: list[int], chunk: int) -> None:
    blocks, tables = one_file(tmp_path, "x.jsonl", data, "jsonl", 2)
    assert [b.rows for b in blocks] == [min(2, len(rows) - o) for o in range(0, len(rows), 2)]
    assert all(b.start >= 0 for b in blocks)
    got = pa.concat_tables(tables)
    assert got["id"].to_pylist() == rows
    assert got.equals(pajson.read_json(tmp_path / "x.jsonl"))


@pytest.mark.parametrize(
    ("name", "data", "names"),
    [
        ("h.csv", b"id,name\n", ["id", "name"]),
        ("h2.csv", b"id,name", ["id", "name"]),  # no line break: pyarrow alone refuses it
        ("e.csv", b"", []),
        ("b.csv", b"\n\r\n\n", []),
        ("e.jsonl", b"", []),
        ("b.jsonl", b"\n  \n\r\n", []),
    ],
)
def test_files_without_rows_give_no_blocks(tmp_path: Path, name: str, data: bytes, names: list[str]) -> None:
    (tmp_path / name).write_bytes(data)
    src = source(tmp_path / name, name.rsplit(".")[1], 2)
    files = src.files()
    assert files[0].rows == 0 and src.plan(files) == []
    assert src.read_schema(files[0]).names == names


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_one_type_per_column_across_blocks(tmp_path: Path, fmt: str, chunk: int) -> None:
    # Block 0 holds integers only, block 1 floats, block 2 nulls only; "late" appears in block 2.
    values: list[object] = [1, 2, 3, 4, 1.5, 2.5, None, None]
    late = [None] * 6 + ["x", "y"]
    if fmt == "csv":
        lines = ["n,late"] + [f"{'' if v is None else v},{'' if s is None else s}" for v, s in zip(values, late)]
        (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    else:
        recs = [{"n": v} if s is None else {"n": v, "late": s} for v, s in zip(values, late)]
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    path = tmp_path / f"t.{fmt}"
    *_, tables = read_all(source(path, fmt, 2))
    expected = whole(path, fmt)
    assert expected.schema.field("n").type == pa.float64()
    assert [t.schema for t in tables] == [expected.schema] * 4
    assert pa.concat_tables(tables).equals(expected)
    assert tables[0]["n"].to_pylist() == [1.0, 2.0]  # not int64, though its rows are integers
    assert tables[3]["n"].null_count == 2 and tables[0]["late"].type == pa.string()


def test_json_values_of_incompatible_types_are_refused_like_pyarrow(tmp_path: Path, chunk: int) -> None:
    (tmp_path / "t.jsonl").write_text('{"a":1}\n{"a":2}\n{"a":"three"}\n')
    with pytest.raises(pa.ArrowInvalid, match="t.jsonl"):
        source(tmp_path / "t.jsonl", "jsonl", 2).files()
    with pytest.raises(pa.ArrowInvalid):
        pajson.read_json(tmp_path / "t.jsonl")


@pytest.mark.parametrize(("name", "data"), [("t.csv", b"a,b\n1,2\n3,4,5\n"), ("t.jsonl", b'{"a":1}\n{"a":\n')])
def test_a_bad_file_is_refused_naming_it(tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(pa.ArrowInvalid, match=f"{name}: .*parse error"):
        source(tmp_path / name, name.split(".")[1], 2).files()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_block_parses_only_its_own_bytes(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"t.{EXT[fmt]}"
    write(path, rows_table(0, 30), fmt)
    src = source(path, fmt, 10)
    blocks = src.plan(src.files())
    # Overwrite every byte after the first block with rows pyarrow refuses, keeping the size:
    # a reader that parses the whole file (as every block once did) fails; one that reads
    # only [start, end) does not.
    data = path.read_bytes()
    tail = len(data) - blocks[0].end
    bad = b"1,2,3,4,5\n" if fmt == "csv" else b"{{{{{{{{{\n"
    path.write_bytes(data[: blocks[0].end] + (bad * tail)[:tail])
    with pytest.raises(pa.ArrowInvalid):
        whole(path, fmt)
    assert src.read(blocks[0])["id"].to_pylist() == list(range(10))


@pytest.mark.parametrize(
    ("name", "before", "after"),
    [
        ("t.csv", "id\n10\n11\n12\n13\n", "id\n1\n2\n3\n4\n5\n6\n"),
        ("t.jsonl", '{"id":10}\n' * 4, '{"i":1}\n' * 5),
    ],
)
def test_a_file_changed_after_planning_fails_loudly(tmp_path: Path, name: str, before: str, after: str) -> None:
    (tmp_path / name).write_text(before)
    src = source(tmp_path / name, name.split(".")[1], 4)
    blocks = src.plan(src.files())
    (tmp_path / name).write_text(after)  # the planned byte range now holds more, shorter rows
    with pytest.raises(ValueError, match="was the file changed"):
        src.read(blocks[0])


@pytest.mark.parametrize(
    "data",
    [
        # a quoted value holding a line break, in the middle and at the end
        b'id,text\n1,plain\n2,"two\nlines"\n3,x\n4,"a ""quoted""\r\nbreak"\n5,y\n6,"end\n\nof file"\n',
        # a literal quote inside an unquoted value (pyarrow keeps it), then a quoted line break
        b'id,text,more,last\n1,a"b,"c\nd",e"f\n2,x,y,z\n3,x,"y\n",z\n4,x,y,z\n',
        # a carriage return alone ends a row for pyarrow, not for a line scan
        b"id,text\n1,a\r2,b\n3,c\n",
    ],
)
def test_csv_rows_spanning_lines_are_read_whole(tmp_path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "q.csv").write_bytes(data)
    expected = pacsv.read_csv(tmp_path / "q.csv")
    for size in [*range(1, 40), 1 << 20]:  # wherever the scan's chunks are cut
        monkeypatch.setattr(source_mod, "_CHUNK", size)
        source_mod._scan_cached.cache_clear()  # same file, same version: would not be scanned again
        files, blocks, tables = read_all(source(tmp_path / "q.csv", "csv", 2))
        assert files[0].rows == expected.num_rows and all(b.start == -1 for b in blocks), size
        assert pa.concat_tables(tables).equals(expected), size


@pytest.mark.parametrize(
    "data",
    [
        b'{"id":1}\n{"id":2,\n "x":"y"}\n{"id":3}\n',  # an object over two lines
        b'{"id":1} {"id":2}\n{"id":3}\n',  # two objects on a line
        b'{"id":1} {"id":2}\n{"id":\n3}\n{"id":4}\n',  # both: as many rows as lines
    ],
)
def test_json_rows_not_one_per_line_are_read_whole(tmp_path: Path, data: bytes, chunk: int) -> None:
    (tmp_path / "q.jsonl").write_bytes(data)
    expected = pajson.read_json(tmp_path / "q.jsonl")
    files, blocks, tables = read_all(source(tmp_path / "q.jsonl", "jsonl", 2))
    assert files[0].rows == expected.num_rows and all(b.start == -1 for b in blocks)
    assert pa.concat_tables(tables).equals(expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_columns(tmp_path: Path, fmt: str) -> None:
    write(tmp_path / f"a.{EXT[fmt]}", rows_table(0, 9), fmt)
    src = source(tmp_path, fmt, 4, columns=("score", "id"))
    *_, tables = read_all(src)
    got = pa.concat_tables(tables)
    assert got.column_names == ["score", "id"]
    assert got.equals(whole(tmp_path / f"a.{EXT[fmt]}", fmt).select(["score", "id"]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_schema(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"a.{EXT[fmt]}"
    write(path, rows_table(0, 5), fmt)
    src = source(path, fmt, 2)
    f = src.files()[0]
    assert src.read_schema(f) == whole(path, fmt).schema
    bare = SourceFile(f.path, f.size, f.version, f.rows)  # no scan result attached: scans again
    assert bare == f and src.read_schema(bare) == whole(path, fmt).schema


def test_block_specs_pickle_and_keep_the_old_positional_form(tmp_path: Path) -> None:
    write(tmp_path / "a.csv", rows_table(0, 5), "csv")
    src = source(tmp_path / "a.csv", "csv", 2)
    blocks = src.plan(src.files())
    back = pickle.loads(pickle.dumps(blocks))
    assert back == blocks and [(b.start, b.end, b.schema) for b in back] == [(b.start, b.end, b.schema) for b in blocks]
    assert src.read(back[1]).equals(src.read(blocks[1]))
    old = BlockSpec(0, "in/a.parquet", 0, 10)
    assert (old.start, old.end, old.schema) == (-1, -1, None)


def test_plan_refuses_an_index_cut_for_other_blocks(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", rows_table(0, 10), "jsonl")
    files = source(tmp_path / "a.jsonl", "jsonl", 6).files()
    with pytest.raises(ValueError, match="blocks of 6 rows, not 5"):
        source(tmp_path / "a.jsonl", "jsonl", 5).plan(files)


@pytest.mark.s3
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_blocks_of_a_file_on_s3_are_read_by_byte_range(tmp_path: Path, s3_env: S3Endpoint, fmt: str) -> None:
    """A real S3 endpoint: each block is one ranged GET of its own bytes."""
    from tierflow.io.fs import filesystem

    opts = s3_env.storage_options()
    bucket = f"source-test-{fmt}"  # one server for the session
    s3_env.make_bucket(bucket)
    fs, _ = filesystem(f"s3://{bucket}", opts)
    local = tmp_path / f"in.{EXT[fmt]}"
    write(local, rows_table(0, 25), fmt)
    fs.put_file(str(local), f"{bucket}/in/in.{EXT[fmt]}")
    url = f"s3://{bucket}/in/"
    src = Source(SourceConfig(format=fmt, path=url, block_rows=10, storage_options=opts), url)
    files, blocks, tables = read_all(src)
    assert [f.rows for f in files] == [25] and [b.rows for b in blocks] == [10, 10, 5]
    assert all(b.start >= 0 for b in blocks)  # indexed: byte ranges, not whole-file reads
    assert pa.concat_tables(tables).equals(whole(local, fmt))
