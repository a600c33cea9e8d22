"""Chaos runs through ``tools/chaos.py`` on a real 3-node ``ray.cluster_utils.Cluster``.

Every test runs the chaos tool's built-in demo pipeline while faults are injected at
points of its progress (read from the journal) and then applies the tool's oracle: the
run succeeds, ``_SUCCESS`` is written, no input id is lost, duplicated or unexpected, the
output equals a fault-free result cell for cell, every fault was injected and no CPU is
left held. Node loss must also cost no re-execution of committed blocks (``replicas: 2``).

``test_chaos_smoke`` (one worker kill and one node replaced) and the spare-actor run with
a node lost for good run by default (< 60 s each, compared with the demo stage functions
applied in-process). The others are ``slow``:
one fault kind each with a fault-free golden run, and the whole default schedule.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import chaos  # noqa: E402

pytestmark = [pytest.mark.ray]


def _explain(summary: dict[str, Any]) -> str:
    c = summary.get("chaos", {})
    fails = [f["error"].strip().splitlines()[0][:200] for f in c.get("failed_steps", [])]
    return (f"checks={summary.get('checks')} oracle={summary.get('oracle')} error={c.get('error')} "
            f"faults={c.get('faults')} failed steps={fails[:6]} work={summary.get('work')}")


def _no_reexecutions(summary: dict[str, Any]) -> None:
    stages = summary["chaos"]["stages"]
    assert all(s["reexecutions"] == 0 for s in stages), f"committed blocks were recomputed: {stages}"


def test_chaos_smoke(tmp_path: Path) -> None:
    """One stage worker SIGKILLed and one node replaced during a 12-block run (3 nodes x 1 CPU)."""
    summary = chaos.run_chaos(
        work=tmp_path, schedule="kill@0.15,node@0.40", cpus_per_node=1, rows=1000, block_rows=100,
        delay_s=0.3, demo_triton=False, golden="local", quiet=True,
    )
    assert summary["ok"], _explain(summary)
    _no_reexecutions(summary)
    assert summary["oracle"]["rows"] == 1000


def test_node_lost_for_good_with_standby_spares(tmp_path: Path) -> None:
    """A node removed with nothing in its place, spare actors on: the spares take over and
    yield the CPUs the survivors' task steps and sink need (with a spare in the last task
    slot, such a run once waited for ever). 3 nodes x 1 CPU, < 60 s."""
    summary = chaos.run_chaos(
        work=tmp_path, schedule="lose@0.40", cpus_per_node=1, rows=1000, block_rows=100,
        delay_s=0.3, demo_triton=False, golden="local", quiet=True, standby=1,
    )
    assert summary["ok"], _explain(summary)
    _no_reexecutions(summary)
    assert summary["oracle"]["rows"] == 1000 and not summary["chaos"]["faults"][0]["detail"].get("added")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_kills(tmp_path: Path) -> None:
    """Six stage workers (tasks, actors, the Triton client actor, sink tasks) SIGKILLed mid-step."""
    summary = chaos.run_chaos(
        work=tmp_path, schedule="kill@0.10,kill@0.20,kill@0.35,kill@0.50,kill@0.65,kill@0.80",
        rows=4000, block_rows=100, delay_s=0.1, seed=1, quiet=True,
    )
    assert summary["ok"], _explain(summary)
    _no_reexecutions(summary)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_replaced(tmp_path: Path) -> None:
    """The busiest worker node removed at 50 % (a new one added): blocks come from replicas."""
    summary = chaos.run_chaos(work=tmp_path, schedule="node@0.50", rows=4000, block_rows=100, delay_s=0.1,
                              quiet=True)
    assert summary["ok"], _explain(summary)
    _no_reexecutions(summary)
    assert summary["chaos"]["faults"][0]["detail"]["added"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_triton_restart(tmp_path: Path) -> None:
    """Triton stopped (SIGTERM) at 50 % and started again on the same ports."""
    summary = chaos.run_chaos(work=tmp_path, schedule="triton@0.50", rows=4000, block_rows=100, delay_s=0.1,
                              quiet=True)
    assert summary["ok"], _explain(summary)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_triton_crash(tmp_path: Path) -> None:
    """Triton SIGKILLed at 50 % and started again on the same ports."""
    summary = chaos.run_chaos(work=tmp_path, schedule="triton@0.50", rows=4000, block_rows=100, delay_s=0.1,
                              triton_crash=True, quiet=True)
    assert summary["ok"], _explain(summary)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_chaos_full_schedule(tmp_path: Path) -> None:
    """The tool's default schedule (4 kills, a node replaced, Triton restarted) on 6000 rows."""
    summary = chaos.run_chaos(work=tmp_path, quiet=True)
    assert summary["ok"], _explain(summary)
    _no_reexecutions(summary)
