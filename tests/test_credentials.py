"""``${VAR}`` credentials: refused in clear, resolved late, scrubbed from messages."""

from __future__ import annotations

import doctest

import pytest

import tierflow.credentials
from tierflow.cache.base import unavailable_error
from tierflow.credentials import check_storage_options, resolve_storage_options, scrub, secret_values


def test_doctests() -> None:
    result = doctest.testmod(tierflow.credentials, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("name", ["key", "secret", "token", "aws_secret_access_key", "password", "Private_Key"])
def test_literal_credentials_are_refused_without_echoing_them(name: str) -> None:
    with pytest.raises(ValueError, match=r"\$\{VAR\}") as info:
        check_storage_options({name: "literal-value"})
    assert repr(name) in str(info.value) and "literal-value" not in str(info.value)


@pytest.mark.parametrize("options", [
    {"secret": "${AWS_SECRET}"},          # a credential as a whole reference
    {"region": "eu-west-1", "anon": "false"},  # not credential-like: anything goes
    {"endpoint_url": "http://${HOST}:9000"},   # references may sit inside other text
])
def test_references_and_plain_options_pass(options: dict[str, str]) -> None:
    check_storage_options(options)


def test_a_credential_must_be_a_whole_reference() -> None:
    with pytest.raises(ValueError, match="looks like a credential"):
        check_storage_options({"secret": "prefix-${AWS_SECRET}"})


def test_references_resolve_from_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"key": "${TF_TEST_KEY}", "secret": "${TF_TEST_SECRET}",
               "client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "http://${TF_TEST_HOST}"}}
    monkeypatch.setenv("TF_TEST_SECRET", "s3cr3t-value")
    monkeypatch.setenv("TF_TEST_KEY", "AKIA123")
    monkeypatch.setenv("TF_TEST_HOST", "h:9000")
    resolved = resolve_storage_options(options)
    assert resolved["secret"] == "s3cr3t-value" and resolved["key"] == "AKIA123"
    assert resolved["client_kwargs"] == {"region_name": "eu-west-1", "endpoint_url": "http://h:9000"}
    assert options["secret"] == "${TF_TEST_SECRET}"  # the input keeps the reference
    assert sorted(secret_values(options)) == ["AKIA123", "h:9000", "s3cr3t-value"]
    assert resolve_storage_options(options, environ={"TF_TEST_KEY": "k", "TF_TEST_SECRET": "s",
                                                     "TF_TEST_HOST": "x"})["key"] == "k"


def test_an_unset_variable_is_named_not_guessed() -> None:
    with pytest.raises(KeyError, match="TF_NOT_SET_ANYWHERE"):
        resolve_storage_options({"secret": "${TF_NOT_SET_ANYWHERE}"}, environ={})
    with pytest.raises(KeyError, match=r"storage_options\['client_kwargs.token'\]"):
        resolve_storage_options({"client_kwargs": {"token": "${UNSET}"}}, environ={})
    assert secret_values({"secret": "${UNSET}"}, environ={}) == []


def test_scrub_replaces_the_longest_secret_first_and_leaves_short_ones() -> None:
    assert scrub("auth abcd1234 then abcd", ["abcd", "abcd1234"]) == "auth *** then ***"
    assert scrub("port 123", ["123"]) == "port 123"


def test_an_unavailable_tier_message_never_shows_a_resolved_secret() -> None:
    secrets = secret_values({"secret": "${S}"}, {"S": "sup3r-s3cret"})
    error = unavailable_error("remote:s3://b", OSError("denied for sup3r-s3cret"), secrets)
    assert error is not None and "sup3r-s3cret" not in str(error) and "***" in str(error)
