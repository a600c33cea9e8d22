"""``tierflow triton serve``: a local Triton server in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from tierflow.errors import TritonUnavailable
from tierflow.triton.server import TritonServer

__all__ = ["serve"]


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event) -> Iterator[None]:
    """Set ``event`` on SIGINT/SIGTERM while inside; no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: event.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    repo: Path,
    grpc_port: int | None = None,
    http_port: int | None = None,
    *,
    metrics_port: int | None = None,
    host: str = "0.0.0.0",
    startup_timeout_s: float = 120.0,
    echo: Callable[[str], None] = print,
    stop_event: threading.Event | None = None,
) -> int:
    """Serve ``repo`` until SIGINT/SIGTERM (``tierflow triton serve``).

    Starts the server, prints the gRPC and HTTP URLs and the ready models, blocks, then
    stops it cleanly.

    Args:
        repo: Model repository.
        grpc_port: gRPC port; a free one if ``None``.
        http_port: HTTP port; a free one if ``None``.
        metrics_port: Metrics port; a free one if ``None``.
        host: Address to bind (default all interfaces, so Ray workers elsewhere can reach it).
        startup_timeout_s: Time allowed for every model to become ready.
        echo: Where the lines go (``click.echo`` from the CLI).
        stop_event: Setting it stops the server, like a signal (for tests and embedding).

    Returns:
        0 after a clean stop.

    Raises:
        ModelError, TritonUnavailable: Start-up failed, or the server died while serving.
    """
    event = stop_event or threading.Event()
    with _stop_on_signals(event):
        server = TritonServer(
            repo,
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            host=host,
            startup_timeout_s=startup_timeout_s,
        )
        with server:
            echo(f"Triton {server.repo} ready in {server.startup_s:.1f}s (pid {server.pid})")
            echo(f"  gRPC     {server.grpc_url}")
            echo(f"  HTTP     http://{server.http_url}")
            echo(f"  metrics  {server.metrics_url}")
            echo(f"  models   {', '.join(server.ready_models) or '(none)'}")
            echo("Press Ctrl-C to stop.")
            while not event.wait(0.5):
                if not server.is_running():
                    raise TritonUnavailable(
                        server.grpc_url,
                        f"tritonserver exited while serving; last lines of {server.log_path}:\n"
                        f"{server.log_tail()}",
                    )
            echo("Stopping Triton…")
    echo("Triton stopped.")
    return 0
