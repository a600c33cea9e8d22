"""Run the real ``tritonserver`` binary that ships in the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 with the Python backend, but not laid out as a backend
directory Triton can load on its own: the stub for each Python version sits in
``python_backend_stubs/<X.Y>/``. :func:`prepare_backend_dir` assembles
``<dir>/python/{libtriton_python.so, triton_python_backend_utils.py,
triton_python_backend_stub}`` once per (wheel version, Python version) in a per-user cache,
and :class:`TritonServer` runs the binary on a *standard* model repository with it, so the
same ``triton_models/`` deploys unchanged to any other Triton server.

Usage::

    with TritonServer(Path("triton_models")) as server:   # free ports, waits for every model
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

    wait_until_ready("triton-host:8001", ["mlp_classifier"], timeout_s=60)  # someone else's

Readiness is checked per model (``is_model_ready``), not just ``/v2/health/ready``: a
server that is up with one model failed is reported as that model's :class:`ModelError`
carrying Triton's own reason from the repository index.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tierflow.errors import ModelError, TritonUnavailable
from tierflow.triton.repository import list_models

__all__ = ["TritonServer", "prepare_backend_dir", "serve", "wait_until_ready"]

_LOG_TAIL_LINES = 40
_POLL_INTERVAL_S = 0.1
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"


# --------------------------------------------------------------------------- the wheel


def _pytriton_root() -> Path:
    """``…/site-packages/pytriton``; raises FileNotFoundError with the fix if absent."""
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise FileNotFoundError(
            "the tritonserver binary ships in the nvidia-pytriton wheel: "
            "pip install 'nvidia-pytriton==0.7.0'"
        ) from exc
    return Path(pytriton.__file__).resolve().parent


def tritonserver_binary() -> Path:
    """Path of the bundled ``tritonserver`` executable."""
    path = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not path.is_file():
        raise FileNotFoundError(f"no tritonserver binary at {path} (broken nvidia-pytriton?)")
    return path


def _wheel_libs() -> Path:
    # auditwheel puts the vendored shared libraries next to the package.
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tierflow" / "triton"


def prepare_backend_dir(cache_root: Path | None = None) -> Path:
    """Assemble a Triton backend directory holding the Python backend for this interpreter.

    Built once per (nvidia-pytriton version, Python X.Y) under ``cache_root`` (default:
    ``$XDG_CACHE_HOME/tierflow/triton``, falling back to the temp dir if that is not
    writable), atomically, so concurrent callers never see a half-copied directory.

    Returns:
        The directory to pass as ``--backend-directory`` (it contains ``python/``).

    Raises:
        FileNotFoundError: The wheel lacks the backend or a stub for this Python version.
    """
    root = _pytriton_root() / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / _STUB
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python-backend stub for Python {py}")
    sources = [root / "backends" / "python" / name for name in _BACKEND_FILES] + [stub]
    version = importlib.metadata.version("nvidia-pytriton")
    name = f"pytriton-{version}-py{py}"

    candidates = (
        [cache_root]
        if cache_root
        else [
            _default_cache_root(),
            Path(tempfile.gettempdir()) / f"tierflow-triton-{os.getuid()}",
        ]
    )
    last_error: OSError | None = None
    for base in candidates:
        target = Path(base) / name
        if (target / "python" / _STUB).is_file():
            return target
        try:
            base.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
            (staging / "python").mkdir()
            for src in sources:
                shutil.copy2(src, staging / "python" / src.name)
            try:
                staging.rename(target)
            except OSError:
                # Another process won the race; its copy is identical.
                shutil.rmtree(staging, ignore_errors=True)
                if not (target / "python" / _STUB).is_file():
                    raise
            return target
        except OSError as exc:
            last_error = exc
    raise FileNotFoundError(f"cannot create a Triton backend directory: {last_error}")


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


# --------------------------------------------------------------------------- readiness


def _repository_reasons(client: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    """``{model: (state, reason)}`` from the repository index; empty if it cannot be read."""
    try:
        index = client.get_model_repository_index(as_json=False, client_timeout=5.0)
    except InferenceServerException:
        return {}
    return {m.name: (m.state, m.reason) for m in index.models}


def _poll_ready(
    url: str,
    models: Sequence[str],
    deadline: float,
    timeout_s: float,
    *,
    failed_fast: bool,
    check_alive: Callable[[], None] = lambda: None,
) -> None:
    """Wait until the server at ``url`` is live and every model in ``models`` is ready.

    Args:
        failed_fast: Treat a model the index reports ``UNAVAILABLE`` with a reason as failed
            at once (right for a server we just started with ``--load-model=*``: by the time
            it is live every load has finished). Otherwise wait for it until the deadline.
        check_alive: Raises if the server process has died.
    """
    client = grpcclient.InferenceServerClient(url)
    try:
        last = "no answer"
        while True:
            check_alive()
            try:
                if client.is_server_live(client_timeout=1.0):
                    break
                last = "server not live"
            except InferenceServerException as exc:
                last = exc.message() or str(exc)
            if time.monotonic() > deadline:
                raise TritonUnavailable(url, f"not live after {timeout_s:g}s ({last})")
            time.sleep(_POLL_INTERVAL_S)

        pending = list(models)
        while pending:
            check_alive()
            states = _repository_reasons(client)
            for model in list(pending):
                state, reason = states.get(model, ("", ""))
                try:
                    ready = client.is_model_ready(model, client_timeout=5.0)
                except InferenceServerException:
                    ready = False
                if ready:
                    pending.remove(model)
                elif failed_fast and state == "UNAVAILABLE" and reason:
                    others = [
                        m
                        for m in pending
                        if m != model and states.get(m, ("",))[0] == "UNAVAILABLE"
                    ]
                    also = f" (also failed: {', '.join(others)})" if others else ""
                    raise ModelError(model, f"failed to load on {url}: {reason}{also}")
            if pending and time.monotonic() > deadline:
                model = pending[0]
                state, reason = states.get(model, ("", "not in the repository index"))
                detail = f"{state or 'unknown'}: {reason}" if reason else (state or "unknown")
                raise ModelError(model, f"not ready on {url} after {timeout_s:g}s ({detail})")
            if pending:
                time.sleep(_POLL_INTERVAL_S)
    finally:
        client.close()


def wait_until_ready(url: str, models: Sequence[str], timeout_s: float = 60.0) -> None:
    """Block until an already-running server is live and each of ``models`` is ready.

    Args:
        url: gRPC address, ``host:port``.
        models: Models that must be ready (checked one by one with ``is_model_ready``).
        timeout_s: Total time allowed.

    Raises:
        TritonUnavailable: The server did not answer as live within ``timeout_s``.
        ModelError: A model was not ready within ``timeout_s``; the message carries the
            state and reason from Triton's repository index.
    """
    deadline = time.monotonic() + timeout_s
    _poll_ready(url, models, deadline, timeout_s, failed_fast=False)


# --------------------------------------------------------------------------- the server


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
        cache_root: Where to assemble the backend directory (see :func:`prepare_backend_dir`).
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
        root = _pytriton_root() / "tritonserver"
        # Explicit control with every wanted model loaded at start: a failed model does not
        # take the server down (--exit-on-error=false), so we can report *which* model
        # failed and why from the repository index, and models can be (re)loaded via API.
        cmd = [
            str(tritonserver_binary()),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={root / 'caches'}",
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
        libs = str(_wheel_libs())
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
            _poll_ready(
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


# --------------------------------------------------------------------------- CLI entry


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
                    log = server.log_path
                    raise TritonUnavailable(
                        server.grpc_url,
                        f"tritonserver exited while serving; last lines of {log}:\n"
                        f"{_tail(log) if log else ''}",
                    )
            echo("Stopping Triton…")
    echo("Triton stopped.")
    return 0
