"""Error mapping and retry/backoff, without a server.

The retry tests drive the real :class:`TritonStageClient` loop through ``FakeTriton``, a
tiny stand-in for ``tritonclient.grpc.InferenceServerClient`` that answers with real
``InferResult`` objects and fails on cue. Everything else in tests/triton uses the real server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from tierflow.errors import InferenceError, ModelError, TritonUnavailable
from tierflow.triton.client import (
    STATUS_ERRORS,
    RetryPolicy,
    TritonStageClient,
    map_triton_errors,
)

REPO = Path(__file__).resolve().parents[2] / "triton_models"
URL = "fake:8001"

# ----------------------------------------------------------------------------- mapping


def test_every_grpc_status_is_mapped_deliberately() -> None:
    assert set(STATUS_ERRORS) == set(grpc.StatusCode)
    for code, cls in STATUS_ERRORS.items():
        assert cls in (TritonUnavailable, ModelError), code


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_map_triton_errors_per_status(code: grpc.StatusCode) -> None:
    original = InferenceServerException("boom", status=str(code))
    with pytest.raises(InferenceError) as info, map_triton_errors(URL, "m"):
        raise original
    err = info.value
    assert type(err) is STATUS_ERRORS[code]
    assert err.__cause__ is original
    assert code.name in str(err) and "boom" in str(err)
    if isinstance(err, TritonUnavailable):
        assert err.retryable and err.url == URL
    else:
        assert isinstance(err, ModelError)
        assert not err.retryable and err.model == "m"


def test_retryable_codes_are_exactly_the_transient_ones() -> None:
    retryable = {c for c, cls in STATUS_ERRORS.items() if cls.retryable}
    S = grpc.StatusCode
    assert retryable == {
        S.UNAVAILABLE,
        S.DEADLINE_EXCEEDED,
        S.RESOURCE_EXHAUSTED,
        S.ABORTED,
        S.CANCELLED,
    }
    for never in (S.INVALID_ARGUMENT, S.NOT_FOUND, S.UNIMPLEMENTED):
        assert never not in retryable


def test_raw_grpc_error_is_mapped_too() -> None:
    class RawError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "socket closed"

    with (
        pytest.raises(TritonUnavailable, match="UNAVAILABLE: socket closed"),
        map_triton_errors(URL, "m"),
    ):
        raise RawError()


def test_statusless_and_unknown_status_are_model_errors() -> None:
    with pytest.raises(ModelError, match="unable to set data"), map_triton_errors(URL, "m"):
        raise InferenceServerException("unable to set data")
    with pytest.raises(ModelError, match="teapot"), map_triton_errors(URL, "m"):
        raise InferenceServerException("teapot", status="418")


def test_connection_error_is_unavailable_and_others_pass_through() -> None:
    with pytest.raises(TritonUnavailable, match="connection failed"), map_triton_errors(URL, "m"):
        raise ConnectionResetError("reset")
    with pytest.raises(KeyError), map_triton_errors(URL, "m"):
        raise KeyError("ours")


# ----------------------------------------------------------------------------- policy


def test_backoff_sequence_is_exponential_and_capped() -> None:
    policy = RetryPolicy(max_attempts=6, base_delay_s=0.1, max_delay_s=0.5, jitter=0.0)
    assert [policy.delay_s(k) for k in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_jitter_only_shortens_within_bounds() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=1.0, jitter=0.25)
    assert policy.delay_s(1, 0.0) == 1.0
    assert policy.delay_s(1, 0.999) == pytest.approx(0.75025)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay_s": -1.0},
        {"base_delay_s": 2.0, "max_delay_s": 1.0},
        {"jitter": 1.5},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


# ----------------------------------------------------------------------------- fake client


class FakeTriton:
    """Answers like ``InferenceServerClient`` for mlp_classifier; ``fail(call)`` picks errors.

    ``fail`` gets the 0-based index of each ``async_infer`` call and returns a gRPC status
    name to fail it with, or ``None`` to answer with zeros of the declared shapes.
    """

    def __init__(self, fail: Callable[[int], str | None] = lambda call: None) -> None:
        self.fail = fail
        self.calls = 0
        config = model_config_pb2.ModelConfig()
        text_format.Parse((REPO / "mlp_classifier" / "config.pbtxt").read_text(), config)
        self.config = config

    def get_model_config(self, model: str, client_timeout: float | None = None) -> Any:
        return service_pb2.ModelConfigResponse(config=self.config)

    def async_infer(
        self, model: str, inputs: list[Any], callback: Any, outputs: Any = None, **_: Any
    ) -> None:
        call, self.calls = self.calls, self.calls + 1
        status = self.fail(call)
        if status is not None:
            callback(None, InferenceServerException("injected", status=f"StatusCode.{status}"))
            return
        rows = inputs[0].shape()[0]
        response = service_pb2.ModelInferResponse(model_name=model)
        for name, datatype, dims, dtype in (
            ("PROBS", "FP32", [4], np.float32),
            ("LABEL", "INT64", [1], np.int64),
        ):
            response.outputs.add(name=name, datatype=datatype, shape=[rows, *dims])
            response.raw_output_contents.append(np.zeros((rows, *dims), dtype).tobytes())
        callback(grpcclient.InferResult(response), None)


def _client(fake: FakeTriton, sleeps: list[float], **kwargs: Any) -> TritonStageClient:
    kwargs.setdefault(
        "retry", RetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=0.5, jitter=0.0)
    )
    return TritonStageClient(
        URL,
        "mlp_classifier",
        {"x": "FEATURES"},
        {"PROBS": "p", "LABEL": "label"},
        sleep=sleeps.append,
        client_factory=lambda url: fake,
        **kwargs,
    )


def _table(rows: int) -> pa.Table:
    values = pa.array(np.zeros(rows * 16, np.float32))
    return pa.table({"x": pa.FixedSizeListArray.from_arrays(values, 16)})


def test_retries_follow_the_backoff_then_succeed() -> None:
    fake = FakeTriton(lambda call: "UNAVAILABLE" if call < 4 else None)
    sleeps: list[float] = []
    out = _client(fake, sleeps, batch_size=64, max_inflight=1).infer_table(_table(10))
    assert out.num_rows == 10 and out.column_names == ["x", "p", "label"]
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert fake.calls == 5


def test_gives_up_after_max_attempts() -> None:
    fake = FakeTriton(lambda call: "DEADLINE_EXCEEDED")
    sleeps: list[float] = []
    with pytest.raises(TritonUnavailable, match="gave up after 5 attempt") as info:
        _client(fake, sleeps, max_inflight=1).infer_table(_table(10))
    assert info.value.url == URL
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert fake.calls == 5


@pytest.mark.parametrize("status", ["INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED", "INTERNAL"])
def test_non_retryable_fails_at_once(status: str) -> None:
    fake = FakeTriton(lambda call: status)
    sleeps: list[float] = []
    with pytest.raises(ModelError, match=status):
        _client(fake, sleeps).infer_table(_table(10))
    assert sleeps == [] and fake.calls == 1


def test_one_outage_backs_off_once_for_all_inflight_requests() -> None:
    # Four requests in flight fail together; one pause covers all of them.
    fake = FakeTriton(lambda call: "UNAVAILABLE" if call < 4 else None)
    sleeps: list[float] = []
    out = _client(fake, sleeps, batch_size=8, max_inflight=4).infer_table(_table(32))
    assert out.num_rows == 32
    assert sleeps == pytest.approx([0.1])
    assert fake.calls == 8


def test_jittered_delays_stay_within_bounds() -> None:
    fake = FakeTriton(lambda call: "UNAVAILABLE" if call < 4 else None)
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=0.5, jitter=0.5)
    _client(fake, sleeps, max_inflight=1, retry=policy).infer_table(_table(4))
    for got, cap in zip(sleeps, [0.1, 0.2, 0.4, 0.5], strict=True):
        assert cap * 0.5 <= got <= cap


def test_config_fetch_is_retried_too() -> None:
    class Flaky(FakeTriton):
        fetches = 0

        def get_model_config(self, model: str, client_timeout: float | None = None) -> Any:
            self.fetches += 1
            if self.fetches < 3:
                raise InferenceServerException("starting", status="StatusCode.UNAVAILABLE")
            return super().get_model_config(model, client_timeout)

    fake = Flaky()
    sleeps: list[float] = []
    assert _client(fake, sleeps).spec.max_batch_size == 256
    assert sleeps == pytest.approx([0.1, 0.2])
