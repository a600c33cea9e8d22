"""The embedded Ray that ``tierflow run`` starts keeps idle task workers for reuse.

Ray's default stops an idle task worker after 1 s when the node has no free CPU for it,
which a busy pipeline (actors, other stages' tasks) makes the usual case; the stage's next
task then pays a fresh Python worker. The control run shows the default does that
here, so the assertion after it is one that fails without ``RAY_SYSTEM_CONFIG``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
import ray
import yaml

from ray.util.placement_group import placement_group, remove_placement_group

import tierflow.driver
from tierflow.manifest import load_manifest
from tierflow.driver import ray_session


@ray.remote(num_cpus=1)
def worker_pid() -> int:
    return os.getpid()


def idle_worker_life(manifest_path: Path, limit_s: float) -> tuple[float | None, bool]:
    """How long a task's idle worker lives while every CPU is taken (None: all of
    ``limit_s``), and whether the next task ran in that same worker."""
    with ray_session(load_manifest(manifest_path), None):
        first = ray.get(worker_pid.remote())
        # Other stages' actors and tasks hold the node's CPUs; a placement group reserves
        # them without starting a worker. Ray kills idle workers beyond the free CPUs.
        busy = placement_group([{"CPU": 1}])
        ray.get(busy.ready())
        t0 = time.monotonic()
        died = None
        while died is None and time.monotonic() - t0 < limit_s:
            if not psutil.pid_exists(first):
                died = time.monotonic() - t0
            time.sleep(0.05)
        remove_placement_group(busy)
        return died, ray.get(worker_pid.remote()) == first


@pytest.fixture
def manifest_path(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("id\n1\n")
    doc = {"name": "session", "source": {"format": "csv", "path": "data/"},
           "stages": [{"name": "s", "kind": "python", "fn": "json:dumps"}],
           "sink": {"path": "out/"}, "ray": {"num_cpus": 1}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_an_idle_task_worker_survives_a_busy_gap(manifest_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control first: under Ray's default the idle worker dies, and how soon says how
    long the embedded Ray's must then survive (three times that, at least 3 s)."""
    if ray.is_initialized():
        ray.shutdown()
    with monkeypatch.context() as m:
        m.setattr(tierflow.driver, "RAY_SYSTEM_CONFIG", {})  # Ray's default, as a control
        died, reused = idle_worker_life(manifest_path, limit_s=30.0)
    assert died is not None and not reused, "Ray's default no longer stops idle workers: RAY_SYSTEM_CONFIG may be moot"

    died, reused = idle_worker_life(manifest_path, limit_s=max(3.0, 3 * died))
    assert died is None and reused, "the embedded Ray replaced an idle task worker"
