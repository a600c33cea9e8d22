"""tierflow from Python: ``run``, ``validate`` and ``status``, the same as the CLI's verbs.

>>> import tierflow
>>> m = tierflow.load_manifest("examples/reviews.yaml")   # doctest: +SKIP
>>> tierflow.validate(m)                                   # doctest: +SKIP
>>> report = tierflow.run(m, on_event=print)               # doctest: +SKIP
>>> report.rows_out, report.stage("classify").busy_s      # doctest: +SKIP

``run`` may be called again in the same process (a notebook): an already-initialised Ray
is used as it is and left running; everything the run started on it (actors, cache
servers, a launched Triton) ends with the run, failed runs included.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any

from tierflow.events import Listener
from tierflow.manifest import Manifest, load_manifest
from tierflow.pipeline_status import PipelineStatus

__all__ = ["RunReport", "StageReport", "run", "status", "validate"]

ManifestLike = Manifest | str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class StageReport:
    """What one step (a stage, or the sink) did in a run."""

    name: str
    kind: str
    blocks: int
    blocks_done: int
    rows_out: int
    busy_s: float
    executions: int = 0
    retries: int = 0
    reused: int = 0  # blocks committed by an earlier run: read, not recomputed
    reexecutions: int = 0  # blocks run again because a copy was lost
    dead_letters: int = 0
    dead_letter_rows: int = 0
    timeouts: int = 0
    speculated: int = 0
    rereplicated: int = 0
    retired_actors: int = 0
    spares_used: int = 0
    excluded_nodes: tuple[str, ...] = ()
    fingerprint: str | None = None  # None for the sink
    fused: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunReport:
    """The outcome of one run (also written to ``<cache dir>/<pipeline>/report.json``).

    ``extra`` holds the report's further sections (timelines, resources, faults) as written.
    """

    pipeline: str
    status: str  # "succeeded" or "failed"
    error: str | None
    elapsed_s: float
    blocks: int
    rows_in: int
    rows_out: int
    stages: tuple[StageReport, ...]
    nodes_lost: tuple[dict[str, Any], ...] = ()
    durable_catch_up: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageReport:
        """The report of the step called ``name`` (``"sink"`` for the sink)."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in this run (stages: {[s.name for s in self.stages]})")

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RunReport:
        """Read a report as ``report.json`` holds it."""
        known = {f.name for f in dataclasses.fields(cls)} - {"stages", "nodes_lost", "extra"}
        stage_fields = {f.name for f in dataclasses.fields(StageReport)}
        stages = tuple(
            StageReport(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items() if k in stage_fields})  # type: ignore[arg-type]
            for s in doc.get("stages", ())
        )
        return cls(
            **{k: doc.get(k) for k in known if k in doc},  # type: ignore[arg-type]
            stages=stages,
            nodes_lost=tuple(doc.get("nodes_lost", ())),
            extra={k: v for k, v in doc.items() if k not in known | {"stages", "nodes_lost"}},
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as ``report.json`` holds it."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("stages", "extra")}
        doc["nodes_lost"] = list(self.nodes_lost)
        doc["stages"] = [
            {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()} for s in self.stages
        ]
        return {**doc, **self.extra}


def _manifest(manifest: ManifestLike) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


def validate(manifest: ManifestLike, *, address: str | None = None) -> Manifest:
    """Check everything checkable without running (fields, code, columns, models); with
    ``address``, also that the Ray cluster there has a node for every stage and deployment
    (what ``run`` checks before its first block). Nothing is started on the cluster.

    Returns the manifest, loaded. Raises ManifestError naming the file, field and reason.
    """
    from tierflow.checks import check_manifest

    m = _manifest(manifest)
    where = "<manifest>" if isinstance(manifest, Manifest) else str(manifest)
    check_manifest(m, where)
    if address:
        import logging

        import ray

        from tierflow.capacity import check_cluster

        joined = not ray.is_initialized()
        if joined:
            ray.init(address=address, logging_level=logging.WARNING)
        try:
            check_cluster(m, where)
        finally:
            if joined:
                ray.shutdown()
    return m


def run(
    manifest: ManifestLike,
    *,
    address: str | None = None,
    fresh: bool = False,
    progress: bool | IO[str] = False,
    on_event: Listener | None = None,
) -> RunReport:
    """Run a pipeline end to end, resuming what earlier runs committed (unless ``fresh``).

    Args:
        manifest: A :class:`~tierflow.manifest.Manifest` or the path of its YAML file.
        address: A Ray cluster to join (``"auto"``, ``ray://host:10001``); default: the
            manifest's ``ray.address``, else an embedded Ray (or the one already initialised).
        fresh: Start over instead of resuming.
        progress: The live table: True for stdout, or a stream; False for none.
        on_event: Called with each :class:`~tierflow.events.Event` on the driver's loop.

    Raises:
        ManifestError: Before any cluster work.
        PipelineBusy: Another live driver runs this pipeline.
        TierflowError: The run failed (``StageError``, ``StoreError``, ...).
    """
    from tierflow.driver import run_pipeline

    out: IO[str] | None = sys.stdout if progress is True else (progress or None)  # type: ignore[assignment]
    return RunReport.from_dict(run_pipeline(manifest, address=address, fresh=fresh, progress_out=out,
                                            on_event=on_event))


def status(manifest: ManifestLike) -> PipelineStatus:
    """A pipeline's progress from its journal alone (no Ray)."""
    from tierflow.pipeline_status import pipeline_status
    from tierflow.workspace import cache_settings, open_journal, plan_manifest

    m = _manifest(manifest)
    return pipeline_status(plan_manifest(m), open_journal(m, cache_settings(m)))
