"""The driver of one run (`tierflow run`): validate, plan, connect Ray, bring up Triton, execute, report.

Everything that can be rejected is rejected before any cluster work: the manifest is
loaded and checked (``tierflow.checks``) and the source planned first; only then is Ray
started or joined, its nodes checked for the resources the stages ask (``tierflow.capacity``),
and Triton launched or probed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import ray

from tierflow.capacity import check_cluster
from tierflow.checks import check_manifest
from tierflow.code import local_modules
from tierflow.engine.executor import Executor
from tierflow.engine.journal import Journal
from tierflow.engine.ray_backend import RayBackend
from tierflow.engine.resume import resume_points, sink_fingerprint
from tierflow.errors import ModelError, TritonUnavailable
from tierflow.events import Listener
from tierflow.io.sink import Sink
from tierflow.manifest import Manifest, PythonStage, TritonStage, load_manifest
from tierflow.triton.readiness import wait_until_ready
from tierflow.triton.server import TritonServer
from tierflow.workspace import cache_settings, open_journal, plan_manifest

REPORT_NAME = "report.json"

# Ray stops an idle task worker after 1 s when its node has no free CPU for it, which a
# busy pipeline (actors, the other stages' tasks) makes the usual case: the stage's next
# task then pays a new Python worker (~1 CPU-s of imports). On a 2-node benchmark cluster
# that churn cost more CPU than the pipeline itself (docs/throughput-benchmarks.md).
# Applied to the embedded Ray; a standing cluster sets it in its nodes' environment
# (RAY_idle_worker_killing_time_threshold_ms).
RAY_SYSTEM_CONFIG: dict[str, Any] = {"idle_worker_killing_time_threshold_ms": 30_000}


@contextlib.contextmanager
def ray_session(manifest: Manifest, address: str | None) -> Iterator[dict[str, Any] | None]:
    """Join ``address`` (CLI) or ``ray.address`` (manifest), else start an embedded Ray.

    An already-initialised Ray (a test, a notebook) is used as it is and left running. Its
    job did not ship the stage modules next to the manifest, and Ray uploads local modules
    only at job level, so this yields the runtime environment that puts the manifest's
    directory on the stages' path (None: the job has the modules): enough wherever the
    workers see the driver's files (one machine, a shared file system); elsewhere pass
    ``runtime_env={"py_modules": [...]}`` to ``ray.init``.
    """
    targets = [s.target for s in manifest.stages if isinstance(s, PythonStage)]
    if ray.is_initialized():
        if not local_modules(targets, manifest.base_dir):
            yield None
            return
        pythonpath = os.pathsep.join(p for p in (manifest.base_dir, os.environ.get("PYTHONPATH")) if p)
        yield {"env_vars": {"PYTHONPATH": pythonpath}}
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    target = address or manifest.ray.address
    if target:
        # The cluster's nodes may not have the stage code: ship the modules next to the
        # manifest (the very files the stage fingerprints were computed from).
        modules = local_modules(targets, manifest.base_dir)
        kwargs["address"] = target
        kwargs["runtime_env"] = {"py_modules": modules} if modules else {}
    else:
        pythonpath = os.pathsep.join(p for p in (manifest.base_dir, os.environ.get("PYTHONPATH")) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs["address"] = "local"  # a new embedded instance, even if `ray start` ran here
        kwargs["num_cpus"] = manifest.ray.num_cpus or max(os.cpu_count() or 1, _cpus_needed(manifest))
        kwargs["_system_config"] = RAY_SYSTEM_CONFIG
    ray.init(**kwargs)
    try:
        yield None
    finally:
        ray.shutdown()


def _cpus_needed(manifest: Manifest) -> int:
    """Logical CPUs that let every actor pool start and leave one task slot per task stage.

    The embedded cluster may oversubscribe the machine's cores; what it must not do is
    deadlock with actors holding every CPU while task stages wait forever.
    """
    actors = sum(
        s.num_cpus * s.concurrency_range[1] for s in manifest.stages if isinstance(s, TritonStage) or s.cls
    )
    tasks = max((s.num_cpus for s in manifest.stages if not (isinstance(s, TritonStage) or s.cls)), default=0)
    return int(actors + tasks + 0.999) + 1


@contextlib.contextmanager
def triton_endpoint(manifest: Manifest) -> Iterator[str | tuple[str, ...] | None]:
    """The gRPC URL(s) Triton stages use: a launched bundled server, servers deployed on
    the Ray cluster (``triton.deploy``: a running deployment of that name is reused and left
    running, else one is started for the run and torn down when it ends, on failure too),
    or the configured ones once every model they need is ready on at least one (fails
    naming the URL or the model). Servers not ready yet stay in the list: the client brings
    them into rotation when they answer."""
    models = sorted({s.model for s in manifest.stages if isinstance(s, TritonStage)})
    if not models:
        yield None
        return
    cfg = manifest.triton
    if cfg.deploy is not None:
        from tierflow.triton.deploy import DeploySpec, deployed

        with deployed(DeploySpec.from_manifest(manifest, models)) as deployment:
            yield deployment.urls()
        return
    if cfg.launch:
        repo = Path(manifest.resolve(cfg.repository))
        with TritonServer(repo, models=models, startup_timeout_s=cfg.startup_timeout_s or 180.0) as server:
            yield server.grpc_url
        return
    assert cfg.url is not None
    urls = (cfg.url,) if isinstance(cfg.url, str) else cfg.url
    budget = cfg.startup_timeout_s or 30.0
    # A quick look at each first: one ready server is enough to start.
    for timeout_s in ((2.0,) if len(urls) > 1 else ()) + (budget / len(urls),):
        errors: list[Exception] = []
        for url in urls:
            try:
                wait_until_ready(url, models, timeout_s=timeout_s)
                break
            except (TritonUnavailable, ModelError) as exc:
                errors.append(exc)
        if len(errors) < len(urls):
            break
    else:
        raise errors[0]
    yield cfg.url


def run_pipeline(
    manifest: Manifest | str | os.PathLike[str],
    *,
    address: str | None = None,
    fresh: bool = False,
    progress_out: IO[str] | None = sys.stdout,
    on_event: Listener | None = None,
) -> dict[str, Any]:
    """Run a manifest (a loaded one, or its path) end to end, resuming what an earlier run
    committed (unless ``fresh``).

    Returns the run report, which is also written to ``<cache dir>/<pipeline>/report.json``
    for every run that got past validation, failed ones included.

    Raises:
        ManifestError: before any cluster work, or once Ray is up when no node can ever
            hold a stage (``tierflow.capacity``), before any block runs.
        PipelineBusy: another live driver runs this pipeline.
        StageError, InferenceError, SinkError: from the run itself.
    """
    source = "<manifest>" if isinstance(manifest, Manifest) else str(manifest)
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    check_manifest(manifest, source)
    plan = plan_manifest(manifest)
    settings = cache_settings(manifest)
    sink = Sink(manifest.sink, manifest.resolve(manifest.sink.path))
    journal = open_journal(manifest, settings)
    journal.acquire_lease()
    if fresh:
        journal = Journal(journal.url, journal.storage_options, pipeline=manifest.name, owner=journal.owner)
    executor = Executor(plan, sink, settings, progress_out=progress_out, journal=journal, on_event=on_event)
    state = "failed"
    try:
        journal.begin(manifest.name, len(plan.blocks), {s.name: s.fingerprint for s in plan.stages},
                      sink_fingerprint(plan))
        executor.start_step = resume_points(plan, journal, sink.existing_parts())
        with ray_session(manifest, address) as stage_env:
            check_cluster(manifest, source)  # Ray is up, Triton not yet started: nothing runs
            with triton_endpoint(manifest) as url:
                executor.backend = RayBackend(stage_env)
                executor.triton_url = url
                report = executor.run()
        state = "succeeded"
        return report
    finally:
        try:
            journal.finish(state)
            journal.release_lease()
        except Exception:
            if state == "succeeded":
                raise  # never report success without the journal saying so
            # the run failed already: that error matters more than the journal's

        report = getattr(executor, "report", None) or {
            "pipeline": manifest.name, "status": "failed", "error": str(sys.exc_info()[1]),
            "rows_out": 0, "stages": [],
        }
        out = Path(settings.root) / manifest.name / REPORT_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
