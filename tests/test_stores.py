"""Every store tierflow opens (journal, source, sink, durable tier) gets the same bounds."""

from __future__ import annotations

import pytest

from tierflow.cache.tiers.remote import RemoteTier
from tierflow.engine.journal import Journal
from tierflow.io.fs import filesystem
from tierflow.stores import STORE_TIMEOUT_S, open_store

S3 = {"endpoint_url": "http://127.0.0.1:9", "key": "${TF_TEST_KEY}", "secret": "${TF_TEST_SECRET}"}


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_TEST_KEY", "k")
    monkeypatch.setenv("TF_TEST_SECRET", "s")


def _bounds(fs: object) -> tuple[int, dict[str, object]]:
    return fs.retries, fs.config_kwargs  # type: ignore[attr-defined]


def test_s3_stores_retry_twice_and_time_out_instead_of_botocore_defaults() -> None:
    for fs in (open_store("s3://b/p", S3)[0], filesystem("s3://b/p", S3)[0], Journal("s3://b/j", dict(S3))._fs[0]):
        retries, config = _bounds(fs)
        assert retries == 2
        assert config["retries"] == {"max_attempts": 2, "mode": "standard"}
        assert config["connect_timeout"] == 10.0 and config["read_timeout"] == STORE_TIMEOUT_S
        assert fs.key == "k"  # type: ignore[attr-defined]  # ${VAR} resolved when opened


def test_the_manifest_s_own_settings_win_and_the_tier_uses_its_timeout() -> None:
    mine = {**S3, "config_kwargs": {"read_timeout": 300, "retries": {"max_attempts": 9}}}
    _, config = _bounds(open_store("s3://b/p", mine)[0])
    assert config["read_timeout"] == 300 and config["retries"] == {"max_attempts": 9}
    assert config["connect_timeout"] == 10.0

    tier = RemoteTier("s3://b/cache", S3, timeout_s=4.0)
    _, config = _bounds(tier._filesystem())
    assert config["connect_timeout"] == 4.0 and config["read_timeout"] == 4.0


def test_local_stores_are_left_as_they_are() -> None:
    fs, path = open_store("file:///tmp/x", {"auto_mkdir": True})
    assert path == "/tmp/x" and not hasattr(fs, "config_kwargs")
