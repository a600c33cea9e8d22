"""The durable (remote) tier on ``memory://``, ``file://`` and a real S3 endpoint (moto)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from s3_endpoint import S3Endpoint, free_port

from tierflow.cache.tiers.remote import RemoteTier, redact_url
from tierflow.errors import CorruptObject, TierUnavailable

from .conformance import KEY, TierConformance, frame_of, table_frame


class TestMemoryRemote(TierConformance):
    @pytest.fixture()
    def tier(self, memory_store: str) -> Iterator[RemoteTier]:
        t = RemoteTier(memory_store)
        yield t
        t.close()


class TestFileRemote(TierConformance):
    @pytest.fixture()
    def tier(self, tmp_path: Path) -> Iterator[RemoteTier]:
        t = RemoteTier(f"file://{tmp_path}/store")
        yield t
        t.close()


@pytest.mark.s3
class TestS3Remote(TierConformance):
    large_bytes = 6 << 20

    @pytest.fixture()
    def tier(self, s3_env: S3Endpoint) -> Iterator[RemoteTier]:
        bucket = s3_env.make_bucket("tierflow-conformance")
        t = RemoteTier(f"{bucket}/{uuid.uuid4().hex}", s3_env.storage_options(), timeout_s=20)
        yield t
        t.close()


def test_layout_is_key_dot_tfb(tmp_path: Path) -> None:
    tier = RemoteTier(f"file://{tmp_path}/store")
    tier.put(KEY, frame_of(b"x"))
    assert (tmp_path / "store" / f"{KEY}.tfb").read_bytes() == frame_of(b"x")
    assert sorted(p.name for p in (tmp_path / "store" / "demo" / "3f9a1c0e" / "clean").iterdir()) == [
        "000042.tfb"
    ]


def test_nothing_is_written_outside_the_root(tmp_path: Path) -> None:
    tier = RemoteTier(f"file://{tmp_path}/store")
    for bad in ("../outside", "demo/../../outside", "/abs"):
        with pytest.raises(ValueError):
            tier.put(bad, frame_of(b"x"))
    assert sorted(os.listdir(tmp_path)) == []


def test_temp_files_are_not_listed(tmp_path: Path) -> None:
    tier = RemoteTier(f"file://{tmp_path}/store")
    tier.put(KEY, frame_of(b"x"))
    (tmp_path / "store" / "demo" / ".000043.tfb.tmp-1-abcd").write_bytes(b"partial")
    (tmp_path / "store" / "demo" / "stray.txt").write_bytes(b"not ours")
    assert list(tier.list()) == [KEY]


def test_flipped_byte_in_the_stored_object_is_detected(memory_store: str) -> None:
    tier = RemoteTier(memory_store)
    value = table_frame()
    tier.put(KEY, value)
    fs = fsspec.filesystem("memory")
    damaged = bytearray(fs.cat_file(tier.path(KEY)))
    damaged[7] ^= 0x40  # the reserved header byte
    fs.pipe_file(tier.path(KEY), bytes(damaged))
    with pytest.raises(CorruptObject, match="reserved"):
        tier.get(KEY)


def test_redact_url() -> None:
    assert redact_url("s3://AKIA:pw@bucket/x?sig=1#f") == "s3://bucket/x"
    assert redact_url("file:///tmp/x") == "file:///tmp/x"
    assert RemoteTier("s3://user:pw@bucket/p").name == "remote:s3://bucket/p"


def test_missing_variable_is_named_without_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_TEST_NOT_SET", raising=False)
    tier = RemoteTier("s3://bucket/p", {"secret": "${TF_TEST_NOT_SET}"})
    with pytest.raises(TierUnavailable, match=r"TF_TEST_NOT_SET.*not set") as info:
        tier.get(KEY)
    assert info.value.tier == "remote:s3://bucket/p"


@pytest.mark.s3
def test_s3_objects_land_under_the_prefix(s3_env: S3Endpoint) -> None:
    bucket = s3_env.make_bucket("tierflow-layout")
    tier = RemoteTier(f"{bucket}/cache", s3_env.storage_options())
    tier.put(KEY, frame_of(b"s3"))
    import s3fs

    fs = s3fs.S3FileSystem(key=s3_env.key, secret=s3_env.secret, endpoint_url=s3_env.endpoint_url,
                           skip_instance_cache=True)
    assert fs.cat_file(f"tierflow-layout/cache/{KEY}.tfb") == frame_of(b"s3")


@pytest.mark.s3
def test_s3_bad_credentials_fail_without_leaking(s3_env: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto accepts any key pair, so use a bucket that does not exist for a write error."""
    tier = RemoteTier("s3://no-such-bucket-tierflow/x", s3_env.storage_options(), timeout_s=10)
    with pytest.raises(TierUnavailable) as info:
        tier.put(KEY, frame_of(b"x"))
    assert "remote:s3://no-such-bucket-tierflow/x" in str(info.value)
    assert s3_env.secret not in str(info.value) and s3_env.key not in str(info.value)


def test_unreachable_s3_fails_fast_naming_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sup3r-s3cret-value-never-printed"
    monkeypatch.setenv("TF_TEST_UNREACH_KEY", "AKIATESTKEY0000")
    monkeypatch.setenv("TF_TEST_UNREACH_SECRET", secret)
    endpoint = f"http://127.0.0.1:{free_port()}"
    tier = RemoteTier(
        "s3://bucket/prefix",
        {"key": "${TF_TEST_UNREACH_KEY}", "secret": "${TF_TEST_UNREACH_SECRET}", "endpoint_url": endpoint},
        timeout_s=3.0,
    )
    for op in (lambda: tier.get(KEY), lambda: tier.put(KEY, frame_of(b"x")), lambda: tier.contains(KEY)):
        start = time.monotonic()
        with pytest.raises(TierUnavailable) as info:
            op()
        elapsed = time.monotonic() - start
        assert elapsed < 10, elapsed
        message = str(info.value)
        assert "remote:s3://bucket/prefix" in message
        assert secret not in message and "AKIATESTKEY0000" not in message
        cause = info.value.__cause__
        assert cause is not None and secret not in str(cause)
