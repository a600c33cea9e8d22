"""The ``tierflow`` command as a user runs it: a subprocess, real ports, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner

from example_copy import ROOT
from s3_endpoint import free_port
from tierflow.cli import main
from tierflow.manifest import Manifest


@pytest.mark.triton
def test_triton_serve_answers_a_stock_client_and_stops_on_sigterm() -> None:
    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierflow", "triton", "serve", "--repo", str(ROOT / "triton_models"),
         "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ},
    )
    try:
        lines = []
        deadline = time.monotonic() + 180
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "server exited early:\n" + "".join(lines)
            lines.append(line)
            if line.strip().startswith("models"):
                break
        text = "".join(lines)
        assert f"127.0.0.1:{grpc_port}" in text and "mlp_classifier" in text and "text_embedder" in text
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
        inp = grpcclient.InferInput("FEATURES", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("mlp_classifier", [inp], outputs=[grpcclient.InferRequestedOutput("PROBS")])
        probs = result.as_numpy("PROBS")
        assert probs.shape == (5, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.s3
@pytest.mark.parametrize("store", ["sink", "journal"])
def test_a_store_failure_is_a_named_error_and_exit_1(tmp_path, s3_env, store: str) -> None:  # type: ignore[no-untyped-def]
    """A sink or journal whose endpoint does not answer: one line naming the store, exit 1,
    no traceback, no secret."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": list(range(10))}), tmp_path / "data" / "a.parquet")
    options = {**s3_env.storage_options(), "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    missing = {"path": "s3://no-such-bucket-tf/x", "storage_options": options}
    doc = {"name": "stores", "source": {"format": "parquet", "path": "data/"},
           "stages": [{"name": "s", "kind": "python", "fn": "pyarrow:Table.flatten"}],
           "sink": {"path": "out/"}, "ray": {"num_cpus": 1}}
    if store == "sink":
        doc["sink"] = missing
    else:
        doc["cache"] = {"remote_url": missing["path"], "storage_options": missing["storage_options"]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, s3_env.key_var: s3_env.key, s3_env.secret_var: s3_env.secret}
    proc = subprocess.run([sys.executable, "-m", "tierflow", "run", "--quiet", str(tmp_path / "m.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert f"Error: {store} store s3://no-such-bucket-tf/x" in proc.stderr
    assert "Traceback" not in proc.stderr and s3_env.secret not in proc.stderr + proc.stdout


@pytest.mark.parametrize("command", [["status"], ["cache", "stats", "-m"], ["cache", "ls", "-m"],
                                     ["cache", "verify", "-m"], ["cache", "gc", "-m"]])
def test_a_bad_manifest_exits_2_from_every_command(tmp_path, command: list[str]) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: []\n")
    proc = subprocess.run([sys.executable, "-m", "tierflow", *command, str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"Error: {bad}") and "Traceback" not in proc.stderr


def test_status_reads_the_journal_without_importing_ray(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("id\n1\n2\n")
    doc = {"name": "quiet", "source": {"format": "csv", "path": "data/"},
           "stages": [{"name": "s", "kind": "python", "fn": "pyarrow:Table.flatten"}], "sink": {"path": "out/"}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    script = ("import sys\nfrom tierflow.cli import main\n"
              f"try:\n    main(['status', {str(tmp_path / 'm.yaml')!r}])\nexcept SystemExit as e:\n    code = e.code\n"
              "print('RAY' if 'ray' in sys.modules else 'NO-RAY', code)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quiet: " in proc.stdout and "0/1" in proc.stdout  # one block, not done
    assert proc.stdout.strip().endswith("NO-RAY 0")


def _quiet_manifest(tmp_path: Path, **extra: object) -> Path:
    import yaml

    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "a.csv").write_text("id\n1\n2\n")
    doc = {"name": "quiet", "source": {"format": "csv", "path": "data/"},
           "stages": [{"name": "s", "kind": "python", "fn": "pyarrow:Table.flatten"}], "sink": {"path": "out/"},
           **extra}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "m.yaml"


def test_metrics_port_flag_overrides_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tierflow.driver

    seen: list[object] = []

    def fake_run(manifest: object, **kwargs: object) -> dict[str, object]:
        seen.append(manifest)
        return {"pipeline": "quiet", "rows_out": 0, "elapsed_s": 0.0}

    monkeypatch.setattr(tierflow.driver, "run_pipeline", fake_run)
    path = _quiet_manifest(tmp_path, metrics={"port": 9000, "host": "127.0.0.1"})
    assert CliRunner().invoke(main, ["run", "--quiet", "--metrics-port", "9123", str(path)]).exit_code == 0
    m = seen[-1]
    assert isinstance(m, Manifest) and (m.metrics.port, m.metrics.host) == (9123, "127.0.0.1")
    assert m.base_dir == str(tmp_path)  # relative paths still resolve against the manifest
    assert CliRunner().invoke(main, ["run", "--quiet", str(path)]).exit_code == 0
    assert seen[-1] == str(path)  # no flag: the manifest as it is
    assert CliRunner().invoke(main, ["run", "--metrics-port", "70000", str(path)]).exit_code == 2


def test_status_shows_bytes_per_tier_and_the_last_runs_reads(tmp_path: Path) -> None:
    import json

    from tierflow.engine.journal import Journal
    from tierflow.manifest import load_manifest
    from tierflow.workspace import cache_settings, open_journal, plan_manifest

    path = _quiet_manifest(tmp_path)
    m = load_manifest(path)
    settings = cache_settings(m)
    plan = plan_manifest(m)
    j: Journal = open_journal(m, settings)
    j.begin("quiet", 1, {s.name: s.fingerprint for s in plan.stages}, "fs")
    j.record_block("s", 0, 2, 3 * 2**20, "c0", ("lmdb:n1", "lmdb:n2"))
    j.finish("failed")
    report = Path(settings.root) / "quiet" / "report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"telemetry": {"steps": [{"name": "s", "reads": {"source": 1}}]}}))
    result = CliRunner().invoke(main, ["status", str(path)])
    out = result.output
    assert result.exit_code == 0, (out, result.exception)
    assert "lmdb 2 (6.0M)" in out and "source 1" in out
