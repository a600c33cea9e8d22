"""Sources: list the input files and cut them into deterministic blocks of rows.

The same files always give the same blocks (files sorted by path, then row ranges of
``block_rows``), which is what makes block keys stable across runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from tierflow.io.fs import filesystem
from tierflow.manifest import SourceConfig

_EXTENSIONS = {"parquet": (".parquet", ".pq"), "jsonl": (".jsonl", ".json", ".ndjson"), "csv": (".csv",)}


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: str  # path inside the filesystem
    size: int
    version: str  # mtime or ETag: a changed file changes every key downstream
    rows: int


@dataclass(frozen=True, slots=True)
class BlockSpec:
    index: int
    file: str
    offset: int
    rows: int


@dataclass(frozen=True, slots=True)
class Source:
    """A source with its URL resolved (picklable: shipped to the tasks that read blocks)."""

    config: SourceConfig
    url: str

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
        out = []
        for p in sorted(paths):
            info = fs.info(p)
            version = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
            out.append(SourceFile(p, int(info.get("size") or 0), version, self._count_rows(p)))
        return out

    def plan(self, files: list[SourceFile]) -> list[BlockSpec]:
        step = self.config.block_rows
        blocks: list[BlockSpec] = []
        for f in files:
            for offset in range(0, f.rows, step):
                blocks.append(BlockSpec(len(blocks), f.path, offset, min(step, f.rows - offset)))
        return blocks

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
        table = self._text(block.file)
        if cols:
            table = table.select(cols)
        return table.slice(block.offset, block.rows)

    def read_schema(self, file: SourceFile) -> pa.Schema:
        """The schema of one input file (Parquet: from its footer only)."""
        if self.config.format == "parquet":
            fs, _ = filesystem(self.url, self.config.storage_options)
            with fs.open(file.path, "rb") as fh:
                return pq.ParquetFile(fh).schema_arrow
        return self._text(file.path).schema

    def _count_rows(self, path: str) -> int:
        if self.config.format == "parquet":
            fs, _ = filesystem(self.url, self.config.storage_options)
            with fs.open(path, "rb") as fh:
                return int(pq.ParquetFile(fh).metadata.num_rows)
        return self._text(path).num_rows

    def _text(self, path: str) -> pa.Table:
        return _read_text_file(self.url, path, self.config.format, tuple(self.config.storage_options.items()))


@functools.lru_cache(maxsize=2)
def _read_text_file(url: str, path: str, fmt: str, options: tuple[tuple[str, str], ...]) -> pa.Table:
    # CSV/JSONL have no row index: a file is parsed whole, and the last two are kept so
    # consecutive blocks of one file parse it once per process.
    fs, _ = filesystem(url, dict(options))
    with fs.open(path, "rb") as fh:
        return pacsv.read_csv(fh) if fmt == "csv" else pajson.read_json(fh)
