"""Keys, the frame codec and settings: validation, round trips, every-byte corruption."""

from __future__ import annotations

import doctest
import pickle

import numpy as np
import pyarrow as pa
import pytest

import tierflow.cache.codec
import tierflow.cache.keys
import tierflow.cache.locations
import tierflow.cache.settings
import tierflow.cache.tiers.remote
from tierflow.cache import codec
from tierflow.cache.keys import block_key, key_prefix, parse_block_key, validate_key
from tierflow.cache.settings import CacheSettings
from tierflow.errors import CorruptObject, InvalidKey

from .conformance import BAD_KEYS


@pytest.mark.parametrize(
    "module",
    [tierflow.cache.keys, tierflow.cache.locations, tierflow.cache.settings, tierflow.cache.tiers.remote],
    ids=lambda m: m.__name__,
)
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("bad", BAD_KEYS, ids=lambda k: repr(k)[:30])
def test_bad_keys(bad: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(bad)


def test_good_keys() -> None:
    for key in ["demo/3f9a/clean/000042", "a", "A-b_c.d/e", "p/f/s/1234567"]:
        assert validate_key(key) == key
    assert block_key("demo", "3f9a", "clean", 42) == "demo/3f9a/clean/000042"
    assert block_key("demo", "3f9a", "clean", 1234567) == "demo/3f9a/clean/1234567"
    assert str(parse_block_key("demo/3f9a/clean/000042")) == "demo/3f9a/clean/000042"
    assert key_prefix() == "" and key_prefix("demo") == "demo/"
    with pytest.raises(InvalidKey):
        block_key("demo", "f", "s", -1)
    with pytest.raises(InvalidKey):
        block_key("de/mo", "f", "s", 1)
    with pytest.raises(InvalidKey):
        parse_block_key("demo/f/s")
    with pytest.raises(InvalidKey):
        validate_key(42)  # type: ignore[arg-type]


def sample_table() -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "id": pa.array(np.arange(300, dtype=np.int64)),
            "x": pa.array(rng.random(300)),
            "text": pa.array([f"row {i}" for i in range(300)]),
            "tags": pa.array([[i, i + 1] for i in range(300)]),
        }
    )


@pytest.mark.parametrize("level", [None, 1, 3])
def test_table_roundtrip(level: int | None) -> None:
    table = sample_table()
    data = codec.encode_table(table, level)
    header = codec.read_header(data, "k")
    assert header.codec == (codec.Codec.NONE if level is None else codec.Codec.ZSTD)
    assert header.content == codec.Content.ARROW
    assert codec.decode_table(data, "k").equals(table)
    assert codec.decode_table(memoryview(data), "k").equals(table)


def test_decode_is_zero_copy_for_uncompressed_frames() -> None:
    data = codec.encode_table(pa.table({"x": np.arange(100_000)}))
    table = codec.decode_table(data, "k")
    address = table.column("x").chunk(0).buffers()[1].address
    base = pa.py_buffer(data).address
    assert base <= address < base + len(data)


def test_recode_changes_only_the_codec() -> None:
    table = sample_table()
    plain = codec.encode_table(table)
    packed = codec.recode(plain, "k", 3)
    assert codec.read_header(packed, "k").codec == codec.Codec.ZSTD
    assert codec.recode(packed, "k", None) == plain
    assert codec.recode(plain, "k", None) is plain
    assert codec.decode_table(packed, "k").equals(table)


@pytest.mark.parametrize("level", [None, 1])
def test_every_flipped_byte_is_detected(level: int | None) -> None:
    data = codec.encode_table(pa.table({"x": [1, 2, 3], "s": ["a", "b", "c"]}), level)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[i] ^= bit
            with pytest.raises(CorruptObject):
                codec.decode_table(bytes(damaged), "k")


def test_every_truncation_is_detected() -> None:
    data = codec.encode_table(pa.table({"x": [1, 2, 3]}))
    for n in range(len(data)):
        with pytest.raises(CorruptObject):
            codec.verify(data[:n], "k")
    with pytest.raises(CorruptObject):
        codec.verify(data + b"\0", "k")


def test_content_types_are_not_confused() -> None:
    assert codec.decode_bytes(codec.encode_bytes(b"journal"), "k") == b"journal"
    assert codec.decode_bytes(codec.encode_bytes(b"journal", 1), "k") == b"journal"
    with pytest.raises(CorruptObject, match="not an Arrow table"):
        codec.decode_table(codec.encode_bytes(b"x"), "k")
    with pytest.raises(CorruptObject, match="not opaque bytes"):
        codec.decode_bytes(codec.encode_table(pa.table({"x": [1]})), "k")


def test_a_valid_frame_around_garbage_arrow_is_corrupt() -> None:
    data = codec.frame(b"definitely not an arrow stream", content=codec.Content.ARROW)
    with pytest.raises(CorruptObject, match="Arrow IPC"):
        codec.decode_table(data, "k")


def test_implausible_raw_length_is_corrupt() -> None:
    import struct

    data = bytearray(codec.encode_bytes(b"x" * 100, 1))
    struct.pack_into("<Q", data, 8, 1 << 50)
    with pytest.raises(CorruptObject, match="implausible"):
        codec.read_header(bytes(data), "k")


def test_settings_are_picklable_hashable_and_hold_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_TEST_SECRET", "s3cr3t-value")
    monkeypatch.setenv("TF_TEST_KEY", "AKIA123")
    settings = CacheSettings(
        root="/tmp/x",
        remote_url="s3://bucket/p",
        storage_options={"key": "${TF_TEST_KEY}", "secret": "${TF_TEST_SECRET}",
                         "client_kwargs": {"region_name": "eu-west-1"}},
    )
    clone = pickle.loads(pickle.dumps(settings))
    assert clone == settings and hash(clone) == hash(settings)
    for shown in (repr(settings), str(settings), repr(settings.storage_options), str(dict(settings.storage_options))):
        assert "s3cr3t-value" not in shown and "AKIA123" not in shown and "${TF_TEST_SECRET}" in shown
    assert b"s3cr3t-value" not in pickle.dumps(settings) and b"AKIA123" not in pickle.dumps(settings)
    assert settings.durable_url == "s3://bucket/p"
    assert CacheSettings(root="/tmp/x").durable_url == "file:///tmp/x/store"


def test_settings_refuse_a_credential_in_clear() -> None:
    with pytest.raises(ValueError, match=r"\$\{VAR\}") as info:
        CacheSettings(root="/tmp/x", storage_options={"secret": "hunter2"})
    assert "hunter2" not in str(info.value)
