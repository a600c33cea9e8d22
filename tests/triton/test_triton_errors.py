"""Error mapping, retry/backoff, readiness waits and endpoint failover, without a server.

The retry tests drive the real :class:`TritonStageClient` loop through ``FakeTriton``, a
tiny stand-in for ``tritonclient.grpc.InferenceServerClient`` that answers with real
``InferResult`` objects and fails on cue, and ``FakeTime``, an injected sleep and clock.
Everything else in tests/triton uses the real server (``test_triton_failover.py`` repeats
the restart, failover and hung-server cases against real ones).
"""

from __future__ import annotations

import threading
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
from tierflow.triton.client import TritonStageClient
from tierflow.retry import RetryPolicy
from tierflow.triton.endpoints import EndpointStats
from tierflow.triton.errors import STATUS_ERRORS, map_triton_errors

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


class FakeTime:
    """Injected ``sleep`` and ``clock``: sleeping advances the clock and is recorded.

    ``on_sleep(n)`` runs after the ``n``-th sleep (1-based): a server comes back, say.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[int], None] = lambda n: None

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.on_sleep(len(self.sleeps))

    def clock(self) -> float:
        return self.now


class FakeTriton:
    """Answers like ``InferenceServerClient`` for mlp_classifier; ``fail(call)`` picks errors.

    ``fail`` gets the 0-based index of each ``async_infer`` call and returns a gRPC status
    name to fail it with, or ``None`` to answer with zeros of the declared shapes. While
    ``down`` is set every call fails with UNAVAILABLE, readiness polls included; ``ready``
    decides what a poll of a server that is up answers.
    """

    def __init__(self, fail: Callable[[int], str | None] = lambda call: None) -> None:
        self.fail = fail
        self.calls = 0
        self.polls = 0
        self.down = False
        self.ready: Callable[[int], bool] = lambda poll: True
        config = model_config_pb2.ModelConfig()
        text_format.Parse((REPO / "mlp_classifier" / "config.pbtxt").read_text(), config)
        self.config = config

    def _unavailable(self) -> InferenceServerException:
        return InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")

    def get_model_config(self, model: str, model_version: str = "", client_timeout: float | None = None) -> Any:
        if self.down:
            raise self._unavailable()
        return service_pb2.ModelConfigResponse(config=self.config)

    def is_model_ready(self, model: str, model_version: str = "", client_timeout: float | None = None) -> bool:
        poll, self.polls = self.polls, self.polls + 1
        if self.down:
            raise self._unavailable()
        return self.ready(poll)

    def async_infer(
        self, model: str, inputs: list[Any], callback: Any, outputs: Any = None, **_: Any
    ) -> None:
        call, self.calls = self.calls, self.calls + 1
        status = "UNAVAILABLE" if self.down else self.fail(call)
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
            response.raw_output_contents.append(np.full((rows, *dims), rows, dtype).tobytes())
        callback(grpcclient.InferResult(response), None)


POLICY = RetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=0.5, jitter=0.0)


def _client(
    fakes: FakeTriton | dict[str, FakeTriton], t: FakeTime, **kwargs: Any
) -> TritonStageClient:
    if isinstance(fakes, FakeTriton):
        fakes = {URL: fakes}
    kwargs.setdefault("retry", POLICY)
    return TritonStageClient(
        list(fakes),
        "mlp_classifier",
        {"x": "FEATURES"},
        {"PROBS": "p", "LABEL": "label"},
        sleep=t.sleep,
        clock=t.clock,
        client_factory=fakes.__getitem__,
        **kwargs,
    )


def _table(rows: int) -> pa.Table:
    values = pa.array(np.zeros(rows * 16, np.float32))
    return pa.table({"x": pa.FixedSizeListArray.from_arrays(values, 16)})


def test_retries_follow_the_backoff_then_succeed() -> None:
    fake = FakeTriton(lambda call: "UNAVAILABLE" if call < 4 else None)
    t = FakeTime()
    out = _client(fake, t, batch_size=64, max_inflight=1).infer_table(_table(10))
    assert out.num_rows == 10 and out.column_names == ["x", "p", "label"]
    assert t.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert fake.calls == 5
    assert fake.polls == 4  # one readiness poll before each retry; each said ready


def test_gives_up_after_max_attempts() -> None:
    fake = FakeTriton(lambda call: "DEADLINE_EXCEEDED")
    t = FakeTime()
    with pytest.raises(TritonUnavailable, match="gave up after 5 attempt") as info:
        _client(fake, t, max_inflight=1).infer_table(_table(10))
    assert info.value.url == URL
    assert t.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert fake.calls == 5


@pytest.mark.parametrize("status", ["INVALID_ARGUMENT", "UNIMPLEMENTED", "INTERNAL"])
def test_non_retryable_fails_at_once(status: str) -> None:
    fake = FakeTriton(lambda call: status)
    t = FakeTime()
    with pytest.raises(ModelError, match=status):
        _client(fake, t).infer_table(_table(10))
    assert t.sleeps == [] and fake.calls == 1


def test_a_served_model_that_vanishes_is_waited_for_like_a_restart() -> None:
    # A server shutting down or reloading unloads its models first: NOT_FOUND for a model
    # this client has been served is an outage, not a wrong request.
    fake = FakeTriton(lambda call: "NOT_FOUND" if call < 2 else None)
    fake.ready = lambda poll: poll >= 3  # loaded again after a few polls
    t = FakeTime()
    out = _client(fake, t, max_inflight=1).infer_table(_table(10))
    assert out.num_rows == 10 and fake.calls == 3


def test_a_model_that_stays_gone_fails_after_the_readiness_wait() -> None:
    fake = FakeTriton(lambda call: "NOT_FOUND")
    fake.ready = lambda poll: False
    t = FakeTime()
    with pytest.raises(TritonUnavailable, match="not ready on the endpoint") as info:
        _client(fake, t, max_inflight=1).infer_table(_table(10))
    assert "NOT_FOUND" in info.value.reason and fake.calls == 1


def test_one_outage_backs_off_once_for_all_inflight_requests() -> None:
    # Four requests in flight fail together: one removal, one pause for all of them.
    fake = FakeTriton(lambda call: "UNAVAILABLE" if call < 4 else None)
    t = FakeTime()
    client = _client(fake, t, batch_size=8, max_inflight=4)
    out = client.infer_table(_table(32))
    assert out.num_rows == 32
    assert t.sleeps == pytest.approx([0.1])
    assert fake.calls == 8
    (stats,) = client.endpoint_stats()
    assert (stats.failed, stats.removals, stats.state) == (4, 1, "healthy")


def test_jittered_delays_stay_within_bounds() -> None:
    fake = FakeTriton(lambda call: "UNAVAILABLE" if call < 4 else None)
    t = FakeTime()
    policy = RetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=0.5, jitter=0.5)
    _client(fake, t, max_inflight=1, retry=policy).infer_table(_table(4))
    for got, cap in zip(t.sleeps, [0.1, 0.2, 0.4, 0.5], strict=True):
        assert cap * 0.5 <= got <= cap


def test_config_fetch_is_retried_too() -> None:
    class Flaky(FakeTriton):
        fetches = 0

        def get_model_config(self, model: str, model_version: str = "", client_timeout: float | None = None) -> Any:
            self.fetches += 1
            if self.fetches < 3:
                raise InferenceServerException("starting", status="StatusCode.UNAVAILABLE")
            return super().get_model_config(model, model_version, client_timeout)

    fake = Flaky()
    t = FakeTime()
    assert _client(fake, t).spec.max_batch_size == 256
    assert t.sleeps == pytest.approx([0.1, 0.2])


# ----------------------------------------------------------------------------- readiness


def test_restart_waits_for_readiness_then_resends() -> None:
    """Down for 6 polls, then up but loading for 3 more: resent right after the 10th poll."""
    fake = FakeTriton()
    t = FakeTime()
    client = _client(fake, t, batch_size=8, max_inflight=2)
    client.spec  # noqa: B018 - connect while the server is up
    fake.down = True
    fake.ready = lambda poll: poll >= 9

    def come_back(n: int) -> None:
        if n == 7:
            fake.down = False  # the restarted server answers, its model still loading

    t.on_sleep = come_back
    out = client.infer_table(_table(40))
    np.testing.assert_array_equal(out.column("label").to_numpy(), np.full(40, 8))
    # The backoff, then polls at growing intervals capped at 0.5 s; no blind resends.
    assert t.sleeps == pytest.approx([0.1, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert fake.polls == 10
    assert fake.calls == 2 + 5  # the two that failed, then five answered
    (stats,) = client.endpoint_stats()
    assert (stats.state, stats.removals, stats.failed, stats.succeeded) == ("healthy", 1, 2, 6)


def test_readiness_wait_is_bounded_and_names_the_url() -> None:
    fake = FakeTriton()
    t = FakeTime()
    client = _client(fake, t, retry=RetryPolicy(5, 0.1, 0.5, jitter=0.0, ready_timeout_s=3.0))
    client.spec  # noqa: B018
    fake.down = True
    with pytest.raises(TritonUnavailable, match=r"not ready on the endpoint within 3s") as info:
        client.infer_table(_table(10))
    assert info.value.url == URL
    assert "connection refused" in info.value.reason
    assert sum(t.sleeps) == pytest.approx(3.0)
    assert fake.calls == 1  # one send; the rest of the wait was readiness polls


def test_no_readiness_wait_resends_after_the_backoff() -> None:
    fake = FakeTriton()
    t = FakeTime()
    client = _client(fake, t, retry=RetryPolicy(3, 0.1, 0.5, jitter=0.0, ready_timeout_s=0))
    client.spec  # noqa: B018
    fake.down = True
    with pytest.raises(TritonUnavailable, match="gave up after 3 attempt"):
        client.infer_table(_table(10))
    assert t.sleeps == pytest.approx([0.1, 0.2]) and fake.polls == 0 and fake.calls == 3


# ----------------------------------------------------------------------------- endpoints

A, B = "a:8001", "b:8001"


def _pair(**kwargs: Any) -> tuple[TritonStageClient, dict[str, FakeTriton], FakeTime]:
    fakes = {A: FakeTriton(), B: FakeTriton()}
    t = FakeTime()
    client = _client(fakes, t, **kwargs)
    client.spec  # noqa: B018
    return client, fakes, t


def _by_url(client: TritonStageClient) -> dict[str, EndpointStats]:
    return {s.url: s for s in client.endpoint_stats()}


def test_requests_are_spread_over_the_endpoints() -> None:
    client, fakes, _ = _pair(batch_size=4, max_inflight=4)
    client.infer_table(_table(64))
    assert fakes[A].calls == fakes[B].calls == 8
    stats = _by_url(client)
    assert stats[A].state == stats[B].state == "healthy"
    assert stats[A].in_flight == stats[B].in_flight == 0


def test_a_failing_endpoint_is_taken_out_and_the_request_resent_elsewhere_at_once() -> None:
    client, fakes, t = _pair(batch_size=4, max_inflight=4)
    fakes[A].down = True
    out = client.infer_table(_table(64))
    np.testing.assert_array_equal(out.column("label").to_numpy(), np.full(64, 4))
    assert t.sleeps == []  # B was there: no backoff
    assert fakes[A].calls == 2  # the first window's share, then never again
    assert fakes[B].calls == 16
    stats = _by_url(client)
    assert (stats[A].state, stats[A].removals, stats[A].failed) == ("out", 1, 2)
    assert "UNAVAILABLE" in stats[A].last_error
    assert stats[B].state == "healthy" and stats[B].failed == 0


def test_cooldown_is_exponential_capped_and_ends_in_a_single_trial() -> None:
    policy = RetryPolicy(5, 0.1, 0.5, jitter=0.0, cooldown_s=1.0, max_cooldown_s=4.0)
    client, fakes, t = _pair(batch_size=4, max_inflight=4, retry=policy)
    fakes[A].down = True
    client.infer_table(_table(16))
    for cooldown in (2.0, 4.0, 4.0):  # after failures 2, 3 and 4 in a row
        t.now += policy.cooldown_for(_by_url(client)[A].removals) - 0.01
        before = fakes[A].calls
        client.infer_table(_table(16))
        assert fakes[A].calls == before  # still cooling down
        t.now += 0.01
        client.infer_table(_table(16))
        assert fakes[A].calls == before + 1  # one trial request, not a window's worth
        assert policy.cooldown_for(_by_url(client)[A].removals) == cooldown
    fakes[A].down = False
    t.now += 4.0
    client.infer_table(_table(64))
    stats = _by_url(client)[A]
    assert stats.state == "healthy" and stats.removals == 4
    assert fakes[A].calls >= 4 + 6  # back to its share once the trial succeeded


def test_every_endpoint_out_backs_off_and_polls_them_all() -> None:
    client, fakes, t = _pair(batch_size=4, max_inflight=4)
    fakes[A].down = fakes[B].down = True

    def b_comes_back(n: int) -> None:
        if n == 3:
            fakes[B].down = False

    t.on_sleep = b_comes_back
    out = client.infer_table(_table(32))
    assert out.num_rows == 32
    # The first request failed on A, then on B: one backoff for its second retry, then
    # polls of both endpoints until B answers ready.
    assert t.sleeps == pytest.approx([0.2, 0.1, 0.2])
    assert fakes[A].polls == 3 and fakes[B].polls == 3
    stats = _by_url(client)
    assert stats[A].state == "out" and stats[B].state == "healthy"


def test_every_endpoint_down_fails_naming_every_url() -> None:
    policy = RetryPolicy(5, 0.1, 0.5, jitter=0.0, ready_timeout_s=2.0)
    client, fakes, _ = _pair(retry=policy)
    fakes[A].down = fakes[B].down = True
    with pytest.raises(TritonUnavailable, match="not ready on any endpoint within 2s") as info:
        client.infer_table(_table(10))
    assert info.value.url == f"{A}, {B}"
    assert A in str(info.value) and B in str(info.value)


def test_gave_up_names_every_url_and_the_last_one_tried() -> None:
    client, fakes, _ = _pair(max_inflight=1)
    for fake in fakes.values():
        fake.fail = lambda call: "DEADLINE_EXCEEDED"
    with pytest.raises(TritonUnavailable, match=r"gave up after 5 attempt") as info:
        client.infer_table(_table(10))
    assert info.value.url == f"{A}, {B}"
    assert "(last from " in info.value.reason
    assert fakes[A].calls + fakes[B].calls == 5


def test_a_model_error_from_one_endpoint_is_not_failed_over() -> None:
    client, fakes, t = _pair(max_inflight=1)
    fakes[A].fail = lambda call: "INVALID_ARGUMENT"
    fakes[B].fail = lambda call: "INVALID_ARGUMENT"
    with pytest.raises(ModelError, match="INVALID_ARGUMENT"):
        client.infer_table(_table(10))
    assert fakes[A].calls + fakes[B].calls == 1 and t.sleeps == []
    assert all(s.state == "healthy" and s.in_flight == 0 for s in client.endpoint_stats())


@pytest.mark.parametrize(
    ("url", "match"),
    [([], "non-empty"), ([A, ""], "non-empty"), ([A, B, A], "twice")],
)
def test_bad_url_lists_are_rejected(url: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TritonStageClient(url, "m", {"x": "X"}, {"Y": "y"})


def test_one_url_or_a_list() -> None:
    one = TritonStageClient(A, "m", {"x": "X"}, {"Y": "y"})
    assert one.urls == (A,) and one.url == A and repr(one).startswith(f"TritonStageClient({A!r}")
    two = TritonStageClient((A, B), "m", {"x": "X"}, {"Y": "y"})
    assert two.urls == (A, B) and two.url == f"{A}, {B}"
    assert repr(two).startswith(f"TritonStageClient([{A!r}, {B!r}]")
    assert [s.url for s in two.endpoint_stats()] == [A, B]


def test_threads_sharing_a_client_share_the_endpoints_health() -> None:
    client, fakes, t = _pair(batch_size=4, max_inflight=2)
    fakes[A].down = True
    results: dict[int, pa.Table] = {}

    def work(k: int) -> None:
        results[k] = client.infer_table(_table(40 + k))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [0, 1, 2, 3]
    assert [results[k].num_rows for k in range(4)] == [40, 41, 42, 43]
    assert t.sleeps == []
    stats = _by_url(client)
    assert stats[A].removals == 1 and stats[A].state == "out"
    assert stats[A].in_flight == stats[B].in_flight == 0
