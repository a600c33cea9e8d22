"""TritonStageClient against real servers that restart, stop, hang or freeze mid-run.

One extra ``tritonserver`` per module (``extra``), on fixed ports so that it can be stopped
and started again at the same address, serves a copy of ``mlp_classifier`` and ``sleeper``,
a model that sleeps for as long as its input says. ``GatedFactory`` pauses one request at
an exact point of a run (``threading.Event``, no sleeps) so that a server can be stopped
while the run is provably in the middle.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import tritonclient.grpc as grpcclient

from tierflow.errors import TritonUnavailable
from tierflow.triton.client import TritonStageClient
from tierflow.retry import RetryPolicy
from tierflow.triton.endpoints import EndpointStats
from tierflow.triton.server import TritonServer, _free_port

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parents[2] / "triton_models"

SLEEPER_CONFIG = """
backend: "python"
max_batch_size: 8
input [{ name: "SECONDS" data_type: TYPE_FP32 dims: [ 1 ] }]
output [{ name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""

SLEEPER_MODEL = '''
import time


class TritonPythonModel:
    """Sleeps for the largest SECONDS of each request, then echoes SECONDS: a hung model."""

    def execute(self, requests):
        import triton_python_backend_utils as pb

        responses = []
        for request in requests:
            seconds = pb.get_input_tensor_by_name(request, "SECONDS").as_numpy()
            time.sleep(float(seconds.max()))
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("OUT", seconds)]))
        return responses
'''


@pytest.fixture(scope="module")
def extra_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("failover_repo")
    shutil.copytree(
        REPO / "mlp_classifier",
        repo / "mlp_classifier",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (repo / "sleeper" / "1").mkdir(parents=True)
    (repo / "sleeper" / "config.pbtxt").write_text(SLEEPER_CONFIG)
    (repo / "sleeper" / "1" / "model.py").write_text(SLEEPER_MODEL)
    host = "127.0.0.1"
    server = TritonServer(
        repo, grpc_port=_free_port(host), http_port=_free_port(host), metrics_port=_free_port(host)
    )
    with server:
        yield server
    shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture
def extra(extra_server: TritonServer) -> TritonServer:
    """The module's extra server, started again if a previous test left it stopped."""
    if not extra_server.is_running():
        extra_server.start()
    return extra_server


class GatedFactory:
    """``client_factory`` whose ``after``-th ``async_infer`` (over every endpoint) waits.

    ``reached`` is set when that call arrives; it proceeds once ``release`` is set.
    """

    def __init__(self, after: int) -> None:
        self.after = after
        self.sent = 0
        self.reached = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, url: str) -> grpcclient.InferenceServerClient:
        client = grpcclient.InferenceServerClient(url)
        infer = client.async_infer

        def gated(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.sent += 1
                n = self.sent
            if n == self.after:
                self.reached.set()
                assert self.release.wait(60), "the test never released the gate"
            return infer(*args, **kwargs)

        client.async_infer = gated  # type: ignore[method-assign]
        return client


def _features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def _mlp_table(x: np.ndarray) -> pa.Table:
    ids = np.random.default_rng(1).permutation(len(x))
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 16)
    return pa.table({"id": ids, "features": column})


def _mlp(url: str | list[str], **kwargs: Any) -> TritonStageClient:
    outputs = {"PROBS": "probs", "LABEL": "label"}
    return TritonStageClient(url, "mlp_classifier", {"features": "FEATURES"}, outputs, **kwargs)


def _assert_exact(out: pa.Table, table: pa.Table, x: np.ndarray, forward: Any) -> None:
    """Every input row once, in order, with the reference's outputs."""
    assert out.num_rows == table.num_rows
    assert out.column("id").equals(table.column("id"))
    assert out.column("features").equals(table.column("features"))
    ref = forward(x)
    probs = out.column("probs").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    np.testing.assert_allclose(probs, ref["PROBS"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out.column("label").to_numpy(), ref["LABEL"].reshape(-1))


def _rows_served(url: str, model: str = "mlp_classifier") -> int:
    """Rows the server has inferred for ``model`` since it started (statistics extension)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0].get("inference_count", 0))


def _in_thread(fn: Callable[[], pa.Table]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by _result()
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _result(thread: threading.Thread, box: dict[str, Any]) -> pa.Table:
    thread.join(timeout=90)
    assert not thread.is_alive(), "infer_table did not finish"
    if "error" in box:
        raise box["error"]
    return box["out"]


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> float:
    """Poll ``predicate`` every 10 ms; return the seconds it took to hold."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "condition not reached"
        time.sleep(0.01)
    return time.monotonic() - t0


# ----------------------------------------------------------------------------- hangs


def test_a_model_that_hangs_past_the_deadline_fails_clearly(extra: TritonServer) -> None:
    def sleeper(timeout_s: float) -> TritonStageClient:
        retry = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05)
        inputs, outputs = {"seconds": "SECONDS"}, {"OUT": "out"}
        return TritonStageClient(
            extra.grpc_url, "sleeper", inputs, outputs, timeout_s=timeout_s, retry=retry
        )

    quick = sleeper(30.0).infer_table(pa.table({"seconds": pa.array([0.0] * 5, pa.float32())}))
    assert quick.column("out").to_pylist() == [0.0] * 5  # the server and the model are fine

    client = sleeper(0.5)
    t0 = time.monotonic()
    with pytest.raises(TritonUnavailable, match="DEADLINE_EXCEEDED") as info:
        client.infer_table(pa.table({"seconds": pa.array([1.0], pa.float32())}))
    elapsed = time.monotonic() - t0
    assert info.value.url == extra.grpc_url
    assert "gave up after 3 attempt(s)" in info.value.reason
    # Three deadlines of 0.5 s, each followed by a readiness poll that said ready (the
    # server is alive; the model is slow): bounded, nothing waits for the model to finish.
    assert 1.5 <= elapsed < 10.0
    (stats,) = client.endpoint_stats()
    assert stats.failed == 3 and stats.in_flight == 0


def test_a_frozen_server_fails_clearly_after_the_readiness_wait(extra: TritonServer) -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05, ready_timeout_s=1.5)
    client = _mlp(extra.grpc_url, timeout_s=0.5, retry=policy)
    assert client.spec.max_batch_size == 256  # connected while it answered
    pid = extra.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # alive, port open, answers nothing
    try:
        t0 = time.monotonic()
        with pytest.raises(TritonUnavailable) as info:
            client.infer_table(_mlp_table(_features(8)))
        elapsed = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert info.value.url == extra.grpc_url and extra.grpc_url in str(info.value)
    assert info.value.reason.startswith("DEADLINE_EXCEEDED")
    assert "not ready on the endpoint within 1.5s" in info.value.reason
    assert 0.5 + 1.5 <= elapsed < 10.0  # one deadline, then the bounded readiness wait
    stats = client.endpoint_stats()[0]
    assert stats.sent == 2 and stats.failed == 1  # the config fetch, then one request: no
    # blind resends into a frozen server


# ----------------------------------------------------------------------------- restart


def test_restart_mid_run_waits_for_readiness_and_keeps_every_row_once(
    extra: TritonServer, reference: Callable[[str], ModuleType]
) -> None:
    x = _features(3000, seed=5)
    table = _mlp_table(x)
    gate = GatedFactory(after=60)  # of 188 requests
    policy = RetryPolicy(max_attempts=5, base_delay_s=0.05, max_delay_s=0.5, ready_timeout_s=60)
    client = _mlp(
        extra.grpc_url,
        batch_size=16,
        max_inflight=4,
        timeout_s=10.0,
        retry=policy,
        client_factory=gate,
    )
    thread, box = _in_thread(lambda: client.infer_table(table))
    assert gate.reached.wait(30)
    extra.stop()  # while request 60 is held: a third of the table is done
    gate.release.set()
    _wait_for(lambda: client.endpoint_stats()[0].state == "out")
    sent_while_down = client.endpoint_stats()[0].sent
    succeeded_before = client.endpoint_stats()[0].succeeded
    time.sleep(1.0)  # down for a while: the client polls, it does not resend
    assert client.endpoint_stats()[0].sent == sent_while_down

    extra.start()  # same ports; returns once the model is ready
    resumed_after_s = _wait_for(lambda: client.endpoint_stats()[0].succeeded > succeeded_before)
    out = _result(thread, box)

    _assert_exact(out, table, x, reference("mlp_classifier").forward)
    stats = client.endpoint_stats()[0]
    assert stats.state == "healthy" and stats.removals == 1
    assert 1 <= stats.failed <= 4  # the held request and whatever else was in flight
    assert stats.succeeded == 188 + 1  # every request once, plus the config fetch
    # Used as soon as its model was ready: the next poll (at most 0.5 s apart) found it
    # (0.1-0.5 s measured on a quiet machine; the bound allows for a loaded one).
    assert resumed_after_s < 3.0, resumed_after_s
    assert _rows_served(extra.grpc_url) == 3000 - 16 * (succeeded_before - 1)


# ----------------------------------------------------------------------------- balancing


def test_two_servers_share_the_load_and_a_stopped_one_is_taken_out(
    triton_server: TritonServer, extra: TritonServer, reference: Callable[[str], ModuleType]
) -> None:
    urls = [triton_server.grpc_url, extra.grpc_url]
    forward = reference("mlp_classifier").forward
    x = _features(2000, seed=6)
    table = _mlp_table(x)
    gate = GatedFactory(after=4 + 125 + 75)  # warm-up, first run, then 3/5 into the second
    client = _mlp(urls, batch_size=16, max_inflight=4, timeout_s=10.0, client_factory=gate)
    # Warm-up: connect both channels. A whole run takes ~0.1 s, so a cold channel's first
    # answer arriving late would leave least-in-flight little to share (1968:32 seen).
    client.infer_table(table.slice(0, 64))
    assert [s.sent for s in client.endpoint_stats()] == [1 + 2, 2]  # config fetch + round robin

    before = {url: _rows_served(url) for url in urls}
    _assert_exact(client.infer_table(table), table, x, forward)
    served = {url: _rows_served(url) - before[url] for url in urls}
    assert sum(served.values()) == 2000  # nothing failed, nothing sent twice
    # Both took a real share: 41-61 % each in five runs on two busy cores; least-in-flight
    # gives whichever answers faster a little more.
    assert min(served.values()) >= 400, served

    thread, box = _in_thread(lambda: client.infer_table(table))
    assert gate.reached.wait(30)
    extra.stop()
    at_stop = {s.url: s for s in client.endpoint_stats()}
    gate.release.set()
    out = _result(thread, box)

    _assert_exact(out, table, x, forward)
    stats: dict[str, EndpointStats] = {s.url: s for s in client.endpoint_stats()}
    stopped, alive = stats[extra.grpc_url], stats[triton_server.grpc_url]
    assert stopped.state != "healthy" and stopped.removals >= 1
    # a server going down refuses connections (UNAVAILABLE) or, caught while it unloads its
    # models, answers that the model is gone (NOT_FOUND): both are failover, not a model error
    assert "UNAVAILABLE" in stopped.last_error or "NOT_FOUND" in stopped.last_error, stopped.last_error
    # Taken out of rotation: after it went down it saw the calls already on their way
    # (the window) and one trial per cool-down, not its share of the remaining 50 requests.
    assert stopped.sent - at_stop[extra.grpc_url].sent <= 4 + 2
    assert alive.state == "healthy" and alive.failed == 0
