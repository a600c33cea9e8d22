"""Sources: list the input files and cut them into deterministic blocks of rows.

The same files always give the same blocks (files sorted by path, then row ranges of
``block_rows``), which is what makes block keys stable across runs.

A Parquet block reads only the row groups it overlaps. A CSV/JSONL file is scanned once at
plan time, a chunk at a time (bounded memory): the scan counts its rows, records the byte
range of every block and infers one schema for the whole file, so a block reads and parses
only its own bytes, with the same column types as every other block of its file. A file
whose rows are not one per line (a quoted CSV value holding a line break, say) is read whole
instead, by every block: correct, but slow and memory-hungry for a big file.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from tierflow.io.fs import filesystem, store_op
from tierflow.manifest import SourceConfig

_EXTENSIONS = {"parquet": (".parquet", ".pq"), "jsonl": (".jsonl", ".json", ".ndjson"), "csv": (".csv",)}
_CHUNK = 16 << 20  # bytes per scan step: a scan holds a few of these, whatever the file's size
_FOOTER_THREADS = 16  # Parquet files whose footers are read at once when listing a source
_SCAN_THREADS = 4  # CSV/JSONL files scanned at once (each holds a few chunks in memory)
_BOM = b"\xef\xbb\xbf"
_NL, _CR = ord("\n"), ord("\r")
_UNITS = ("s", "ms", "us", "ns")

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TextIndex:
    """Where a CSV/JSONL file's blocks lie, from its scan at plan time."""

    schema: pa.Schema  # of the whole file: every block is parsed with these types
    block_rows: int
    bounds: tuple[int, ...]  # byte offset where each block starts, then where the last ends; (): read whole


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: str  # path inside the filesystem
    size: int
    version: str  # mtime or ETag: a changed file changes every key downstream
    rows: int
    text_index: TextIndex | None = field(default=None, repr=False, compare=False)  # CSV/JSONL only


@dataclass(frozen=True, slots=True)
class BlockSpec:
    index: int
    file: str
    offset: int  # first row, counted in the file
    rows: int
    start: int = -1  # CSV/JSONL: the block's bytes are [start, end) of the file; -1: not indexed
    end: int = -1
    schema: pa.Schema | None = field(default=None, repr=False, compare=False)  # CSV/JSONL column types


@dataclass(frozen=True, slots=True)
class Source:
    """A source with its URL resolved (picklable: shipped to the tasks that read blocks)."""

    config: SourceConfig
    url: str

    @store_op("source")
    def files(self) -> list[SourceFile]:
        """Every input file, sorted by path. Raises FileNotFoundError when none matches."""
        fs, path = filesystem(self.url, self.config.storage_options)
        if any(ch in path for ch in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            exts = _EXTENSIONS[self.config.format]
            paths = [p for p in fs.find(path) if p.endswith(exts)]
        else:
            paths = [path] if fs.exists(path) else []
        if not paths:
            raise FileNotFoundError(f"no {self.config.format} input matches {self.url}")
        # One file's look (a HEAD, then a footer read or a scan) is mostly waiting on the
        # store: thousands of files on S3 are looked at side by side, not one after another.
        threads = _FOOTER_THREADS if self.config.format == "parquet" else _SCAN_THREADS
        with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
            return list(pool.map(lambda p: self._file(fs, p), sorted(paths)))

    def _file(self, fs: AbstractFileSystem, path: str) -> SourceFile:
        info = fs.info(path)
        size = int(info.get("size") or 0)
        version = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
        if self.config.format == "parquet":
            with fs.open(path, "rb") as fh:
                return SourceFile(path, size, version, int(pq.ParquetFile(fh).metadata.num_rows))
        rows, index = self._index(path, size, version)
        return SourceFile(path, size, version, rows, index)

    def plan(self, files: list[SourceFile]) -> list[BlockSpec]:
        step = self.config.block_rows
        blocks: list[BlockSpec] = []
        for f in files:
            index = f.text_index
            bounds = index.bounds if index is not None else ()
            if index is not None and bounds and index.block_rows != step:
                raise ValueError(f"{f.path} was indexed for blocks of {index.block_rows} rows, not {step}")
            schema = index.schema if index is not None and bounds else None
            for k, offset in enumerate(range(0, f.rows, step)):
                start, end = (bounds[k], bounds[k + 1]) if bounds else (-1, -1)
                blocks.append(BlockSpec(len(blocks), f.path, offset, min(step, f.rows - offset), start, end, schema))
        return blocks

    @store_op("source")
    def read(self, block: BlockSpec) -> pa.Table:
        """The rows of one block, with the configured columns."""
        cols = list(self.config.columns) if self.config.columns else None
        if self.config.format == "parquet":
            fs, _ = filesystem(self.url, self.config.storage_options)
            with fs.open(block.file, "rb") as fh:
                pf = pq.ParquetFile(fh)
                groups, first = [], None
                start = 0
                for i in range(pf.num_row_groups):
                    n = pf.metadata.row_group(i).num_rows
                    if start + n > block.offset and start < block.offset + block.rows:
                        groups.append(i)
                        first = start if first is None else first
                    start += n
                table = pf.read_row_groups(groups, columns=cols)
            return table.slice(block.offset - (first or 0), block.rows)
        if block.start < 0 or block.schema is None:  # a file read whole (see _scan_text)
            table = _read_text_file(self.url, block.file, self.config.format, _options(self.config))
            if cols:
                table = table.select(cols)
            return table.slice(block.offset, block.rows)
        fs, _ = filesystem(self.url, self.config.storage_options)
        data = fs.cat_file(block.file, start=block.start, end=block.end)
        table = _parse_block(data, self.config.format, block.schema, cols)
        if table.num_rows != block.rows:  # the plan's byte ranges no longer fit the file
            raise ValueError(
                f"{block.file}: bytes {block.start}-{block.end} hold {table.num_rows} rows, the plan "
                f"says {block.rows} (was the file changed after planning?)"
            )
        return table

    @store_op("source")
    def read_schema(self, file: SourceFile) -> pa.Schema:
        """The schema of one input file (Parquet: from its footer; CSV/JSONL: from its scan)."""
        if self.config.format == "parquet":
            fs, _ = filesystem(self.url, self.config.storage_options)
            with fs.open(file.path, "rb") as fh:
                return pq.ParquetFile(fh).schema_arrow
        index = file.text_index or self._index(file.path, file.size, file.version)[1]
        return index.schema

    def _index(self, path: str, size: int, version: str) -> tuple[int, TextIndex]:
        args = (self.url, _options(self.config), path, self.config.format, self.config.block_rows)
        # A known version lets the driver's second listing (checks, then plan) skip the rescan.
        return _scan_cached(*args, size, version) if version else _scan_text(*args)


def _options(config: SourceConfig) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(config.storage_options.items()))


@functools.lru_cache(maxsize=64)
def _scan_cached(
    url: str, options: tuple[tuple[str, str], ...], path: str, fmt: str, block_rows: int, size: int, version: str
) -> tuple[int, TextIndex]:
    return _scan_text(url, options, path, fmt, block_rows)  # size and version: part of the cache key only


def _scan_text(
    url: str, options: tuple[tuple[str, str], ...], path: str, fmt: str, block_rows: int
) -> tuple[int, TextIndex]:
    """Rows and index of one CSV/JSONL file, in one pass of bounded memory."""
    fs, _ = filesystem(url, dict(options))
    try:
        with fs.open(path, "rb") as fh:
            try:
                return _Scan(fmt, block_rows).run(fh)
            except _NotLines as exc:
                _log.warning("%s: %s, so every block of it parses the whole file", path, exc)
        with fs.open(path, "rb") as fh:
            table = _parse_whole(fh, fmt)
    except pa.ArrowInvalid as exc:
        raise pa.ArrowInvalid(f"{path}: {exc}") from exc
    return table.num_rows, TextIndex(table.schema, block_rows, ())


class _NotLines(Exception):
    """The file's rows are not one per line: byte offsets from a line scan would be wrong."""


class _Scan:
    """One pass over a CSV/JSONL file, a chunk at a time.

    Each chunk, cut after its last line break, is split into lines with numpy and parsed by
    pyarrow (types are inferred per chunk and merged). Rows may be taken for lines only when
    pyarrow finds exactly one row per non-empty line. A parse cannot see whether its last row
    goes on past the cut (pyarrow accepts an unclosed quote at the end of its input), so each
    chunk is parsed from the start of the previous one's last row: every line break but the
    file's last is then checked inside some parse.
    """

    def __init__(self, fmt: str, step: int) -> None:
        self.csv = fmt == "csv"
        self.step = step
        self.names: list[str] | None = None  # CSV: from the header, once seen
        self.schema: pa.Schema | None = None
        self.rows = 0
        self.bounds: list[int] = []
        self.last_end = 0  # where the last row seen ends

    def run(self, fh: IO[bytes]) -> tuple[int, TextIndex]:
        head = fh.read(len(_BOM))
        pos, buf = (len(_BOM), b"") if head == _BOM else (0, head)  # pyarrow skips a BOM too
        if not self.csv:
            self.bounds.append(pos)  # CSV rows start after the header, once found
        fresh = 0  # bytes at the front of buf already counted: the last row, parsed again
        final = False
        while not final:
            data = fh.read(_CHUNK)
            final = not data
            buf += data
            del data  # one copy of the chunk at a time
            cut = len(buf) if final else buf.rfind(b"\n") + 1
            if cut > fresh:  # else no new line yet: read on
                keep = self._lines(buf, cut, pos, fresh, final)
                buf, fresh, pos = buf[keep:], cut - keep, pos + keep
        if self.rows % self.step:
            self.bounds.append(self.last_end)
        bounds = tuple(self.bounds) if self.rows else ()
        return self.rows, TextIndex(self.schema or pa.schema([]), self.step, bounds)

    def _lines(self, buf: bytes, cut: int, pos: int, fresh: int, final: bool) -> int:
        """Count and check the lines of ``buf[:cut]`` (at file offset ``pos``; its first
        ``fresh`` bytes were counted before). Returns where the next piece must start."""
        if self.csv and buf.count(b"\r", 0, cut) != buf.count(b"\r\n", 0, cut) + buf.endswith(b"\r", 0, cut):
            raise _NotLines("a carriage return inside a line")  # pyarrow.csv ends a row there, a line scan does not
        arr = np.frombuffer(buf, np.uint8, cut)
        ends = np.flatnonzero(arr == _NL) + 1
        if not len(ends) or ends[-1] != cut:
            ends = np.append(ends, cut)  # the file's last line, without a line break
        starts = np.concatenate(([0], ends[:-1]))
        # Blank lines hold no row. pyarrow.csv skips empty lines, pyarrow.json blank ones too.
        # Most lines start with a visible byte; only the others are looked at in Python.
        blank = b"\r\n" if self.csv else b" \t\r\n"
        full = ~np.isin(arr[starts], np.frombuffer(blank, np.uint8))
        for i in np.flatnonzero(~full & (ends - starts > 1)).tolist():
            full[i] = bool(buf[starts[i] : ends[i]].strip(blank))
        starts, ends = starts[full], ends[full]
        parse_from = 0
        if self.csv and self.names is None:
            if not len(starts):
                return cut  # no header yet
            parse_from = int(starts[0])
            self.bounds.append(pos + int(ends[0]))
            starts, ends = starts[1:], ends[1:]
        elif not self.csv and len(starts) and not _one_object_per_line(arr, starts, ends):
            raise _NotLines("a JSON object spans lines")
        if len(starts) or (self.csv and self.names is None):
            table = self._parse(memoryview(buf)[parse_from:cut], final)
            if table.num_rows != len(starts):
                raise _NotLines(f"{table.num_rows} rows on {len(starts)} non-empty lines")
            if self.csv and self.names is None:
                self.names = table.column_names
                if len(set(self.names)) < len(self.names):  # types are given to pyarrow by name
                    raise _NotLines("duplicate column names")
            self.schema = table.schema if self.schema is None else _merge_schemas(self.schema, table.schema, self.csv)
        new = ends[starts >= fresh] + pos
        first = self.step - self.rows % self.step  # which of the new rows ends the current block
        self.bounds.extend(new[first - 1 :: self.step].tolist())
        self.rows += len(new)
        if len(new):
            self.last_end = int(new[-1])
        return int(starts[-1]) if len(starts) else cut

    def _parse(self, text: memoryview, final: bool) -> pa.Table:
        if not self.csv:
            return pajson.read_json(pa.BufferReader(pa.py_buffer(text)))
        data = bytes(text) + b"\n" if final and text[-1:] != b"\n" else text  # a header alone needs its line break
        try:
            # newlines_in_values: quoted line breaks are parsed as in a whole-file read, and
            # so show up as fewer rows than lines.
            return pacsv.read_csv(
                pa.BufferReader(pa.py_buffer(data)),
                read_options=pacsv.ReadOptions(column_names=self.names or []),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
            )
        except pa.ArrowInvalid as exc:  # a quoted value cut at the chunk's end, or a bad file:
            raise _NotLines(f"a chunk does not parse ({exc})") from exc  # the whole-file read tells


def _one_object_per_line(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> bool:
    """Whether every (non-empty) line starts with ``{`` and ends with ``}``: then none holds
    part of an object that goes on to another line (``}`` then ``{`` is not valid JSON)."""
    last = ends - 1
    last = last - (arr[last] == _NL)
    last = last - (arr[last] == _CR)
    ok = (arr[starts] == ord("{")) & (arr[last] == ord("}"))
    for s, e in zip(starts[~ok].tolist(), ends[~ok].tolist()):  # blanks around the object: rare
        line = arr[s:e].tobytes().strip(b" \t\r\n")
        if not (line.startswith(b"{") and line.endswith(b"}")):
            return False
    return True


def _merge_schemas(a: pa.Schema, b: pa.Schema, csv: bool) -> pa.Schema:
    """The types that hold both chunks' values, in order of first appearance."""
    types = {f.name: f.type for f in a}
    for f in b:
        types[f.name] = _merge_types(types[f.name], f.type, csv) if f.name in types else f.type
    return pa.schema(list(types.items()))


def _merge_types(a: pa.DataType, b: pa.DataType, csv: bool) -> pa.DataType:
    """What a whole-file read would infer from values of types ``a`` and ``b``."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(t(a) for t in numeric) and any(t(b) for t in numeric):
        return pa.float64()
    if pa.types.is_timestamp(a) and pa.types.is_timestamp(b) and a.tz == b.tz:
        return a if _UNITS.index(a.unit) >= _UNITS.index(b.unit) else b
    if pa.types.is_date32(a) and pa.types.is_timestamp(b) and b.tz is None:
        return b
    if pa.types.is_date32(b) and pa.types.is_timestamp(a) and a.tz is None:
        return a
    if pa.types.is_struct(a) and pa.types.is_struct(b):  # JSON objects
        fa, fb = (pa.schema([t.field(i) for i in range(t.num_fields)]) for t in (a, b))
        merged = _merge_schemas(fa, fb, csv)
        return pa.struct(list(merged))
    if pa.types.is_list(a) and pa.types.is_list(b):
        return pa.list_(_merge_types(a.value_type, b.value_type, csv))
    if csv:  # any CSV value parses as text; as binary when it is not UTF-8
        return pa.binary() if pa.binary() in (a, b) else pa.string()
    if {a, b} <= {pa.string(), *(pa.timestamp(u) for u in _UNITS)}:
        return pa.string()
    raise pa.ArrowInvalid(f"JSON values change from {a} to {b} between rows")


def _parse_block(data: bytes, fmt: str, schema: pa.Schema, cols: list[str] | None) -> pa.Table:
    if fmt == "csv":  # the header is not in the block's bytes: its names come with the schema
        return pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=schema.names),
            convert_options=pacsv.ConvertOptions(column_types=schema, include_columns=cols or []),
        )
    if cols:
        schema = pa.schema([schema.field(c) for c in cols])
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    return pajson.read_json(pa.BufferReader(data), parse_options=options)


def _parse_whole(fh: IO[bytes], fmt: str) -> pa.Table:
    if fmt == "csv":
        return pacsv.read_csv(fh, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    return pajson.read_json(fh)


@functools.lru_cache(maxsize=2)
def _read_text_file(url: str, path: str, fmt: str, options: tuple[tuple[str, str], ...]) -> pa.Table:
    # Only for files whose rows are not one per line (see _scan_text); the last two are kept
    # so consecutive blocks of one file parse it once per process.
    fs, _ = filesystem(url, dict(options))
    with fs.open(path, "rb") as fh:
        return _parse_whole(fh, fmt)
