"""Same-host tensors through Triton's system shared memory instead of the gRPC message.

When a client and its server share a host, a request's numeric tensors can skip the wire:
the client copies its inputs into a POSIX shared-memory region the server has mapped, names
the region and offset in the request, and has the server write the outputs into the same
region. On the development machine a request is 2-3x faster than over gRPC at 1 MiB,
3x at 4 MiB, 5-6x at 16 MiB, and costs about the same below 128 KiB
(``tools/bench_triton.py --shm``, BENCHMARKS.md "Same-host shared memory"): requests under
:data:`DEFAULT_MIN_BYTES` stay on the wire.

:class:`SharedMemoryPool` holds one client process's regions, per endpoint:

* **Pooled and reused.** A request leases a region big enough for its tensors (inputs
  first, then outputs) and hands it back when its response is read; the next request
  reuses it without registering anything. There are as many regions as requests ever
  were in flight to that endpoint at once (each needs its own memory); a region too small
  for a request is grown (destroyed, created bigger, registered again) while it is free,
  so memory a request in flight uses is never touched.
* **Registered once, released on exit.** Each region is registered when created and
  unregistered and unlinked by :meth:`SharedMemoryPool.close`, which also runs at
  interpreter exit (an actor's normal teardown). A process killed outright leaves its
  ``/dev/shm`` files to ``multiprocessing``'s resource tracker, which unlinks them, and its
  registrations to the next client on the host, which unregisters those of dead processes
  (names carry the host and the process id).
* **Only where it can work.** Only endpoints whose host is this host (a loopback address,
  or one this host can bind) are tried. An endpoint that refuses the registration (a
  server on another host or in another container, ``/dev/shm`` unusable, a server that
  restricts the shared-memory protocol) gets the wire from then on, logged once; a
  failure that only means the server is down now (it does not answer a liveness call)
  does not count.
* **Not trusted blindly.** A region handed back by a request without an answer (timed
  out, cancelled, connection lost) may still be written by the server: it is discarded,
  not reused. When an endpoint fails, its registrations may be gone with a restarted
  server: its free regions are discarded and their names unregistered when it answers
  again.

Only fixed-size numeric tensors qualify (:func:`request_layout`): ``BYTES`` tensors and
outputs with a variable dimension, whose size is unknown before the answer, stay on the
wire within the same request.

Usage (what :class:`~tierflow.triton.client.TritonStageClient` does per request)::

    pool = SharedMemoryPool("mlp_classifier")
    layout = request_layout(spec, arrays, outputs, lo, hi)       # None: nothing qualifies
    region = pool.acquire(url, layout.nbytes, grpc_client)       # None: use the wire
    ...                                                          # send, wait, read
    pool.release(url, region, reusable=True)
    pool.close()
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import triton_to_np_dtype

from tierflow.errors import InferenceError, TritonUnavailable
from tierflow.triton.errors import map_triton_errors
from tierflow.triton.repository import ModelSpec

__all__ = [
    "DEFAULT_MIN_BYTES",
    "Layout",
    "Region",
    "SharedMemoryPool",
    "is_this_host",
    "request_layout",
]

_log = logging.getLogger(__name__)

#: Smallest request (shared-memory bytes: inputs + outputs) sent through shared memory.
#: Measured side by side (BENCHMARKS.md, "Same-host shared memory"): at 64 KiB + 64 KiB
#: a request costs the same CPU either way (gRPC/shm 1.0-1.04), at 128 KiB + 128 KiB
#: gRPC costs 1.16-1.28x the CPU, at 256 KiB + 256 KiB 1.5x and the wall time follows.
DEFAULT_MIN_BYTES = 256 << 10
#: Tensors start on this boundary inside a region.
_ALIGN = 64
#: Regions are sized in whole pages.
_PAGE = 4096
#: Deadline of a registration, status or unregistration call.
_CONTROL_TIMEOUT_S = 5.0
_PREFIX = "tierflow"
#: Dtypes numpy cannot hold at their wire size.
_NOT_NUMPY = frozenset({"BYTES", "BF16"})


def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


@functools.lru_cache(maxsize=64)
def is_this_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine.

    True for a loopback address, or an address this process can bind a socket to (the
    kernel refuses to bind one that is not its own). A name is resolved first (cached).

    >>> is_this_host("127.0.0.1"), is_this_host("localhost"), is_this_host("192.0.2.1")
    (True, True, False)
    """
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(address.split("%", 1)[0]).is_loopback:
                return True
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address, 0))
            return True
        except OSError:
            continue
    return False


def _url_host(url: str) -> str:
    host = url.rsplit(":", 1)[0] if ":" in url else url
    return host.split("://", 1)[-1]


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one request's tensors sit in a region.

    Attributes:
        inputs: ``(tensor, offset, nbytes)`` of each input sent through shared memory.
        outputs: ``(tensor, offset, nbytes, shape)`` of each output read from it.
        nbytes: Bytes the region must hold.
    """

    inputs: tuple[tuple[str, int, int], ...]
    outputs: tuple[tuple[str, int, int, tuple[int, ...]], ...]
    nbytes: int


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def request_layout(
    spec: ModelSpec, arrays: Mapping[str, np.ndarray], outputs: Iterable[str], lo: int, hi: int
) -> Layout | None:
    """The shared-memory layout of the request for rows ``lo:hi``, ``None`` if no tensor
    qualifies. Pure.

    Inputs qualify when numeric (their size is the slice's); outputs when numeric and every
    dimension of the config is fixed (``rows x dims``). The others go on the wire.
    """
    rows = hi - lo
    offset = 0
    ins: list[tuple[str, int, int]] = []
    for tensor, array in arrays.items():
        if array.dtype == np.object_ or spec.inputs[tensor].dtype in _NOT_NUMPY:
            continue
        nbytes = rows * math.prod(array.shape[1:]) * array.dtype.itemsize
        ins.append((tensor, offset, nbytes))
        offset = _aligned(offset + nbytes)
    outs: list[tuple[str, int, int, tuple[int, ...]]] = []
    for tensor in outputs:
        out = spec.outputs[tensor]
        if out.dtype in _NOT_NUMPY or any(d < 0 for d in out.dims):
            continue
        shape = (rows, *out.dims)
        nbytes = math.prod(shape) * np.dtype(triton_to_np_dtype(out.dtype)).itemsize
        outs.append((tensor, offset, nbytes, shape))
        offset = _aligned(offset + nbytes)
    if not ins and not outs:
        return None
    return Layout(tuple(ins), tuple(outs), max(offset, 1))


# --------------------------------------------------------------------------- regions


class Region:
    """One system shared-memory region, created by this process and registered on a server.

    Attributes:
        name: The name the server knows it by (``tierflow-<host>-<pid>-<hex>``), unique.
        byte_size: Its size.
    """

    __slots__ = ("_handle", "byte_size", "generation", "key", "name")

    def __init__(self, byte_size: int, generation: int) -> None:
        self.name = f"{_PREFIX}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.key = "/" + self.name
        self.byte_size = byte_size
        self.generation = generation
        self._handle = shm.create_shared_memory_region(self.name, self.key, byte_size, create_only=True)

    def write(self, array: np.ndarray, offset: int) -> None:
        """Copy ``array`` into the region at ``offset`` (one memcpy)."""
        shm.set_shared_memory_region(self._handle, [array], offset=offset)

    def read(self, dtype: np.dtype[Any], shape: Sequence[int], offset: int) -> np.ndarray:
        """A copy of the tensor at ``offset`` (the region is reused once handed back)."""
        view = shm.get_contents_as_numpy(self._handle, dtype, list(shape), offset=offset)
        return np.array(view, copy=True)

    def destroy(self) -> None:
        """Unmap and unlink it (the server's mapping, if any, stays valid). Never raises."""
        with contextlib.suppress(Exception):
            shm.destroy_shared_memory_region(self._handle)


class _Endpoint:
    """One endpoint's regions. Guarded by the pool's lock."""

    __slots__ = ("client", "free", "generation", "in_use", "state", "stale", "swept")

    def __init__(self) -> None:
        self.state = "unknown"  # "on" | "wire" once decided
        self.client: Any = None  # the gRPC client the regions were registered with
        self.free: list[Region] = []
        self.in_use: set[str] = set()
        self.generation = 0  # bumped by reset(): regions of older ones are not reused
        self.stale: list[str] = []  # names to unregister once the server answers again
        self.swept = False


class SharedMemoryPool:
    """One client process's shared-memory regions on each endpoint. Thread-safe.

    Args:
        model: The model, to name in errors and logs.

    Every method but :meth:`close` is cheap when a region is reused: no call to the server.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = {}
        self._pid = os.getpid()

    def _entry(self, url: str) -> _Endpoint:
        if self._pid != os.getpid():  # forked: the parent's regions and channels are its own
            self._endpoints, self._pid = {}, os.getpid()
        ep = self._endpoints.get(url)
        if ep is None:
            ep = self._endpoints[url] = _Endpoint()
            if not is_this_host(_url_host(url)):
                ep.state = "wire"
                _log.debug("Triton endpoint %s is on another host: tensors go over gRPC", url)
        return ep

    def uses_wire(self, url: str) -> bool:
        """Whether ``url`` is known to take no shared memory (another host, or it refused)."""
        with self._lock:
            return self._entry(url).state == "wire"

    def acquire(self, url: str, nbytes: int, client: Any) -> Region | None:
        """A registered region of at least ``nbytes`` for one request to ``url``, or
        ``None``: send this request over the wire.

        Reuses a free region (no server call), else grows one or creates one and
        registers it through ``client`` (the endpoint's gRPC client). Never raises for a
        refused or failed registration: the endpoint then takes the wire (see the module
        docstring for when that is for good).
        """
        with self._lock:
            ep = self._entry(url)
            if ep.state == "wire":
                return None
            fits = [r for r in ep.free if r.byte_size >= nbytes]
            if fits:
                best = min(fits, key=lambda r: r.byte_size)
                ep.free.remove(best)
                ep.in_use.add(best.name)
                return best
            grow = ep.free.pop() if ep.free else None
            generation = ep.generation
        # Server calls happen outside the lock: other requests keep reusing free regions.
        if grow is not None:
            self._unregister(client, [grow.name], url)
            grow.destroy()
        region = self._register(url, max(nbytes, grow.byte_size if grow else 0), client, generation)
        if region is not None:
            with self._lock:
                ep = self._entry(url)
                ep.client = client
                ep.in_use.add(region.name)
        return region

    def release(self, url: str, region: Region, *, reusable: bool) -> None:
        """Hand ``region`` back after its request.

        Args:
            reusable: The server answered the request (with outputs or an error), so it is
                done with the region. ``False`` (no answer: timed out, cancelled, lost)
                discards it: the server may still write into it.
        """
        with self._lock:
            ep = self._endpoints.get(url) if self._pid == os.getpid() else None
            if ep is None or region.name not in ep.in_use:
                region.destroy()  # closed, forked or reset meanwhile
                return
            ep.in_use.discard(region.name)
            if reusable and region.generation == ep.generation:
                ep.free.append(region)
                return
            ep.stale.append(region.name)
        region.destroy()

    def reset(self, url: str) -> None:
        """``url`` failed: its registrations may be gone with its server. Discard its free
        regions (their names are unregistered when it answers again) and do not reuse
        those in flight."""
        with self._lock:
            ep = self._endpoints.get(url) if self._pid == os.getpid() else None
            if ep is None:
                return
            ep.generation += 1
            free, ep.free = ep.free, []
            ep.stale.extend(r.name for r in free)
        for region in free:
            region.destroy()

    def owns(self, url: str, reason: str) -> bool:
        """Whether an error ``reason`` from ``url`` names one of this pool's regions there
        (the server lost the registration: it restarted)."""
        with self._lock:
            ep = self._endpoints.get(url)
            if ep is None:
                return False
            names = ep.in_use.union(r.name for r in ep.free)
            return any(name in reason for name in names)

    def registered(self, url: str) -> list[str]:
        """Names of the regions this pool holds for ``url`` (free or in use)."""
        with self._lock:
            ep = self._endpoints.get(url)
            return [] if ep is None else sorted(ep.in_use.union(r.name for r in ep.free))

    def close(self, urls: Iterable[str] | None = None) -> None:
        """Unregister and unlink every region, or those of ``urls`` (endpoints that left).

        Also run at interpreter exit. Regions in use are unregistered now and unlinked when
        handed back. Idempotent; never raises.
        """
        with self._lock:
            if self._pid != os.getpid():
                return
            chosen = list(self._endpoints) if urls is None else [u for u in urls if u in self._endpoints]
            endpoints = {url: self._endpoints.pop(url) for url in chosen}
        for url, ep in endpoints.items():
            names = [r.name for r in ep.free] + sorted(ep.in_use) + ep.stale
            if ep.client is not None and names:
                self._unregister(ep.client, names, url)
            for region in ep.free:
                region.destroy()

    # -- server calls

    def _register(self, url: str, nbytes: int, client: Any, generation: int) -> Region | None:
        size = -(-nbytes // _PAGE) * _PAGE
        try:
            region = Region(size, generation)
        except (shm.SharedMemoryException, OSError) as exc:
            # A local failure (no /dev/shm, out of memory): not an inference error, so not
            # for map_triton_errors; the wire still works.
            self._fall_back(url, f"cannot create a {size}-byte region here: {exc.__cause__ or exc}")
            return None
        try:
            self._before_first_registration(url, client)
            with map_triton_errors(url, self.model):
                client.register_system_shared_memory(
                    region.name, region.key, size, client_timeout=_CONTROL_TIMEOUT_S
                )
        except InferenceError as exc:
            region.destroy()
            reason = getattr(exc, "reason", str(exc))
            if isinstance(exc, TritonUnavailable) and not self._live(url, client):
                _log.info("Triton endpoint %s: no shared memory for now (%s)", url, reason)
                return None  # down, not refusing: try again once it answers
            self._fall_back(url, f"server refused the registration: {reason}")
            return None
        return region

    def _before_first_registration(self, url: str, client: Any) -> None:
        """Unregister the names this pool left stale on ``url``, and once per endpoint those
        of this host's dead processes (killed before they could)."""
        with self._lock:
            ep = self._entry(url)
            stale, ep.stale = ep.stale, []
            sweep = not ep.swept
            ep.swept = True
        if sweep:
            stale += self._dead_processes_regions(url, client)
        if stale:
            self._unregister(client, stale, url)

    def _dead_processes_regions(self, url: str, client: Any) -> list[str]:
        try:
            with map_triton_errors(url, self.model):
                status = client.get_system_shared_memory_status(
                    as_json=True, client_timeout=_CONTROL_TIMEOUT_S
                )
        except InferenceError:
            return []  # the registration that follows says what is wrong
        mine = f"{_PREFIX}-{_host_tag()}-"
        dead = []
        for name in (status or {}).get("regions", {}):
            if not name.startswith(mine):
                continue
            pid = name[len(mine) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                dead.append(name)
        return dead

    def _unregister(self, client: Any, names: Iterable[str], url: str) -> None:
        for name in names:
            try:
                with map_triton_errors(url, self.model):
                    client.unregister_system_shared_memory(name, client_timeout=_CONTROL_TIMEOUT_S)
            except (InferenceError, ValueError):  # down, or the channel was closed
                _log.debug("Triton endpoint %s: could not unregister %s", url, name)

    def _live(self, url: str, client: Any) -> bool:
        try:
            with map_triton_errors(url, self.model):
                return bool(client.is_server_live(client_timeout=_CONTROL_TIMEOUT_S))
        except InferenceError:
            return False

    def _fall_back(self, url: str, reason: str) -> None:
        with self._lock:
            ep = self._entry(url)
            first = ep.state != "wire"
            ep.state = "wire"
        if first:
            _log.warning(
                "Triton endpoint %s: tensors go over gRPC, not shared memory (%s)", url, reason
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
