"""Read values written by tierflow using only what ``storage/FORMAT.md`` says.

Nothing from ``tierflow`` is used on the reading side: a ``struct`` unpack, ``xxhash``,
``zstandard``, ``pyarrow.ipc`` and ``lmdb``, following the document section by section.
"""

from __future__ import annotations

import struct
from pathlib import Path

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
    for needle in ("TFBK", "XXH3-128", "<QQB", "tierflow-lmdb/1", ".tfb", "lmdb:<node>"):
        assert needle in text


@pytest.mark.parametrize("level", [None, 3])
def test_remote_and_lmdb_values_are_readable_from_the_document(tmp_path: Path, level: int | None) -> None:
    from tierflow.cache.settings import CacheSettings
    from tierflow.cache.tiered import TieredCache

    settings = CacheSettings(root=str(tmp_path), compression_level=level, lmdb_map_size=1 << 30)
    cache = TieredCache(settings, node_id="node-a")
    table = sample()
    key = "demo/3f9a1c0e5d7b2a41/clean/000042"
    meta = cache.put_table(key, table)
    cache.put_bytes("demo/_journal/000001", b'{"committed": 1}')
    cache.close()

    # Section 4: the durable store is file://<root>/store and K's object is <url>/K.tfb.
    remote_frame = (tmp_path / "store" / f"{key}.tfb").read_bytes()
    assert read_frame(remote_frame).equals(table)
    assert remote_frame[5] == (0 if level is None else 1)
    assert read_frame((tmp_path / "store" / "demo" / "_journal" / "000001.tfb").read_bytes()) == (
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
