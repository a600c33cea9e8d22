"""Public helpers for testing pipelines and the engine.

* ``identity``, ``InlineBackend``: the driver loop without Ray (tests and benchmarks of
  the engine itself).
* ``LocalCluster``: a multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``)
  for tests that lose, kill or add nodes.
* ``BackgroundRun``: ``run_pipeline`` in a thread, so that a test can act while it runs.

Importing this module starts nothing and does not import Ray: every Ray import is inside
the method that needs it.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa

from tierflow.cache.settings import CacheSettings
from tierflow.cache.tiered import BlockMeta
from tierflow.engine.backend import stage_limits
from tierflow.engine.runners import Outcome
from tierflow.engine.state import Dispatch
from tierflow.io.sink import PartMeta, Sink
from tierflow.plan import Plan

T = TypeVar("T")


def identity(table: pa.Table) -> pa.Table:
    """A stage function that returns its input (for manifests in tests and benchmarks)."""
    return table


class InlineBackend:
    """A ``Backend`` that completes every dispatch in-process at once, with made-up metadata.

    It runs no stage code and stores nothing: it exists to measure and test the driver
    loop itself (state machine, journal, bookkeeping) at scale. ``fail(d)`` may return an
    ``Outcome`` to inject a failure for a dispatch.
    """

    def __init__(
        self,
        rows_per_block: int = 1000,
        fail: Callable[[Dispatch], Outcome | None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rows = rows_per_block
        self.fail = fail
        self.sleep = sleep  # a test's fake time passes here while nothing runs
        self.submitted = 0
        self.deleted = 0
        self.dead_letters: list[tuple[int, int, str]] = []
        self._done: list[Dispatch] = []

    def start(self, plan: Plan, sink: Sink, settings: CacheSettings, triton_url: str | tuple[str, ...] | None) -> list[int]:
        self._plan = plan
        self._n = len(plan.stages)
        return stage_limits(plan)

    def submit(self, d: Dispatch, input_locations: tuple[str, ...] = ()) -> None:
        self.submitted += 1
        self._done.append(d)

    def wait(self, timeout_s: float) -> list[tuple[Dispatch, Outcome]]:
        if not self._done:
            self.sleep(timeout_s)
        done, self._done = self._done, []
        return [(d, self._outcome(d)) for d in done]

    def _outcome(self, d: Dispatch) -> Outcome:
        injected = self.fail(d) if self.fail else None
        if injected is not None:
            return injected
        if d.step == self._n:
            meta: object = PartMeta(Sink.part_name(d.block), self.rows, 8 * self.rows, "0" * 32)
        else:
            key = self._plan.key(d.step, d.block)
            meta = BlockMeta(key, self.rows, 8 * self.rows, "xxh3-128:" + "0" * 32, ("lmdb:inline", "remote"))
        return Outcome(True, meta, rows_in=self.rows)

    def delete(self, keys: list[str], wait: bool = False) -> None:
        self.deleted += len(keys)

    def can_add(self, step: int) -> bool:
        return True

    def cancel(self, d: Dispatch, reason: str | None) -> None:
        self._done = [x for x in self._done if (x.step, x.block) != (d.step, d.block)]

    def dead_letter(self, step: int, block: int, error: str, input_locations: tuple[str, ...]) -> None:
        self.dead_letters.append((step, block, error))

    def exclude(self, step: int, node: str) -> bool:
        return False

    def lost_nodes(self) -> list[str]:
        return []

    def restarted_servers(self) -> list[str]:
        return []

    def actor_counts(self, step: int) -> tuple[int, int]:
        return 0, 0

    def rereplicate(self, step: int, block: int, key: str, locations: tuple[str, ...]) -> bool:
        return False

    def new_copies(self) -> list[tuple[int, int, tuple[str, ...]]]:
        return []

    def flush(self, prefix: str) -> int:
        return 0

    def shutdown(self) -> None:
        pass


# --------------------------------------------------------------------------- a cluster on one machine

#: Process titles of Ray workers that are running a tierflow stage step right now.
STEP_TITLES = ("ray::run_task", "ray::StageActor.run", "ray::sink_task")
#: Node death noticed within about a second (Ray's own test_reconstruction_stress uses
#: similar values; its default takes ~30 s, longer than most tests).
FAST_HEALTH: dict[str, Any] = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 200,
    "health_check_failure_threshold": 5,
}


class LocalCluster:
    """A ``ray.cluster_utils.Cluster`` on this machine, with ``ray.init`` connected to it.

    A head node (no CPUs by default: only the driver runs there) and ``nodes`` worker nodes,
    each a full Ray node with its own raylet, object store and processes, so a test can
    remove one (everything on it dies) or add one mid-run. Ray's system config is tierflow's
    embedded one plus fast node-death detection, unless ``system_config`` is given.

    Usage::

        with LocalCluster(nodes=3, cpus_per_node=2, pythonpath=[str(stage_dir)]) as lc:
            run = BackgroundRun(manifest)
            ...
            lc.replace_node()          # the busiest node dies, a fresh one joins
            report = run.report()

    Args:
        nodes: Worker nodes.
        cpus_per_node: Logical CPUs of each worker node.
        pythonpath: Directories the workers (and this process, while the cluster is up)
            import stage code from.
        object_store_mb: Object store of each worker node (Ray's default when None).
        node_args: More keyword arguments for every worker node's ``add_node`` (e.g.
            ``{"num_gpus": 1, "resources": {"triton_node": 1}}``).
        head_cpus: Logical CPUs of the head node.
        system_config: Ray's ``_system_config`` (default: ``FAST_HEALTH`` and
            ``tierflow.driver.RAY_SYSTEM_CONFIG``).
    """

    def __init__(
        self,
        nodes: int = 3,
        cpus_per_node: int = 2,
        pythonpath: list[str] | None = None,
        object_store_mb: int | None = None,
        node_args: dict[str, Any] | None = None,
        head_cpus: int = 0,
        system_config: dict[str, Any] | None = None,
    ) -> None:
        self.n_nodes, self.cpus_per_node = nodes, cpus_per_node
        self.pythonpath = [p for p in (pythonpath or []) if p]
        self.object_store_mb = object_store_mb
        self.node_args = dict(node_args or {})
        self.head_cpus = head_cpus
        self.system_config = system_config
        self.cluster: Any = None
        self.workers: list[Any] = []
        self.removed: list[str] = []
        self._added_paths: list[str] = []

    @property
    def address(self) -> str:
        """The head's GCS address (what ``run_pipeline(address=...)`` would join)."""
        return str(self.cluster.address)

    def _node_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"num_cpus": self.cpus_per_node, **self.node_args}
        if self.object_store_mb:
            args["object_store_memory"] = self.object_store_mb << 20
        return args

    def start(self) -> LocalCluster:
        """Start the head and the worker nodes, connect this process; returns ``self``."""
        os.environ["RAY_AUTH_MODE"] = "disabled"
        import ray
        from ray.cluster_utils import Cluster

        from tierflow.driver import RAY_SYSTEM_CONFIG  # the embedded Ray's settings, for both systems

        config = {**FAST_HEALTH, **RAY_SYSTEM_CONFIG} if self.system_config is None else self.system_config
        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": self.head_cpus, "_system_config": config})
        self.workers = [self.cluster.add_node(**self._node_args()) for _ in range(self.n_nodes)]
        path = os.pathsep.join([*self.pythonpath, *(p for p in [os.environ.get("PYTHONPATH")] if p)])
        for p in reversed(self.pythonpath):
            if p not in sys.path:
                sys.path.insert(0, p)
                self._added_paths.append(p)
        ray.init(address=self.cluster.address, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_AUTH_MODE": "disabled"}})
        self.cluster.wait_for_nodes()
        return self

    def shutdown(self) -> None:
        """Disconnect and stop every node (by hand where Ray still counts it as in use)."""
        import ray

        try:
            ray.shutdown()
        finally:
            for p in self._added_paths:
                if p in sys.path:
                    sys.path.remove(p)
            self._added_paths = []
            if self.cluster is not None:
                cluster, self.cluster = self.cluster, None
                try:
                    cluster.shutdown()
                except ValueError:  # still counted as connected: stop every node by hand
                    for node in [*cluster.worker_nodes, cluster.head_node]:
                        if node is not None:
                            node.kill_all_processes(check_alive=False, allow_graceful=False)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- nodes

    def add_node(self, **args: Any) -> Any:
        """Add a fresh worker node, like the others but for ``args`` (``add_node``'s keyword
        arguments, e.g. ``resources={}``); returns Ray's node handle."""
        node = self.cluster.add_node(**{**self._node_args(), **args})
        self.workers.append(node)
        return node

    def remove_node(self, node: Any) -> None:
        """Remove worker ``node`` at once, with everything running on it (no graceful exit).

        Call it from the main thread: Ray installs signal handlers there.
        """
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        self.removed.append(node.node_id)

    def replace_node(self, victim: Any = None, replace: bool = True) -> dict[str, Any]:
        """Remove ``victim`` (default: the node running the most steps), then add a fresh node
        unless ``replace`` is false; returns what happened and how long each part took."""
        victim = victim if victim is not None else self.busiest_node()
        running = sum(1 for n, _, _ in self.step_workers() if n is victim)
        t0 = time.monotonic()
        self.remove_node(victim)
        info: dict[str, Any] = {"removed": victim.node_id[:12], "steps_running_there": running,
                                "remove_s": round(time.monotonic() - t0, 2)}
        if replace:
            t0 = time.monotonic()
            node = self.add_node()
            info.update(added=node.node_id[:12], add_s=round(time.monotonic() - t0, 2))
        return info

    # -- processes

    def node_pids(self, node: Any) -> set[int]:
        """Every process under ``node``'s raylet (its workers)."""
        import psutil

        pids: set[int] = set()
        for raylet in node.all_processes.get("raylet", []):
            try:
                pids.update(p.pid for p in psutil.Process(raylet.process.pid).children(recursive=True))
            except psutil.Error:
                continue
        return pids

    def step_workers(self, titles: tuple[str, ...] = STEP_TITLES) -> list[tuple[Any, int, str]]:
        """``(node, pid, title)`` of every worker process of this cluster whose title says it
        runs a step now. Only descendants of this cluster's raylets are looked at, so other
        Ray instances on the machine are never touched."""
        import psutil

        found = []
        for node in self.workers:
            for pid in self.node_pids(node):
                try:
                    cmdline = psutil.Process(pid).cmdline()
                except psutil.Error:
                    continue
                title = cmdline[0].split(" ")[0] if cmdline else ""
                if title in titles:
                    found.append((node, pid, title))
        return found

    def kill_step_worker(self, rng: random.Random, wait_s: float = 10.0,
                         titles: tuple[str, ...] = STEP_TITLES) -> dict[str, Any] | None:
        """SIGKILL one worker process running a step (waits up to ``wait_s`` for one);
        returns which, or None when none ran a step in that time."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            running = self.step_workers(titles)
            if running:
                node, pid, title = rng.choice(running)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # finished in between: pick another
                return {"pid": pid, "title": title, "node": node.node_id[:12], "running": len(running)}
            time.sleep(0.05)
        return None

    def busiest_node(self) -> Any:
        """The worker node running the most steps now (the first node when none runs any)."""
        counts = {id(n): 0 for n in self.workers}
        for node, _, _ in self.step_workers():
            counts[id(node)] += 1
        return max(self.workers, key=lambda n: counts[id(n)])

    def cpus_leaked(self, wait_s: float = 20.0) -> float:
        """Logical CPUs still held after ``wait_s`` (0.0 when everything was released)."""
        import ray

        deadline = time.monotonic() + wait_s
        while True:
            total = ray.cluster_resources().get("CPU", 0.0)
            free = ray.available_resources().get("CPU", 0.0)
            if free >= total or time.monotonic() > deadline:
                return float(round(total - free, 3))
            time.sleep(0.25)


# --------------------------------------------------------------------------- a run to act on


class BackgroundRun:
    """``run_pipeline(manifest, **kwargs)`` in a background thread, started at once.

    For tests that must act while a pipeline runs (remove a node, open a gate) and then
    check its report. The run's exception is kept, never lost with the thread.

    Usage::

        run = BackgroundRun(manifest, on_event=events.append)
        parts = run.wait_for(lambda: list(out.glob("*.parquet")), timeout_s=120)
        ...                              # act mid-run
        report = run.report()            # joins; re-raises the run's error

    Args:
        manifest: A loaded manifest or its path.
        kwargs: Passed to ``run_pipeline`` (``progress_out`` defaults to None here).
    """

    def __init__(self, manifest: Any, **kwargs: Any) -> None:
        kwargs.setdefault("progress_out", None)
        self._manifest, self._kwargs = manifest, kwargs
        self._report: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._t0 = time.monotonic()
        self._t1: float | None = None
        self._thread = threading.Thread(target=self._drive, name="tierflow-background-run", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        from tierflow.driver import run_pipeline

        try:
            self._report = run_pipeline(self._manifest, **self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - kept for the caller's thread
            self._error = exc
        finally:
            self._t1 = time.monotonic()

    @property
    def alive(self) -> bool:
        """True while the run has not returned or raised."""
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """What the run raised (None while it runs, or when it succeeded)."""
        return self._error

    @property
    def elapsed_s(self) -> float:
        """Seconds from the start to the run's end (to now while it runs)."""
        return (self._t1 if self._t1 is not None else time.monotonic()) - self._t0

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the run to end; True if it has."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def wait_for(self, probe: Callable[[], T], timeout_s: float = 120.0, interval_s: float = 0.05) -> T:
        """Call ``probe`` until it returns something truthy, the run ends or ``timeout_s``
        passes; returns its last value (check it: a falsy one means it never came).

        Raises:
            BaseException: the run's own error, when it failed before ``probe`` came true.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = probe()
            if value or not self.alive or time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
        if not value and self._error is not None:
            raise self._error
        return value

    def report(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """Join the run and return its report.

        Raises:
            TimeoutError: it is still running after ``timeout_s``.
            BaseException: the run's own error, re-raised.
        """
        if not self.join(timeout_s):
            raise TimeoutError(f"the pipeline run is still going after {timeout_s} s")
        if self._error is not None:
            raise self._error
        assert self._report is not None
        return self._report
