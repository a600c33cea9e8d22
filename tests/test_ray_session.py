"""The embedded Ray that ``tierflow run`` starts keeps idle task workers for reuse.

Ray's default stops an idle task worker after 1 s when the node has no free CPU for it,
which a busy pipeline (actors, other stages' tasks) makes the usual case; the stage's next
task then pays a fresh Python worker. The control run shows the default does that
here, so the first assertion is one that fails without ``RAY_SYSTEM_CONFIG``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def pids_across_a_busy_gap(manifest_path: Path) -> tuple[int, int]:
    """The pid of a task's worker before and after 3 s in which every CPU is taken."""
    with ray_session(load_manifest(manifest_path), None):
        first = ray.get(worker_pid.remote())
        # Other stages' actors and tasks hold the node's CPUs; a placement group reserves
        # them without starting a worker. Ray kills idle workers beyond the free CPUs.
        busy = placement_group([{"CPU": 1}])
        ray.get(busy.ready())
        time.sleep(3.0)  # > Ray's 1 s default, which it checks every 0.2 s
        remove_placement_group(busy)
        return first, ray.get(worker_pid.remote())


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
    if ray.is_initialized():
        ray.shutdown()
    first, second = pids_across_a_busy_gap(manifest_path)
    assert first == second, "the embedded Ray replaced an idle task worker after 3 s"

    monkeypatch.setattr(tierflow.driver, "RAY_SYSTEM_CONFIG", {})  # Ray's default, as a control
    first, second = pids_across_a_busy_gap(manifest_path)
    assert first != second, "Ray's default no longer stops idle workers: RAY_SYSTEM_CONFIG may be moot"
