"""Read values written by tierflow using only what ``storage/FORMAT.md`` says.

Nothing from ``tierflow`` is used on the reading side: a ``struct`` unpack, ``xxhash``,
``zstandard``, ``pyarrow.ipc``, ``lmdb`` and ``json``, following the document section by
section.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pyarrow as pa
import pytest
import xxhash
import zstandard

FORMAT_MD = Path(__file__).resolve().parents[2] / "storage" / "FORMAT.md"


def read_frame(frame: bytes) -> pa.Table | bytes:
    """FORMAT.md section 2, implemented from the table in the document."""
    assert len(frame) >= 40
    magic, version, codec, content, reserved, raw_len, stored_len, checksum = struct.unpack(
        "<4sBBBBQQ16s", frame[:40]
    )
    assert magic == b"TFBK" and version == 1 and reserved == 0
    assert codec in (0, 1) and content in (0, 1)
    payload = frame[40:]
    assert stored_len == len(payload)
    assert xxhash.xxh3_128(payload, seed=0).digest() == checksum
    if codec == 1:
        raw = zstandard.ZstdDecompressor().decompress(payload)
    else:
        assert raw_len == stored_len
        raw = payload
    assert len(raw) == raw_len
    if content == 1:
        return raw
    return pa.ipc.open_stream(raw).read_all()


def sample() -> pa.Table:
    return pa.table({"id": np.arange(5000), "x": np.linspace(0, 1, 5000), "s": [f"r{i}" for i in range(5000)]})


def test_format_md_exists_and_names_the_fields() -> None:
    text = FORMAT_MD.read_text()
    for needle in ("TFBK", "XXH3-128", "<QQB", "tierflow-lmdb/1", ".tfb", "lmdb:<node>", "_journal/<pipeline>",
                   "delta-<seq, 12 digits>.json", "lease.json", "expires_at"):
        assert needle in text


@pytest.mark.parametrize("level", [None, 3])
def test_remote_and_lmdb_values_are_readable_from_the_document(tmp_path: Path, level: int | None) -> None:
    from tierflow.cache import codec
    from tierflow.cache.settings import CacheSettings
    from tierflow.cache.tiered import TieredCache

    settings = CacheSettings(root=str(tmp_path), compression_level=level, lmdb_map_size=1 << 30)
    cache = TieredCache(settings, node_id="node-a")
    table = sample()
    key = "demo/3f9a1c0e5d7b2a41/clean/000042"
    meta = cache.put_table(key, table)
    cache.put("demo/opaque/000001", codec.encode_bytes(b'{"committed": 1}'))
    cache.close()

    # Section 4: the durable store is file://<root>/store and K's object is <url>/K.tfb.
    remote_frame = (tmp_path / "store" / f"{key}.tfb").read_bytes()
    assert read_frame(remote_frame).equals(table)
    assert remote_frame[5] == (0 if level is None else 1)
    assert read_frame((tmp_path / "store" / "demo" / "opaque" / "000001.tfb").read_bytes()) == (
        b'{"committed": 1}'
    )

    # Section 3: the LMDB environment at <root>/lmdb with four named databases.
    env = lmdb.open(str(tmp_path / "lmdb"), max_dbs=8, readonly=True, lock=False)
    try:
        blocks, meta_db, lru, info = (env.open_db(n, create=False) for n in (b"blocks", b"meta", b"lru", b"info"))
        with env.begin() as txn:
            assert txn.get(b"format", db=info) == b"tierflow-lmdb/1"
            local = txn.get(key.encode(), db=blocks)
            assert local is not None and local[5] == 0  # local copies are never compressed
            assert read_frame(local).equals(table)
            size, atime, flags = struct.unpack("<QQB", txn.get(key.encode(), db=meta_db))
            assert size == len(local) and flags & 1 == 0  # durable copy written: not pending
            assert txn.get(struct.pack(">Q", atime) + key.encode(), db=lru) == b""
            total = sum(struct.unpack("<QQB", v)[0] for _, v in txn.cursor(db=meta_db))
            assert struct.unpack("<Q", txn.get(b"used", db=info))[0] == total
    finally:
        env.close()

    # Section 2: the block checksum is XXH3-128 of the uncompressed content.
    content = local[40:]
    assert meta.checksum == "xxh3-128:" + xxhash.xxh3_128(content).hexdigest()
    # Section 5: location names.
    assert meta.locations == ("lmdb:node-a", "remote")


def read_journal(directory: Path) -> dict[str, Any]:
    """FORMAT.md section 6, "Reading": the snapshot, then the consecutive deltas after it."""
    state = json.loads((directory / "journal.json").read_text())
    assert state["version"] == 2
    listed = {int(m.group(1)): p for p in directory.iterdir() if (m := re.fullmatch(r"delta-(\d+)\.json", p.name))}
    seq = state["seq"]
    while seq + 1 in listed:
        delta = json.loads(listed[seq + 1].read_text())
        if (delta["version"], delta["seq"], delta["run_id"]) != (2, seq + 1, state["run_id"]):
            break  # the end of the log
        state["state"], state["updated_at"] = delta["state"], delta["updated_at"]
        for op in delta["ops"]:
            table = state["parts"] if op[0] == "part" else state["stages"][op[1]][op[0]]
            block, value = str(op[-2]), op[-1]
            if value is None:
                table.pop(block, None)
            else:
                table[block] = value
        seq += 1
    return state


def test_the_journal_is_readable_from_the_document(tmp_path: Path) -> None:
    from tierflow.engine.journal import Journal
    from tierflow.io.sink import PartMeta  # the writing side only

    root = tmp_path / "store" / "_journal" / "demo"  # section 6: <durable url>/_journal/<pipeline>/
    stages = {"clean": "f" * 64, "embed": "e" * 64}
    first = Journal.load(f"file://{root}")
    first.begin("demo", 100, stages, "s" * 64)
    for b in range(10, 100):  # a snapshot that outweighs the two deltas below (no compaction)
        first.record_block("embed", b, 10, 90, "xxh3-128:" + "9" * 32, ("remote",))
    first.finish("failed")
    j = Journal.load(f"file://{root}")
    j.begin("demo", 100, stages, "s" * 64)  # the next run: a snapshot
    j.record_block("clean", 0, 10, 100, "xxh3-128:" + "0" * 32, ("lmdb:n1",))
    j.record_block("clean", 1, 10, 100, "xxh3-128:" + "1" * 32, ("lmdb:n1", "remote"))
    j.record_rejected("clean", 1, 2)
    j.flush(force=True)  # delta 1
    j.add_locations("clean", 0, ("lmdb:n2",))
    j.forget_block("clean", 1)
    j.record_block("embed", 0, 10, 90, "xxh3-128:" + "2" * 32, ("remote",))
    j.record_part(0, PartMeta("part-000000.parquet", 10, 512, "3" * 32))
    j.flush(force=True)  # delta 2
    assert sorted(p.name for p in root.iterdir()) == [
        "delta-000000000001.json", "delta-000000000002.json", "journal.json", "lease.json"]

    doc = read_journal(root)
    assert (doc["pipeline"], doc["state"], doc["blocks"], doc["sink_fingerprint"]) == ("demo", "running", 100, "s" * 64)
    earlier = {str(b): [10, 90, "xxh3-128:" + "9" * 32, ["remote"]] for b in range(10, 100)}
    assert doc["stages"] == {
        "clean": {"fingerprint": "f" * 64, "done": {"0": [10, 100, "xxh3-128:" + "0" * 32, ["lmdb:n1", "lmdb:n2"]]},
                  "rejected": {"1": 2}},
        "embed": {"fingerprint": "e" * 64, "done": {"0": [10, 90, "xxh3-128:" + "2" * 32, ["remote"]], **earlier},
                  "rejected": {}},
    }
    assert doc["parts"] == {"0": ["part-000000.parquet", 10, 512, "3" * 32]}
    lease = json.loads((root / "lease.json").read_text())
    assert set(lease) == {"owner", "run_id", "host", "pid", "expires_at"} and lease["run_id"] == doc["run_id"]

    j.finish("succeeded")  # a finished journal is one snapshot: the deltas it covers are gone
    assert sorted(p.name for p in root.iterdir()) == ["journal.json", "lease.json"]
    final = read_journal(root)
    assert final == {**doc, "seq": final["seq"], "state": "succeeded", "updated_at": final["updated_at"]}
