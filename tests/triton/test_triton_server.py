"""The real tritonserver from the nvidia-pytriton wheel: start, readiness, failures, stop."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tierflow.errors import ModelError, TritonUnavailable
from tierflow.triton.readiness import wait_until_ready
from tierflow.triton.repository import list_models
from tierflow.triton.server import TritonServer, _free_port
from tierflow.triton.serving import serve

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parents[2] / "triton_models"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once reaped by init.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_every_model_is_ready(triton_server: TritonServer) -> None:
    assert triton_server.is_running()
    assert triton_server.ready_models == list_models(REPO) == ["minilm", "mlp_classifier", "text_embedder"]
    host, port = triton_server.grpc_url.split(":")
    assert host == "127.0.0.1" and int(port) > 0
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.is_server_ready()
        for model in list_models(REPO):
            assert client.is_model_ready(model), model
    finally:
        client.close()


def test_stock_tritonclient_can_infer(
    triton_server: TritonServer, reference: Callable[[str], ModuleType]
) -> None:
    """Plain tritonclient, no tierflow code: the repository is an ordinary Triton repo."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        x = np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32)
        inp = grpcclient.InferInput("FEATURES", [5, 16], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("mlp_classifier", [inp])
        ref = reference("mlp_classifier").forward(x)
        np.testing.assert_allclose(result.as_numpy("PROBS"), ref["PROBS"], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(result.as_numpy("LABEL"), ref["LABEL"])

        texts = np.array([[b"hello world"], ["caf\u00e9".encode()], [b""]], dtype=np.object_)
        inp = grpcclient.InferInput("TEXT", [3, 1], "BYTES")
        inp.set_data_from_numpy(texts)
        emb = client.infer("text_embedder", [inp]).as_numpy("EMBEDDING")
        np.testing.assert_allclose(
            emb, reference("text_embedder").forward(texts)["EMBEDDING"], rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(np.linalg.norm(emb[:2], axis=1), 1.0, rtol=1e-6)
        assert not emb[2].any()  # empty text -> zero vector
    finally:
        client.close()


def test_wait_until_ready_on_a_running_server(triton_server: TritonServer) -> None:
    wait_until_ready(triton_server.grpc_url, ["mlp_classifier", "text_embedder"], timeout_s=10)


def test_wait_until_ready_names_a_missing_model(triton_server: TritonServer) -> None:
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="not ready") as info:
        wait_until_ready(triton_server.grpc_url, ["mlp_classifier", "no_such_model"], timeout_s=0.5)
    assert info.value.model == "no_such_model"
    assert time.monotonic() - t0 < 5


def test_wait_until_ready_names_an_unreachable_url() -> None:
    url = f"127.0.0.1:{_free_port('127.0.0.1')}"
    t0 = time.monotonic()
    with pytest.raises(TritonUnavailable, match="not live") as info:
        wait_until_ready(url, ["mlp_classifier"], timeout_s=1.0)
    assert info.value.url == url and url in str(info.value)
    assert time.monotonic() - t0 < 5


def _broken_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(
        REPO / "mlp_classifier",
        repo / "mlp_classifier",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (repo / "broken" / "1").mkdir(parents=True)
    config = (
        (REPO / "mlp_classifier" / "config.pbtxt").read_text().replace("mlp_classifier", "broken")
    )
    (repo / "broken" / "config.pbtxt").write_text(config)
    (repo / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('weights are corrupt')\n"
    )
    return repo


def test_model_that_fails_to_load_is_named(tmp_path: Path) -> None:
    server = TritonServer(_broken_repo(tmp_path), startup_timeout_s=60)
    with pytest.raises(ModelError) as info:
        server.start()
    assert info.value.model == "broken"
    assert "weights are corrupt" in info.value.reason  # Triton's own reason, from the index
    assert not server.is_running() and server.pid is None
    server.stop()  # idempotent after a failed start


def test_only_the_requested_models_are_loaded(tmp_path: Path) -> None:
    with TritonServer(_broken_repo(tmp_path), models=["mlp_classifier"]) as server:
        assert server.ready_models == ["mlp_classifier"]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready("mlp_classifier")
        assert not client.is_model_ready("broken")
        client.close()
        pid = server.pid
        assert pid is not None
    assert not server.is_running()
    assert not _pid_alive(pid)
    server.stop()  # idempotent


def test_process_death_reports_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    server = TritonServer(REPO, extra_args=["--no-such-flag=1"], log_path=log, startup_timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(TritonUnavailable, match="exited with code") as info:
        server.start()
    assert time.monotonic() - t0 < 15
    assert "no-such-flag" in info.value.reason  # the server's own complaint, from the log
    assert str(log) in info.value.reason
    assert not server.is_running()


def test_serve_prints_urls_and_stops_cleanly() -> None:
    lines: list[str] = []
    stop = threading.Event()

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            stop.set()  # what the SIGINT/SIGTERM handler does

    assert serve(REPO, None, None, host="127.0.0.1", echo=echo, stop_event=stop) == 0
    text = "\n".join(lines)
    assert "gRPC     127.0.0.1:" in text and "HTTP     http://127.0.0.1:" in text
    assert "mlp_classifier, text_embedder" in text
    assert lines[-1] == "Triton stopped."


def test_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """A driver killed by SIGKILL must not leave an orphaned tritonserver behind."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tierflow.triton.server import TritonServer\n"
        f"s = TritonServer(Path({str(REPO)!r}), models=['mlp_classifier']).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert _pid_alive(server_pid)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 20
    while _pid_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pid_alive(server_pid)
