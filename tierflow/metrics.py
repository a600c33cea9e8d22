"""Prometheus metrics for a run, served by the driver while the run lasts (opt-in).

``metrics: {port: 9464}`` in the manifest serves ``http://<driver>:9464/metrics``. The
figures are the run telemetry's latest sample (:mod:`tierflow.engine.telemetry`, about
once a second): a scrape reads that snapshot and never touches the driver's loop, so a
slow or frequent scraper costs the run nothing but its own HTTP thread.

Every metric carries a ``pipeline`` label; per-stage ones a ``stage`` label (the sink is
the stage ``sink``); cache I/O a ``tier`` label; faults a ``kind`` label. Names
(documented in README.md, "Metrics"):

======================================  =======  ==============================================
tierflow_stage_blocks                   gauge    blocks in the plan
tierflow_stage_blocks_done              gauge    blocks committed (this run and reused)
tierflow_stage_blocks_inflight          gauge    attempts running
tierflow_stage_blocks_queued            gauge    blocks ready and waiting for a slot
tierflow_stage_rows_out_total           counter  rows written by this run
tierflow_stage_executions_total         counter  attempts started (retries, speculative copies)
tierflow_stage_retries_total            counter  attempts after a failure
tierflow_stage_reexecutions_total       counter  blocks recomputed because every copy was lost
tierflow_stage_cpus_in_use              gauge    Ray CPUs held by running attempts
tierflow_stage_gpus_in_use              gauge    Ray GPUs held by running attempts
tierflow_cache_reads_total              counter  committed steps by the tier of their input
tierflow_cache_writes_total             counter  copies written, by tier
tierflow_cache_written_bytes_total      counter  bytes written, by tier
tierflow_faults_total                   counter  faults by kind (node_lost, retry, ...)
tierflow_workers_memory_bytes           gauge    RSS of Ray workers on the driver's host
tierflow_driver_memory_bytes            gauge    RSS of the driver
tierflow_run_elapsed_seconds            gauge    seconds since the run started
======================================  =======  ==============================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierflow.engine.telemetry import FAULT_KINDS
from tierflow.errors import TierflowError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from tierflow.engine.telemetry import Telemetry

__all__ = ["MetricsServer", "RunCollector", "serve_metrics"]

# (metric, help, telemetry key, counter?) for the per-stage figures of a sample.
_STAGE_METRICS = (
    ("tierflow_stage_blocks", "Blocks in the plan.", "total", False),
    ("tierflow_stage_blocks_done", "Blocks committed (this run and reused).", "done", False),
    ("tierflow_stage_blocks_inflight", "Attempts running.", "inflight", False),
    ("tierflow_stage_blocks_queued", "Blocks ready and waiting for a slot.", "queued", False),
    ("tierflow_stage_rows_out", "Rows written by this run.", "rows_out", True),
    ("tierflow_stage_executions", "Attempts started, retries and speculative copies included.", "executions", True),
    ("tierflow_stage_retries", "Attempts after a failure.", "retries", True),
    ("tierflow_stage_reexecutions", "Blocks recomputed because every copy was lost.", "reexecutions", True),
    ("tierflow_stage_cpus_in_use", "Ray CPUs held by running attempts.", "cpus", False),
    ("tierflow_stage_gpus_in_use", "Ray GPUs held by running attempts.", "gpus", False),
)


class RunCollector(Collector):
    """A Prometheus collector over one run's :class:`Telemetry` (its ``latest`` sample).

    Thread-safe: it only reads ``telemetry.latest``, which the driver replaces whole.
    """

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def describe(self) -> list[Metric]:
        return []  # no eager collect() at registration: the run has not sampled yet

    def collect(self) -> Iterator[Metric]:
        latest: dict[str, Any] = self._telemetry.latest
        pipeline = self._telemetry.pipeline
        steps: list[dict[str, Any]] = latest.get("steps", [])
        for name, doc, key, counter in _STAGE_METRICS:
            family = _family(name, doc, counter, ["pipeline", "stage"])
            for step in steps:
                family.add_metric([pipeline, step["name"]], step[key])
            yield family
        reads = CounterMetricFamily(
            "tierflow_cache_reads", "Committed steps by the tier their input was read from.",
            labels=["pipeline", "stage", "tier"],
        )
        writes = CounterMetricFamily("tierflow_cache_writes", "Copies written, by tier.",
                                     labels=["pipeline", "stage", "tier"])
        written = CounterMetricFamily("tierflow_cache_written_bytes", "Bytes written, by tier.",
                                      labels=["pipeline", "stage", "tier"])
        for step, step_reads, step_writes in zip(steps, latest.get("reads", []), latest.get("writes", [])):
            for tier, n in step_reads.items():
                reads.add_metric([pipeline, step["name"], tier], n)
            for tier, (n, nbytes) in step_writes.items():
                writes.add_metric([pipeline, step["name"], tier], n)
                written.add_metric([pipeline, step["name"], tier], nbytes)
        yield from (reads, writes, written)
        faults = CounterMetricFamily("tierflow_faults", "Faults by kind.", labels=["pipeline", "kind"])
        counts = {**dict.fromkeys(FAULT_KINDS, 0), **latest.get("faults", {})}
        for kind, n in sorted(counts.items()):
            faults.add_metric([pipeline, kind], n)
        yield faults
        memory = latest.get("memory")
        if memory:
            yield _gauge("tierflow_workers_memory_bytes", "RSS of the Ray workers on the driver's host.",
                         pipeline, memory["workers_rss"])
            yield _gauge("tierflow_driver_memory_bytes", "RSS of the driver.", pipeline, memory["driver_rss"])
        if "t" in latest:
            yield _gauge("tierflow_run_elapsed_seconds", "Seconds since the run started.", pipeline, latest["t"])


def _family(name: str, doc: str, counter: bool, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    # prometheus_client appends "_total" to counter families itself
    return CounterMetricFamily(name, doc, labels=labels) if counter else GaugeMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, pipeline: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=["pipeline"])
    family.add_metric([pipeline], value)
    return family


@dataclass
class MetricsServer:
    """The HTTP endpoint of one run. ``close`` stops it (idempotent)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)


def serve_metrics(telemetry: Telemetry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``telemetry`` at ``http://host:port/metrics`` in a daemon thread.

    A private registry, not prometheus_client's global one: two runs in one process (a
    test, a notebook) must not collide on metric names or report each other's figures.

    Raises:
        TierflowError: the port cannot be bound (in use, no permission).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(telemetry))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise TierflowError(f"cannot serve metrics on {host}:{port} (metrics.port): {exc.strerror or exc}") from None
    return MetricsServer(server, thread)
