"""Same-host requests through Triton's system shared memory, against the real tritonserver."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tritonclient.grpc as grpcclient

from tierflow.triton.client import TritonStageClient
from tierflow.triton.repository import ModelSpec, TensorSpec
from tierflow.triton.server import TritonServer, _free_port
from tierflow.triton.shared_memory import is_this_host, request_layout

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 256  # FP32 per row: 1 KiB in, 1 KiB + 8 bytes out through shared memory

ECHO_CONFIG = f"""
name: "echo"
backend: "python"
max_batch_size: 1024
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
output [
  {{ name: "Y" data_type: TYPE_FP32 dims: [ {WIDTH} ] }},
  {{ name: "ARGMAX" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "TAG" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

ECHO_MODEL = """
import numpy as np
import triton_python_backend_utils as pb


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb.get_input_tensor_by_name(request, "X").as_numpy()
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor("Y", (x * 2).astype(np.float32)),
                pb.Tensor("ARGMAX", np.argmax(x, axis=1).astype(np.int64).reshape(-1, 1)),
                pb.Tensor("TAG", np.array([b"row"] * len(x), dtype=object).reshape(-1, 1)),
            ]))
        return responses
"""

OUTPUTS = {"Y": "y", "ARGMAX": "argmax", "TAG": "tag"}


def _repo(base: Path) -> Path:
    (base / "echo" / "1").mkdir(parents=True)
    (base / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (base / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return base


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = _repo(tmp_path_factory.mktemp("shm_repo"))
    host = "127.0.0.1"
    server = TritonServer(
        repo, grpc_port=_free_port(host), http_port=_free_port(host), metrics_port=_free_port(host)
    )
    with server:
        yield server
    shutil.rmtree(repo, ignore_errors=True)


def _table(rows: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, WIDTH)).astype(np.float32)
    return pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), WIDTH)}), x


def _echo(url: str, **kwargs: object) -> TritonStageClient:
    """A client of the echo model; every request through shared memory unless told."""
    kwargs.setdefault("shared_memory_min_bytes", 0)
    return TritonStageClient(url, "echo", {"x": "X"}, OUTPUTS, **kwargs)  # type: ignore[arg-type]


def _server_regions(url: str) -> dict[str, int]:
    """The server's system shared-memory registrations: name -> byte size."""
    status = grpcclient.InferenceServerClient(url).get_system_shared_memory_status(as_json=True)
    return {name: int(r["byte_size"]) for name, r in (status or {}).get("regions", {}).items()}


def _assert_exact(out: pa.Table, x: np.ndarray) -> None:
    y = out.column("y").combine_chunks().flatten().to_numpy().reshape(len(x), WIDTH)
    np.testing.assert_array_equal(y, x * 2)
    np.testing.assert_array_equal(out.column("argmax").to_numpy(), np.argmax(x, axis=1))
    assert out.column("tag").to_pylist() == [b"row"] * len(x)


def test_rows_through_shared_memory_equal_the_wire(echo_server: TritonServer) -> None:
    url = echo_server.grpc_url
    table, x = _table(1000)
    shm = _echo(url, batch_size=128, max_inflight=3)
    wire = _echo(url, batch_size=128, max_inflight=3, shared_memory="off")
    try:
        got, expected = shm.infer_table(table), wire.infer_table(table)
        assert got.equals(expected)
        _assert_exact(got, x)
        names = shm.shared_memory_regions(url)
        assert 1 <= len(names) <= 3  # one per request in flight at once
        assert set(names) <= set(_server_regions(url))
        assert all((Path("/dev/shm") / name).exists() for name in names)
        assert wire.shared_memory_regions(url) == []
    finally:
        shm.close()
        wire.close()


def test_requests_under_the_threshold_stay_on_the_wire(echo_server: TritonServer) -> None:
    url = echo_server.grpc_url
    table, x = _table(1000)
    # 64 rows: 64 KiB in + 64.5 KiB out, under the default threshold (256 KiB).
    client = TritonStageClient(url, "echo", {"x": "X"}, OUTPUTS, batch_size=64)
    low = _echo(url, batch_size=64, shared_memory_min_bytes=128 << 10)
    try:
        _assert_exact(client.infer_table(table), x)
        assert client.shared_memory_regions(url) == []
        _assert_exact(low.infer_table(table), x)
        assert 1 <= len(low.shared_memory_regions(url)) <= 4  # max_inflight
    finally:
        client.close()
        low.close()


def test_regions_are_registered_once_and_reused(echo_server: TritonServer) -> None:
    url = echo_server.grpc_url
    client = _echo(url, batch_size=128, max_inflight=2)
    try:
        table, x = _table(1024, seed=1)
        _assert_exact(client.infer_table(table), x)
        first = client.shared_memory_regions(url)
        sizes = {n: s for n, s in _server_regions(url).items() if n in first}
        assert len(sizes) == len(first) >= 1
        for seed in (2, 3):
            table, x = _table(1024, seed=seed)
            _assert_exact(client.infer_table(table), x)
        assert client.shared_memory_regions(url) == first
        assert {n: s for n, s in _server_regions(url).items() if n in first} == sizes
    finally:
        client.close()


def test_a_region_grows_for_a_bigger_request(echo_server: TritonServer) -> None:
    url = echo_server.grpc_url
    client = _echo(url, batch_size=512, max_inflight=1)
    try:
        table, x = _table(64)
        _assert_exact(client.infer_table(table), x)
        (small,) = client.shared_memory_regions(url)
        small_size = _server_regions(url)[small]
        table, x = _table(512, seed=4)
        _assert_exact(client.infer_table(table), x)
        (big,) = client.shared_memory_regions(url)
        regions = _server_regions(url)
        assert big != small and small not in regions
        assert regions[big] >= 512 * (2 * WIDTH * 4 + 8) > small_size
        assert not (Path("/dev/shm") / small).exists()
        table, x = _table(100, seed=5)  # smaller again: the big region serves it
        _assert_exact(client.infer_table(table), x)
        assert client.shared_memory_regions(url) == [big]
    finally:
        client.close()


def test_close_unregisters_and_unlinks(echo_server: TritonServer) -> None:
    url = echo_server.grpc_url
    client = _echo(url, batch_size=128, max_inflight=2)
    table, x = _table(512)
    _assert_exact(client.infer_table(table), x)
    names = client.shared_memory_regions(url)
    assert names and set(names) <= set(_server_regions(url))
    client.close()
    assert client.shared_memory_regions(url) == []
    assert not set(names) & set(_server_regions(url))
    assert not any((Path("/dev/shm") / name).exists() for name in names)
    _assert_exact(client.infer_table(table), x)  # a closed client reconnects and registers anew
    client.close()


def test_a_restarted_server_gets_new_registrations(echo_server: TritonServer) -> None:
    url = echo_server.grpc_url
    client = _echo(url, batch_size=128, max_inflight=2)
    try:
        table, x = _table(512)
        _assert_exact(client.infer_table(table), x)
        before = client.shared_memory_regions(url)
        echo_server.stop()
        echo_server.start()  # same ports; it knows none of our regions
        assert not set(before) & set(_server_regions(url))
        _assert_exact(client.infer_table(table), x)
        after = client.shared_memory_regions(url)
        assert after and not set(after) & set(before)
        assert set(after) <= set(_server_regions(url))
        assert not any((Path("/dev/shm") / name).exists() for name in before)
    finally:
        client.close()
        if not echo_server.is_running():
            echo_server.start()


def test_a_killed_clients_registrations_are_swept(echo_server: TritonServer) -> None:
    url = echo_server.grpc_url
    script = (
        "import os, sys, numpy as np, pyarrow as pa\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from tierflow.triton.client import TritonStageClient\n"
        f"x = np.ones((256, {WIDTH}), np.float32)\n"
        f"t = pa.table({{'x': pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), {WIDTH})}})\n"
        f"c = TritonStageClient({url!r}, 'echo', {{'x': 'X'}}, {{'Y': 'y'}}, batch_size=256)\n"
        "c.infer_table(t)\n"
        f"print(c.shared_memory_regions({url!r})[0], flush=True)\n"
        "os._exit(0)  # no close, no atexit: as when an actor is killed\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    orphan = proc.stdout.strip().splitlines()[-1]
    assert orphan in _server_regions(url)
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker unlinks the file
    while (Path("/dev/shm") / orphan).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (Path("/dev/shm") / orphan).exists()

    client = _echo(url, batch_size=128)
    try:
        table, x = _table(256)
        _assert_exact(client.infer_table(table), x)  # its first registration sweeps
        assert orphan not in _server_regions(url)
    finally:
        client.close()


@pytest.fixture(scope="module")
def refusing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A server that refuses shared-memory calls without a header tierflow does not send."""
    repo = _repo(tmp_path_factory.mktemp("shm_refusing_repo"))
    with TritonServer(repo, extra_args=["--grpc-restricted-protocol=shared-memory:admin-key=s3cret"]) as server:
        yield server
    shutil.rmtree(repo, ignore_errors=True)


def test_a_refused_registration_falls_back_to_the_wire_for_good(
    refusing_server: TritonServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = refusing_server.grpc_url
    client = _echo(url, batch_size=128, max_inflight=2)
    try:
        with caplog.at_level(logging.WARNING, logger="tierflow.triton.shared_memory"):
            for seed in range(3):
                table, x = _table(512, seed=seed)
                _assert_exact(client.infer_table(table), x)
        warnings = [r.getMessage() for r in caplog.records if "not shared memory" in r.getMessage()]
        assert len(warnings) == 1 and "restricted" in warnings[0], warnings
        assert client.shared_memory_regions(url) == []
        assert not [p for p in Path("/dev/shm").glob(f"tierflow-*-{os.getpid()}-*")]
        assert all(s.failed == 0 for s in client.endpoint_stats())
    finally:
        client.close()


def test_only_this_hosts_endpoints_are_tried() -> None:
    assert is_this_host("127.0.0.1") and is_this_host("localhost") and is_this_host("::1")
    assert not is_this_host("192.0.2.1")  # TEST-NET-1: never this host
    assert not is_this_host("no-such-host.invalid")


def test_layout_skips_bytes_and_variable_size_tensors() -> None:
    spec = ModelSpec(
        name="m",
        max_batch_size=64,
        inputs={"A": TensorSpec("A", "FP32", (3,)), "T": TensorSpec("T", "BYTES", (1,))},
        outputs={
            "B": TensorSpec("B", "INT64", (2,)),
            "V": TensorSpec("V", "FP32", (-1,)),
            "S": TensorSpec("S", "BYTES", (1,)),
            "H": TensorSpec("H", "FP16", (5,)),
        },
        instance_count=1,
    )
    arrays = {"A": np.zeros((10, 3), np.float32), "T": np.array([[b"x"]] * 10, dtype=object)}
    layout = request_layout(spec, arrays, ["B", "V", "S", "H"], 2, 6)
    assert layout is not None
    assert layout.inputs == (("A", 0, 4 * 3 * 4),)
    assert layout.outputs == (("B", 64, 4 * 2 * 8, (4, 2)), ("H", 128, 4 * 5 * 2, (4, 5)))
    assert layout.nbytes == 192
    assert request_layout(spec, {"T": arrays["T"]}, ["S", "V"], 0, 10) is None


def test_the_stage_settings_reach_the_client() -> None:
    from tierflow.engine.runners import make_transform
    from tierflow.manifest import TritonStage
    from tierflow.triton.shared_memory import DEFAULT_MIN_BYTES

    base = {"name": "t", "kind": "triton", "model": "m", "inputs": {"a": "A"}, "outputs": {"B": "b"}}
    default = TritonStage.model_validate(base)
    assert (default.shared_memory, default.shared_memory_min_bytes) == ("auto", DEFAULT_MIN_BYTES)
    stage = TritonStage.model_validate({**base, "shared_memory": "off", "shared_memory_min_bytes": 1 << 20})
    client = make_transform([stage], "127.0.0.1:1").__self__  # type: ignore[attr-defined]
    assert isinstance(client, TritonStageClient)
    assert (client.shared_memory, client.shared_memory_min_bytes) == ("off", 1 << 20)
    with pytest.raises(ValueError, match="shared_memory"):
        TritonStage.model_validate({**base, "shared_memory": "on"})
