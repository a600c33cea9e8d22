"""The error hierarchy: every error survives pickling (errors cross Ray) with its fields."""

from __future__ import annotations

import pickle

import pytest

import tierflow
from tierflow import errors as e

SAMPLES = [
    e.ManifestError("m.yaml", [("stages[0].fn", "cannot import")]),
    e.InvalidKey("bad/../key"),
    e.TierUnavailable("remote", "timeout"),
    e.CorruptObject("p/f/s/000001", "checksum mismatch"),
    e.ReplicaLost("p/f/s/000001", ["lmdb:a", "remote"]),
    e.TritonUnavailable("127.0.0.1:8001", "connection refused"),
    e.ModelError("mlp", "no output 'X'"),
    e.StageError("clean", 3, "ValueError: bad"),
    e.SinkError("out exists"),
]


@pytest.mark.parametrize("err", SAMPLES, ids=lambda x: type(x).__name__)
def test_errors_pickle_with_their_fields(err: e.TierflowError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
    assert back.retryable == err.retryable


def test_retryable_flags() -> None:
    assert e.TierUnavailable.retryable and e.TritonUnavailable.retryable
    assert not (e.ModelError.retryable or e.StageError.retryable or e.CorruptObject.retryable)


def test_public_surface_is_sorted_and_complete() -> None:
    assert tierflow.__all__ == sorted(tierflow.__all__)
    for name in tierflow.__all__:
        assert issubclass(getattr(tierflow, name), e.TierflowError)
