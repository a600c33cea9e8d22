"""The ``tierflow`` command. Exit codes: 0 ok, 1 run failed, 2 bad manifest or usage."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from tierflow.errors import ManifestError, TierflowError

if TYPE_CHECKING:
    from tierflow.triton.deploy import DeploySpec


def _fail(exc: Exception, code: int) -> NoReturn:
    click.echo(f"Error: {exc}", err=True)
    sys.exit(code)


@contextmanager
def _exit_codes() -> Iterator[None]:
    """The contract of every command: a bad manifest exits 2, a failure exits 1, both with
    one line on stderr and no traceback."""
    try:
        yield
    except ManifestError as exc:
        _fail(exc, 2)
    except TierflowError as exc:
        _fail(exc, 1)


@click.group()
@click.version_option(package_name="tierflow")
def main() -> None:
    """Offline batch-inference pipelines on Ray, with Triton model stages and a tiered cache."""


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--schema", is_flag=True, help="Print the manifest's JSON Schema instead.")
@click.option("--address", default=None,
              help="Also check that this Ray cluster ('auto', ray://...) has a node for every stage.")
def validate(manifest: str, schema: bool, address: str | None) -> None:
    """Check MANIFEST without running anything (exit 2 on any problem)."""
    from tierflow.api import validate as validate_manifest
    from tierflow.manifest import Manifest

    if schema:
        click.echo(json.dumps(Manifest.model_json_schema(), indent=1))
        return
    with _exit_codes():
        validate_manifest(manifest, address=address)
    click.echo(f"{manifest}: ok" + (f" (and the cluster at {address} can hold it)" if address else ""))


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="Ray cluster to join ('auto' or ray://...); overrides ray.address.")
@click.option("--fresh", is_flag=True, help="Start over: ignore what earlier runs committed.")
@click.option("--quiet", is_flag=True, help="No live progress table.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on this port while the run lasts (0: any free one); "
                   "overrides metrics.port.")
def run(manifest: str, address: str | None, fresh: bool, quiet: bool, metrics_port: int | None) -> None:
    """Run MANIFEST: every block through every stage into the sink.

    Re-running the same manifest resumes: committed blocks and sink parts are reused.
    """
    from tierflow.driver import run_pipeline
    from tierflow.manifest import Manifest, load_manifest

    with _exit_codes():
        target: str | Manifest = manifest
        if metrics_port is not None:  # the flag wins over the manifest (resolved here, once)
            m = load_manifest(manifest)
            target = m.model_copy(update={"metrics": m.metrics.model_copy(update={"port": metrics_port})})
        report = run_pipeline(target, address=address, fresh=fresh, progress_out=None if quiet else sys.stdout)
    click.echo(f"{report['pipeline']}: {report['rows_out']} rows written in {report['elapsed_s']:.1f} s")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
def status(manifest: str) -> None:
    """Progress of MANIFEST's pipeline, from its journal alone (no Ray needed)."""
    from rich.console import Console
    from rich.table import Table

    from tierflow.engine.progress import human_bytes
    from tierflow.manifest import load_manifest
    from tierflow.workspace import cache_settings, open_journal, plan_manifest
    from tierflow.pipeline_status import last_reads, pipeline_status

    with _exit_codes():
        m = load_manifest(manifest)
        settings = cache_settings(m)
        reads = last_reads(Path(settings.root) / m.name / "report.json")
        st = pipeline_status(plan_manifest(m), open_journal(m, settings), reads)
    head = f"{st.pipeline}: {st.state}"
    if st.running:
        head += f" (run in progress: {st.holder})"
    t = Table(title=head, title_justify="left")
    for col in ("stage", "done", "blocks held", "rows held", "copies (bytes)", "last run read from"):
        t.add_column(col, justify="left" if col in ("stage", "copies (bytes)", "last run read from") else "right")
    for s in st.stages:
        copies = ", ".join(
            f"{k} {v} ({human_bytes(s.bytes_at.get(k, 0))})" for k, v in sorted(s.locations.items())
        ) or "-"
        read = ", ".join(f"{k} {v}" for k, v in sorted(s.last_reads.items())) or "-"
        t.add_row(s.name + (" (changed)" if s.stale else ""), f"{s.done}/{s.total}", str(s.held_blocks),
                  f"{s.held_rows:,}", copies, read)
    t.add_row("sink", f"{st.sink_parts}/{st.blocks}", "", f"{st.sink_rows:,}", "parts", "")
    console = Console()
    if not console.is_terminal:
        console.width = 120
    console.print(t)


@main.command()
@click.argument("source", metavar="MANIFEST|REPORT.json", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where the page goes (default: report.html next to the report).")
def report(source: str, output: str | None) -> None:
    """Render a run report as one self-contained HTML page (plots work offline)."""
    from tierflow.report import find_report, load_report, write_html

    with _exit_codes():
        try:
            data = load_report(source)
            out = write_html(data, output or find_report(source).with_suffix(".html"))
        except (OSError, ValueError) as exc:  # no report yet, unreadable, not JSON
            _fail(exc, 1)
    click.echo(f"{out}")


@main.group()
def cache() -> None:
    """Inspect and clean the block cache (this node's LMDB and the durable store)."""


_manifest_opt = click.option(
    "-m", "--manifest", type=click.Path(dir_okay=False, exists=True), default=None,
    help="Use this manifest's cache section (default: the embedded defaults, ./.tierflow).",
)
_pipeline_opt = click.option("--pipeline", default=None, help="Only this pipeline's blocks.")


def _open_cache(manifest: str | None):  # type: ignore[no-untyped-def]
    from tierflow.cache import get_cache
    from tierflow.manifest import CacheConfig, load_manifest
    from tierflow.workspace import cache_settings_from

    if manifest:
        m = load_manifest(manifest)
        return get_cache(cache_settings_from(m.cache, m.resolve))
    return get_cache(cache_settings_from(CacheConfig(), lambda p: str(Path(p).resolve())))


@cache.command("stats")
@_manifest_opt
def cache_stats(manifest: str | None) -> None:
    """Counters and per-tier usage, as JSON."""
    with _exit_codes():
        click.echo(json.dumps(_open_cache(manifest).stats().as_dict(), indent=1))


@cache.command("ls")
@_manifest_opt
@_pipeline_opt
def cache_ls(manifest: str | None, pipeline: str | None) -> None:
    """List block keys."""
    with _exit_codes():
        for key in _open_cache(manifest).list(f"{pipeline}/" if pipeline else ""):
            click.echo(key)


@cache.command("verify")
@_manifest_opt
@_pipeline_opt
@click.option("--no-repair", is_flag=True, help="Only report bad copies.")
def cache_verify(manifest: str | None, pipeline: str | None, no_repair: bool) -> None:
    """Read and checksum every copy; repair bad copies from good ones (exit 1 if any is lost)."""
    with _exit_codes():
        report = _open_cache(manifest).verify(f"{pipeline}/" if pipeline else "", repair=not no_repair)
    click.echo(f"checked {report.checked} copies: {len(report.corrupt)} corrupt, "
               f"{len(report.repaired)} repaired, {len(report.lost)} lost")
    for key in report.lost:
        click.echo(f"lost: {key}", err=True)
    sys.exit(0 if report.ok else 1)


@cache.command("gc")
@_manifest_opt
@_pipeline_opt
def cache_gc(manifest: str | None, pipeline: str | None) -> None:
    """Delete cached blocks (one pipeline's, or all)."""
    with _exit_codes():
        n = _open_cache(manifest).gc(pipeline)
    click.echo(f"deleted {n} blocks")


@main.group()
def bench() -> None:
    """Measure this machine: how fast the configured cache moves blocks."""


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from tierflow.cache.bench import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@bench.command("cache")
@click.option("-m", "--manifest", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Measure this manifest's cache (default: the embedded defaults, ./.tierflow).")
@click.option("--dir", "cache_dir", default=None, help="Cache directory (overrides the manifest's cache.dir).")
@click.option("--remote-url", default=None, help="Durable store URL (overrides the manifest's cache.remote_url).")
@click.option("-s", "--block-size", default="4M", show_default=True, callback=_size,
              help="Bytes per block: 64K, 4M, 1G or a number.")
@click.option("-n", "--count", type=click.IntRange(min=1), default=None,
              help="Operations per figure (default: about 256 MiB of traffic, 3 to 1000).")
@click.option("-t", "--tier", "tiers", multiple=True, type=click.Choice(["memory", "lmdb", "remote"]),
              help="Only these tiers (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of a table.")
def bench_cache(manifest: str | None, cache_dir: str | None, remote_url: str | None, block_size: int,
                count: int | None, tiers: tuple[str, ...], as_json: bool) -> None:
    """Write and read throughput of each cache tier for one block size.

    Runs on scratch copies beside the configured cache (same disk, same store): your
    cached blocks are never read, written or evicted. Exit 1 if a tier fails.
    """
    import dataclasses

    from tierflow.cache.bench import TIERS, bench_tiers, human
    from tierflow.manifest import CacheConfig, load_manifest
    from tierflow.workspace import cache_settings_from

    with _exit_codes():
        m = load_manifest(manifest) if manifest else None
        settings = (cache_settings_from(m.cache, m.resolve) if m is not None
                    else cache_settings_from(CacheConfig(), lambda p: str(Path(p).resolve())))
        if cache_dir is not None:
            settings = dataclasses.replace(settings, root=str(Path(cache_dir).resolve()))
        if remote_url is not None:
            settings = dataclasses.replace(settings, remote_url=remote_url)
        figures = bench_tiers(settings, block_size, count, tiers or TIERS)
    if as_json:
        doc = {"block_size": block_size, "dir": settings.root, "figures": [f.as_dict() for f in figures]}
        click.echo(json.dumps(doc, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"cache tiers, {human(block_size)} blocks ({settings.root})", title_justify="left")
    for col in ("tier", "op", "ops", "MB/s", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        t.add_column(col, justify="left" if col in ("tier", "op") else "right")
    for f in figures:
        t.add_row(f.tier, f.op, str(f.ops), f"{f.mb_s:,.0f}", f"{f.p50_ms:.3f}", f"{f.p90_ms:.3f}",
                  f"{f.p99_ms:.3f}", f"{f.max_ms:.3f}")
    Console().print(t)


@main.group()
def triton() -> None:
    """The Triton model repository, and Triton servers deployed on the Ray cluster."""


@triton.command()
@click.option("--repo", default="triton_models", type=click.Path(file_okay=False, exists=True), show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--metrics-port", type=int, default=None, help="Default: a free port.")
@click.option("--host", default="0.0.0.0", show_default=True)
def serve(repo: str, grpc_port: int, http_port: int, metrics_port: int | None, host: str) -> None:
    """Serve a model repository with the bundled tritonserver until Ctrl-C/SIGTERM."""
    from tierflow.triton.serving import serve as serve_repo

    with _exit_codes():
        code = serve_repo(Path(repo), grpc_port, http_port, metrics_port=metrics_port, host=host, echo=click.echo)
    sys.exit(code)



_deploy_manifest = click.option(
    "-m", "--manifest", type=click.Path(dir_okay=False, exists=True), required=True,
    help="The manifest whose triton.deploy section names and describes the deployment.",
)
_deploy_address = click.option(
    "--address", default=None,
    help="Ray cluster to use (default: ray.address of the manifest, else 'auto': the local one).",
)


@contextmanager
def _deployment_of(manifest: str, address: str | None) -> Iterator[DeploySpec]:
    """Load MANIFEST, join its Ray cluster, and yield its deployment's spec.

    A deployment that outlives this command needs a cluster that does too, so no embedded
    Ray is started here: an already-initialised Ray (tests) is used as it is.
    """
    import ray

    from tierflow.manifest import load_manifest
    from tierflow.errors import DeploymentError
    from tierflow.triton.deploy import DeploySpec

    m = load_manifest(manifest)
    if m.triton.deploy is None:
        raise ManifestError(manifest, [("triton.deploy", "missing: the manifest deploys no Triton servers")])
    spec = DeploySpec.from_manifest(m)
    if ray.is_initialized():
        yield spec
        return
    target = address or m.ray.address or "auto"
    try:
        ray.init(address=target, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        raise DeploymentError(spec.name, f"no Ray cluster at {target!r} ({exc}); start one with 'ray start --head'") from exc
    try:
        yield spec
    finally:
        ray.shutdown()


def _echo_deployment(status: dict[str, Any]) -> None:
    servers = status["servers"]
    ready = sum(s["state"] == "ready" for s in servers)
    kind = "detached" if status["detached"] else "owned by a run"
    click.echo(f"deployment {status['name']} ({kind}): {ready} of {len(servers)} server(s) ready")
    for s in servers + status["ended"]:
        gpus = f" CUDA_VISIBLE_DEVICES={s['cuda_visible_devices']}" if s["cuda_visible_devices"] is not None else ""
        why = f" ({s['reason']})" if s["reason"] else ""
        click.echo(f"  server {s['id']:>3} {s['state']:<8} node {s['node_id'][:12] or '-':<12} "
                   f"{s['url'] or '-'} pid {s['pid'] or '-'}{gpus}{why}")
    if status["waiting"]:
        click.echo(f"  waiting: {status['waiting']}")


@triton.command("deploy")
@_deploy_manifest
@_deploy_address
def triton_deploy(manifest: str, address: str | None) -> None:
    """Start MANIFEST's triton.deploy servers on the Ray cluster and leave them running.

    The deployment outlives this command; a run whose manifest names the same deployment
    uses these warm servers instead of starting its own. Stop it with 'undeploy'.
    """
    from tierflow.triton.deploy import start_deployment

    with _exit_codes(), _deployment_of(manifest, address) as spec:
        deployment = start_deployment(spec, detached=True)
        _echo_deployment(deployment.status())


@triton.command("status")
@_deploy_manifest
@_deploy_address
@click.option("--json", "as_json", is_flag=True, help="The controller's status as JSON.")
def triton_status(manifest: str, address: str | None, as_json: bool) -> None:
    """Servers of MANIFEST's deployment: state, node, URL, GPUs (exit 1 if it is not running)."""
    from tierflow.errors import DeploymentError
    from tierflow.triton.deploy import find_deployment

    with _exit_codes(), _deployment_of(manifest, address) as spec:
        deployment = find_deployment(spec.name)
        if deployment is None:
            raise DeploymentError(spec.name, "not running")
        status = deployment.status()
        if as_json:
            click.echo(json.dumps(status, indent=1))
        else:
            _echo_deployment(status)


@triton.command("undeploy")
@_deploy_manifest
@_deploy_address
def triton_undeploy(manifest: str, address: str | None) -> None:
    """Stop MANIFEST's deployment: every server, then its controller (exit 1 if not running)."""
    from tierflow.errors import DeploymentError
    from tierflow.triton.deploy import find_deployment

    with _exit_codes(), _deployment_of(manifest, address) as spec:
        deployment = find_deployment(spec.name)
        if deployment is None:
            raise DeploymentError(spec.name, "not running")
        deployment.stop()
        click.echo(f"deployment {spec.name} stopped")


if __name__ == "__main__":
    main()
