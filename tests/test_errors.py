"""The error hierarchy: all of it in errors.py, drawn and exported; every error survives
pickling (errors cross Ray) with its fields."""

from __future__ import annotations

import ast
import pickle
import types
from pathlib import Path

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
    e.PipelineBusy("pipeline demo is being run by host pid 1"),
    e.StoreError("sink", "s3://out/run", "EndpointConnectionError: could not connect"),
    e.DeploymentError("triton-demo", "no node holds {GPU: 1} (looked at 3 nodes)"),
]


@pytest.mark.parametrize("err", SAMPLES, ids=lambda x: type(x).__name__)
def test_errors_pickle_with_their_fields(err: e.TierflowError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
    assert back.retryable == err.retryable


def test_retryable_flags() -> None:
    assert e.TierUnavailable.retryable and e.TritonUnavailable.retryable
    assert not (e.ModelError.retryable or e.StageError.retryable or e.CorruptObject.retryable)


FRONT = {"Event", "Manifest", "PipelineStatus", "RunReport", "StageReport", "load_manifest", "run", "status",
         "validate"}


def test_public_surface_is_sorted_and_complete() -> None:
    assert tierflow.__all__ == sorted(tierflow.__all__)
    defined = {n for n, v in vars(e).items() if isinstance(v, type) and issubclass(v, e.TierflowError)}
    assert set(tierflow.__all__) == FRONT | defined  # exactly the front door and every error
    public = {n for n, v in vars(tierflow).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(tierflow.__all__)  # nothing else leaks out (submodules aside)
    for name in tierflow.__all__:
        assert getattr(tierflow, name) is not None
    assert callable(tierflow.run) and callable(tierflow.status) and callable(tierflow.validate)
    assert {type(x).__name__ for x in SAMPLES} | {"CacheError", "InferenceError", "TierflowError"} == defined


def test_every_error_is_drawn_in_the_tree() -> None:
    drawn = set((e.__doc__ or "").split("::", 1)[1].split())
    for name, value in vars(e).items():
        if isinstance(value, type) and issubclass(value, e.TierflowError):
            assert name in drawn, name


def test_no_tierflow_error_is_defined_outside_errors_py() -> None:
    package = Path(tierflow.__file__).parent
    names = {n for n, v in vars(e).items() if isinstance(v, type) and issubclass(v, e.TierflowError)}
    for path in package.rglob("*.py"):
        if path.name == "errors.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
                assert not bases & names, f"{path.relative_to(package)}: class {node.name}"
