"""The ``tierflow`` command. Exit codes: 0 ok, 1 run failed, 2 bad manifest or usage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tierflow.errors import ManifestError, TierflowError


def _fail(exc: Exception, code: int) -> None:
    click.echo(f"Error: {exc}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="tierflow")
def main() -> None:
    """Offline batch-inference pipelines on Ray, with Triton model stages and a tiered cache."""


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--schema", is_flag=True, help="Print the manifest's JSON Schema instead.")
def validate(manifest: str, schema: bool) -> None:
    """Check MANIFEST without running anything (exit 2 on any problem)."""
    from tierflow.checks import check_manifest
    from tierflow.manifest import Manifest, load_manifest

    if schema:
        click.echo(json.dumps(Manifest.model_json_schema(), indent=1))
        return
    try:
        check_manifest(load_manifest(manifest), manifest)
    except ManifestError as exc:
        _fail(exc, 2)
    click.echo(f"{manifest}: ok")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="Ray cluster to join ('auto' or ray://...); overrides ray.address.")
@click.option("--quiet", is_flag=True, help="No live progress table.")
def run(manifest: str, address: str | None, quiet: bool) -> None:
    """Run MANIFEST: every block through every stage into the sink."""
    from tierflow.run import run_pipeline

    try:
        report = run_pipeline(manifest, address=address, progress_out=None if quiet else sys.stdout)
    except ManifestError as exc:
        _fail(exc, 2)
    except TierflowError as exc:
        _fail(exc, 1)
    click.echo(f"{report['pipeline']}: {report['rows_out']} rows written in {report['elapsed_s']:.1f} s")


@main.group()
def triton() -> None:
    """The Triton model repository."""


@triton.command()
@click.option("--repo", default="triton_models", type=click.Path(file_okay=False, exists=True), show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--metrics-port", type=int, default=None, help="Default: a free port.")
@click.option("--host", default="0.0.0.0", show_default=True)
def serve(repo: str, grpc_port: int, http_port: int, metrics_port: int | None, host: str) -> None:
    """Serve a model repository with the bundled tritonserver until Ctrl-C/SIGTERM."""
    from tierflow.triton.server import serve as serve_repo

    try:
        code = serve_repo(Path(repo), grpc_port, http_port, metrics_port=metrics_port, host=host, echo=click.echo)
    except TierflowError as exc:
        _fail(exc, 1)
    sys.exit(code)


if __name__ == "__main__":
    main()
