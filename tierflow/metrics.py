"""Prometheus metrics for a run, served by the driver while the run lasts (opt-in).

``metrics: {port: 9464}`` in the manifest serves ``http://<driver>:9464/metrics``. The
figures are the run telemetry's latest sample (:mod:`tierflow.engine.telemetry`, about
once a second): a scrape reads that snapshot and never touches the driver's loop, so a
slow or frequent scraper costs the run nothing but its own HTTP thread.

Every metric carries a ``pipeline`` label; per-stage ones a ``stage`` label (the sink is
the stage ``sink``); cache figures a ``tier`` label; faults a ``kind`` label. Read tiers
are ``source``, ``memory`` (the worker's in-process tier), ``local`` (its node's LMDB),
``peer`` (another node's LMDB) and ``remote`` (the durable store); held tiers are
``memory`` (the stage's workers' memory tiers), ``local`` / ``peer`` (copies on the
writer's / other nodes' LMDB) and ``remote``; evicted tiers ``memory``, ``local`` and
``peer``.
Names (documented in README.md, "Metrics"):

=======================================  =======  =============================================
tierflow_stage_blocks                    gauge    blocks in the plan
tierflow_stage_blocks_done               gauge    blocks committed (this run and reused)
tierflow_stage_blocks_inflight           gauge    attempts running
tierflow_stage_blocks_queued             gauge    blocks ready and waiting for a slot (queue depth)
tierflow_stage_backpressured             gauge    1 while the next stage holds this one back
tierflow_stage_rows_out_total            counter  rows written by this run
tierflow_stage_executions_total          counter  attempts started (retries, speculative copies)
tierflow_stage_retries_total             counter  attempts after a failure
tierflow_stage_reexecutions_total        counter  blocks recomputed because every copy was lost
tierflow_stage_cpus_in_use               gauge    Ray CPUs held by running attempts
tierflow_stage_gpus_in_use               gauge    Ray GPUs held by running attempts
tierflow_stage_workers                   gauge    worker processes that reported in the last 10 s
tierflow_stage_memory_bytes              gauge    RSS of those workers, summed
tierflow_stage_memory_peak_bytes         gauge    highest RSS of one worker while a step ran
tierflow_stage_step_memory_peak_bytes    gauge    the most one step added to its worker's RSS
tierflow_cache_reads_total               counter  committed steps by the tier of their input
tierflow_cache_read_bytes_total          counter  bytes of those inputs, by tier
tierflow_cache_writes_total              counter  copies written, by tier
tierflow_cache_written_bytes_total       counter  bytes written, by tier
tierflow_cache_held_bytes                gauge    bytes held (written, not consumed yet), by tier
tierflow_cache_spilled_bytes_total       counter  bytes that could not stay on the writer's LMDB
tierflow_cache_evicted_bytes_total       counter  bytes evicted to make room, by tier
tierflow_faults_total                    counter  faults by kind (node_lost, retry, ...)
tierflow_workers_memory_bytes            gauge    RSS of Ray workers on the driver's host
tierflow_driver_memory_bytes             gauge    RSS of the driver
tierflow_run_elapsed_seconds             gauge    seconds since the run started
=======================================  =======  =============================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierflow.engine.telemetry import FAULT_KINDS, HELD_TIERS, LOCAL, MEMORY, PEER
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
    ("tierflow_stage_backpressured", "1 while the next stage holds this one back (saturated, blocks waiting).",
     "held_back", False),
    ("tierflow_stage_rows_out", "Rows written by this run.", "rows_out", True),
    ("tierflow_stage_executions", "Attempts started, retries and speculative copies included.", "executions", True),
    ("tierflow_stage_retries", "Attempts after a failure.", "retries", True),
    ("tierflow_stage_reexecutions", "Blocks recomputed because every copy was lost.", "reexecutions", True),
    ("tierflow_stage_cpus_in_use", "Ray CPUs held by running attempts.", "cpus", False),
    ("tierflow_stage_gpus_in_use", "Ray GPUs held by running attempts.", "gpus", False),
)
# (metric, help, key of the step's usage figures) for its workers' memory.
_USAGE_METRICS = (
    ("tierflow_stage_workers", "Worker processes of the stage that reported in the last 10 s.", "workers"),
    ("tierflow_stage_memory_bytes", "RSS of the stage's workers (those that reported in the last 10 s), summed.",
     "rss_now"),
    ("tierflow_stage_memory_peak_bytes", "Highest RSS of one of the stage's workers while a step ran.", "rss_peak"),
    ("tierflow_stage_step_memory_peak_bytes", "The most one step added to its worker's RSS.", "step_memory_peak"),
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
        yield from _cache_figures(pipeline, steps, latest)
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


def _cache_figures(pipeline: str, steps: list[dict[str, Any]], latest: dict[str, Any]) -> Iterator[Metric]:
    """Read bytes, bytes held, spilled and evicted per stage and tier, and the workers' memory."""
    usage: list[dict[str, Any]] = latest.get("usage", [])
    labels = ["pipeline", "stage"]
    for name, doc, key in _USAGE_METRICS:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for step, use in zip(steps, usage):
            family.add_metric([pipeline, step["name"]], use[key])
        yield family
    read_bytes = CounterMetricFamily("tierflow_cache_read_bytes", "Bytes of the committed steps' inputs, by tier.",
                                     labels=[*labels, "tier"])
    for step, tiers in zip(steps, latest.get("read_bytes", [])):
        for tier, nbytes in tiers.items():
            read_bytes.add_metric([pipeline, step["name"], tier], nbytes)
    yield read_bytes
    held = GaugeMetricFamily(
        "tierflow_cache_held_bytes",
        "Bytes held: the workers' memory tiers (memory), copies written and not consumed yet (local, peer, remote).",
        labels=[*labels, "tier"],
    )
    spilled = CounterMetricFamily(
        "tierflow_cache_spilled_bytes",
        "Bytes of blocks that could not stay on the writer's LMDB (went to peers or durable).", labels=labels,
    )
    evicted = CounterMetricFamily(
        "tierflow_cache_evicted_bytes",
        "Bytes evicted to make room: the workers' memory tiers, and LMDB (local, peer) by their writes.",
        labels=[*labels, "tier"],
    )
    for step, use in zip(steps, usage):
        stage = step["name"]
        tiers = {**use["held"], MEMORY: use["memory_tier"]}
        for tier in HELD_TIERS:
            held.add_metric([pipeline, stage, tier], tiers.get(tier, 0))
        spilled.add_metric([pipeline, stage], use["spilled"])
        for tier in (MEMORY, LOCAL, PEER):
            evicted.add_metric([pipeline, stage, tier], use["evicted"].get(tier, 0))
    yield from (held, spilled, evicted)


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
