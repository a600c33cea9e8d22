"""The Parquet sink: one part per block, committed atomically, ``_SUCCESS`` written last.

A reader that trusts ``_SUCCESS`` never sees a partial or duplicate part: parts have
deterministic names (``part-<block>.parquet``), each is written atomically (temp file +
rename on local disks, a single-object PUT on object stores), and ``_SUCCESS`` — a JSON
manifest of the parts, their rows and checksums — is written only after every part.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from tierflow.errors import SinkError
from tierflow.io.fs import filesystem, fs_errors, store_op, write_atomic
from tierflow.manifest import SinkConfig

SUCCESS = "_SUCCESS"


@dataclass(frozen=True, slots=True)
class PartMeta:
    name: str
    rows: int
    bytes: int
    checksum: str  # xxh3-128 of the part file


@dataclass(frozen=True, slots=True)
class Sink:
    config: SinkConfig
    url: str

    @staticmethod
    def part_name(block: int) -> str:
        return f"part-{block:06d}.parquet"

    def _fs(self):  # type: ignore[no-untyped-def]
        return filesystem(self.url, self.config.storage_options)

    @store_op("sink")
    def is_complete(self) -> bool:
        fs, root = self._fs()
        return bool(fs.exists(f"{root}/{SUCCESS}"))

    @store_op("sink")
    def prepare(self) -> None:
        """Check ``mode`` and make the output stop looking complete before any part is written.

        Raises SinkError when ``mode: error`` and a complete output is already there.
        """
        fs, root = self._fs()
        if fs.exists(f"{root}/{SUCCESS}"):
            if self.config.mode == "error":
                raise SinkError(
                    f"{self.url} already holds a complete output (mode: error); "
                    "use mode: overwrite or another path"
                )
            fs.rm_file(f"{root}/{SUCCESS}")
        fs.makedirs(root, exist_ok=True)

    @store_op("sink")
    def write_part(self, block: int, table: pa.Table) -> PartMeta:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        name = self.part_name(block)
        fs, root = self._fs()
        write_atomic(fs, f"{root}/{name}", data)
        return PartMeta(name, table.num_rows, len(data), xxhash.xxh3_128_hexdigest(data))

    @store_op("sink")
    def commit(self, parts: list[PartMeta], extra: dict[str, object] | None = None) -> None:
        """Remove parts no longer in the plan, then write ``_SUCCESS`` listing ``parts``."""
        fs, root = self._fs()
        keep = {p.name for p in parts}
        for path in fs.ls(root, detail=False):
            base = path.rsplit("/", 1)[-1]
            if base.startswith("part-") and base not in keep:
                fs.rm_file(path)
        doc = {
            "parts": [asdict(p) for p in sorted(parts, key=lambda p: p.name)],
            "rows": sum(p.rows for p in parts),
            "committed_at": time.time(),
            **(extra or {}),
        }
        write_atomic(fs, f"{root}/{SUCCESS}", json.dumps(doc, indent=1).encode())

    @store_op("sink")
    def existing_parts(self) -> dict[str, int]:
        """Part files present now: name -> size (one listing)."""
        fs, root = self._fs()
        try:
            entries = fs.ls(root, detail=True)
        except FileNotFoundError:
            return {}
        return {
            e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e["name"].rsplit("/", 1)[-1].startswith("part-")
        }


def read_success(url: str, storage_options: dict[str, str] | None = None) -> dict[str, object] | None:
    """The ``_SUCCESS`` manifest of a committed output, or None."""
    with fs_errors("sink", url, storage_options):
        fs, root = filesystem(url, storage_options)
        try:
            return json.loads(fs.cat_file(f"{root}/{SUCCESS}"))  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None
