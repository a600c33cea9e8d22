"""A local ``tritonserver`` process, from the ``nvidia-pytriton`` wheel, on a model repository.

:class:`TritonServer` runs the bundled binary (:mod:`tierflow.triton.bundle`) on a
*standard* model repository, waits until every model is ready
(:mod:`tierflow.triton.readiness`), and always reaps the process on stop.

Usage::

    with TritonServer(Path("triton_models")) as server:   # free ports, waits for every model
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from tierflow.errors import TritonUnavailable
from tierflow.triton.bundle import caches_dir, library_dir, prepare_backend_dir, tritonserver_binary
from tierflow.triton.readiness import poll_ready
from tierflow.triton.repository import list_models

__all__ = ["TritonServer"]

_LOG_TAIL_LINES = 40


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _local_host(host: str) -> str:
    """Address a local client connects to for a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    all_lines = text.splitlines()
    # A bad flag makes tritonserver print its complaint and then ~300 lines of usage;
    # the complaint is the useful part.
    usage = next(
        (i for i, line in enumerate(all_lines) if line.startswith("Usage: tritonserver")), None
    )
    if usage is not None:
        all_lines = all_lines[:usage]
    return "\n".join(all_lines[-lines:])


class _PortInUse(Exception):
    """Internal: the server lost a race for a port we picked; retried with new ports."""


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the server when this process dies.

    Without it a driver killed by SIGKILL (or by SIGTERM, which skips finalizers) leaves an
    orphaned tritonserver holding its ports. ``PR_SET_PDEATHSIG`` fires when the *thread*
    that started the child exits, so it is only used from the main thread, whose exit is
    the process's.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not after fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_pdeathsig() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_pdeathsig


def _terminate_group(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort kill of the server and its stub processes (its own session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


class TritonServer:
    """A local ``tritonserver`` process serving a standard model repository.

    ``start()`` returns only once the server is live and every model is ready; ``stop()``
    always reaps the process. A server that is garbage-collected or still running at
    interpreter exit is killed. Not thread-safe: start and stop it from one thread.

    Usage::

        with TritonServer(Path("triton_models")) as server:
            print(server.grpc_url)          # "127.0.0.1:40123"

    Args:
        repo: Model repository (``<repo>/<model>/config.pbtxt``).
        grpc_port: gRPC port; a free one if ``None``.
        http_port: HTTP port; a free one if ``None``.
        metrics_port: Prometheus metrics port; a free one if ``None``.
        models: Models to load and wait for; every model in the repository if ``None``.
        host: Address to bind; ``"0.0.0.0"`` to serve other machines.
        startup_timeout_s: Time allowed for the server and every model to become ready.
        log_path: Where the server's output goes; a temp file if ``None`` (removed by a
            clean ``stop()``, kept when ``start()`` fails, and named in the error).
        extra_args: Further ``tritonserver`` flags, appended as given.
        cache_root: Where to assemble the backend directory (see
            :func:`~tierflow.triton.bundle.prepare_backend_dir`).
    """

    def __init__(
        self,
        repo: Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        models: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 120.0,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        cache_root: Path | None = None,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args)
        self.cache_root = cache_root
        self._requested_ports = (grpc_port, http_port, metrics_port)
        self._models = list(models) if models is not None else None
        self._user_log_path = Path(log_path) if log_path is not None else None
        self._log_dir: Path | None = None
        self._log_path: Path | None = None
        self._ports: tuple[int, int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self.ready_models: list[str] = []
        self.startup_s: float | None = None

    # -- properties

    @property
    def grpc_url(self) -> str:
        """``"127.0.0.1:PORT"`` of the gRPC endpoint (valid once started)."""
        return f"{_local_host(self.host)}:{self._require_ports()[0]}"

    @property
    def http_url(self) -> str:
        """``"127.0.0.1:PORT"`` of the HTTP endpoint (valid once started)."""
        return f"{_local_host(self.host)}:{self._require_ports()[1]}"

    @property
    def metrics_url(self) -> str:
        """``"http://127.0.0.1:PORT/metrics"`` (valid once started)."""
        return f"http://{_local_host(self.host)}:{self._require_ports()[2]}/metrics"

    @property
    def log_path(self) -> Path | None:
        """The server's log file (``None`` before the first start)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of the running server, else ``None``."""
        return self._proc.pid if self._proc is not None else None

    def log_tail(self) -> str:
        """The last lines of the server's log, usage text cut (``""`` before the first start)."""
        return _tail(self._log_path) if self._log_path is not None else ""

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _require_ports(self) -> tuple[int, int, int]:
        if self._ports is None:
            raise RuntimeError("TritonServer has not been started")
        return self._ports

    # -- lifecycle

    def start(self) -> TritonServer:
        """Start the server and wait until it and every model are ready.

        Returns:
            ``self``.

        Raises:
            ModelError: A model failed to load (Triton's reason included) or was not ready
                in time. The server is stopped.
            TritonUnavailable: The process died during start-up (the log tail is in the
                message) or was not live in time. The server is stopped.
            FileNotFoundError: The repository or the bundled binary is missing.
            RuntimeError: Already started.
        """
        if self._proc is not None:
            raise RuntimeError("TritonServer is already started")
        models = self._models if self._models is not None else list_models(self.repo)
        backend_dir = prepare_backend_dir(self.cache_root)
        auto_ports = all(p is None for p in self._requested_ports)
        t0 = time.monotonic()
        # Ports we pick can be taken by someone else before tritonserver binds them; only
        # then is a retry with fresh ports worth it.
        for attempt in range(3 if auto_ports else 1):
            self._launch(backend_dir, models)
            try:
                self._wait(models, t0)
            except _PortInUse as exc:
                self._kill_quietly()
                if attempt == 2 or not auto_ports:
                    raise TritonUnavailable(self.grpc_url, str(exc)) from None
                continue
            except BaseException as exc:
                # Keep the log only where the error points to it (a death or a timeout);
                # a ModelError already carries Triton's reason.
                self._kill_quietly(keep_log=isinstance(exc, TritonUnavailable))
                raise
            break
        self.ready_models = list(models)
        self.startup_s = time.monotonic() - t0
        return self

    def _launch(self, backend_dir: Path, models: Sequence[str]) -> None:
        grpc_port, http_port, metrics_port = (
            p if p is not None else _free_port(self.host) for p in self._requested_ports
        )
        self._ports = (grpc_port, http_port, metrics_port)
        if self._user_log_path is not None:
            self._log_path = self._user_log_path
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._log_dir = Path(tempfile.mkdtemp(prefix="tierflow-triton-"))
            self._log_path = self._log_dir / "tritonserver.log"
        # Explicit control with every wanted model loaded at start: a failed model does not
        # take the server down (--exit-on-error=false), so we can report *which* model
        # failed and why from the repository index, and models can be (re)loaded via API.
        cmd = [
            str(tritonserver_binary()),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={caches_dir()}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in models),
            "--exit-on-error=false",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            f"--grpc-address={self.host}",
            f"--grpc-port={grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={metrics_port}",
            *self.extra_args,
        ]
        env = dict(os.environ)
        libs = str(library_dir())
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libs, env.get("LD_LIBRARY_PATH", "")) if p
        )
        # The stub embeds libpython and finds this environment's packages (numpy<2, …)
        # through the first python on PATH, so the running interpreter's bin/ goes first.
        env["PATH"] = os.pathsep.join(
            p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p
        )
        with open(self._log_path, "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session: Ctrl-C at a terminal reaches us, not the server, and a last-resort
            # kill can take the server's stub processes (same process group) with it.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only prctl, resolved before fork
            )
        self._finalizer = weakref.finalize(self, _terminate_group, self._proc)

    def _wait(self, models: Sequence[str], t0: float) -> None:
        proc = self._proc
        assert proc is not None and self._log_path is not None
        log_path = self._log_path

        def check_alive() -> None:
            rc = proc.poll()
            if rc is None:
                return
            tail = _tail(log_path)
            if "already in use" in tail or "Address in use" in tail:
                raise _PortInUse(f"tritonserver could not bind its ports:\n{tail}")
            raise TritonUnavailable(
                self.grpc_url,
                f"tritonserver exited with code {rc} during start-up; log {log_path}, "
                f"last lines:\n{tail}",
            )

        deadline = t0 + self.startup_timeout_s
        try:
            poll_ready(
                self.grpc_url,
                models,
                deadline,
                self.startup_timeout_s,
                failed_fast=True,
                check_alive=check_alive,
            )
        except TritonUnavailable as exc:
            check_alive()  # a death explains a timeout better than the timeout does
            raise TritonUnavailable(
                exc.url, f"{exc.reason}; log {log_path}, last lines:\n{_tail(log_path)}"
            ) from None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout_s``, then SIGKILL its process group.

        Always reaps the process. Idempotent; never raises for an already-dead server.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _terminate_group(proc)
            proc.wait()
        finally:
            self._proc = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def _kill_quietly(self, keep_log: bool = False) -> None:
        log_dir = self._log_dir
        if keep_log:
            self._log_dir = None  # stop() must not delete the log the error points to
        self.stop(timeout_s=5.0)
        if not keep_log and log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)

    def __enter__(self) -> TritonServer:  # noqa: PYI034 - no typing_extensions dependency
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.grpc_url if self._ports else "not started"
        return f"TritonServer(repo={str(self.repo)!r}, {where}, running={self.is_running()})"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("TritonServer owns a local process and cannot be pickled")
