"""Run an Arrow table through a Triton model over gRPC: chunked, pipelined, retried, checked.

:class:`TritonStageClient` is what a Triton stage's Ray actor holds. It cuts a table into
requests of at most ``min(batch_size, max_batch_size)`` rows (Triton never splits an
oversized request), keeps ``max_inflight`` of them in flight with ``async_infer``, validates
every response against the model's config as the *server* reports it, and returns the table
with the output columns appended, rows in their original order.

Transient failures (:class:`RetryPolicy`): given several URLs, requests are balanced over
them (least in flight) and an endpoint that fails is taken out of rotation for an
exponential cool-down while its requests are resent to the others at once. When no endpoint
is left (one server restarting, say), the client backs off and polls ``is_model_ready``,
and resends the moment a model is ready again; a server that stays down or frozen fails
the call after ``ready_timeout_s``, and a request that keeps failing after
``max_attempts`` sends. :meth:`TritonStageClient.endpoint_stats` shows each endpoint's
health and counters.

Same-host servers (:mod:`tierflow.triton.shared_memory`): a request of at least
``shared_memory_min_bytes`` of numeric tensors to a server on this host puts them in a
pooled system shared-memory region instead of the gRPC message; a server that refuses
gets the wire.

Every ``tritonclient``/gRPC failure is translated in one place, :func:`map_triton_errors`,
into :class:`~tierflow.errors.TritonUnavailable` (retryable: the server or network is in
trouble) or :class:`~tierflow.errors.ModelError` (never retried: the request or the model is
wrong). :data:`STATUS_ERRORS` lists the decision for every gRPC status code.

Usage::

    client = TritonStageClient(
        "127.0.0.1:8001", "mlp_classifier",                  # or ["host-a:8001", "host-b:8001"]
        inputs={"features": "FEATURES"},                     # column -> input tensor
        outputs={"PROBS": "probs", "LABEL": "label"},        # output tensor -> column
        batch_size=64, max_inflight=4,
    )
    table = client.infer_table(table)     # + "probs" fixed_size_list<float>[4], "label" int64

Columns become tensors and tensors columns in :mod:`tierflow.triton.convert`; the
endpoints and their health in :mod:`tierflow.triton.endpoints`; :class:`RetryPolicy` in :mod:`tierflow.retry`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import tritonclient.grpc as grpcclient

from tierflow.errors import InferenceError, ModelError, TritonUnavailable
from tierflow.triton.convert import column_to_tensor, numpy_dtype, tensor_to_column
from tierflow.retry import RetryPolicy
from tierflow.triton.endpoints import Endpoint, EndpointPool, EndpointStats
from tierflow.triton.errors import map_triton_errors
from tierflow.triton.repository import ModelSpec, spec_from_config
from tierflow.triton.shared_memory import (
    DEFAULT_MIN_BYTES,
    Layout,
    Region,
    SharedMemoryPool,
    request_layout,
)

__all__ = ["TritonStageClient"]


_log = logging.getLogger(__name__)

#: Readiness polls while every endpoint is out follow the backoff schedule, capped here so
#: that a server that comes back is noticed within this long.
_MAX_PROBE_INTERVAL_S = 0.5
#: Deadline of one readiness poll (an answer takes a round trip; a hung server takes this).
_PROBE_TIMEOUT_S = 2.0


def _default_factory(url: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url)


# --------------------------------------------------------------------------- the client


class TritonStageClient:
    """Infer whole Arrow tables against one Triton model over gRPC, on one or more servers.

    With several URLs each request goes to the endpoint with the fewest calls in flight
    (ties round robin). An endpoint whose call fails retryably is taken out of rotation for
    a cool-down and the request is resent elsewhere at once; when every endpoint is out,
    the client backs off and polls ``is_model_ready`` until one is back (see
    :class:`RetryPolicy`). Every endpoint must serve the same model: the config is fetched
    once, from whichever answers first.

    The gRPC clients, one per endpoint, are built lazily in the process that first uses
    them and are never pickled (``__getstate__`` drops them with the endpoints' health and
    counters): ship the object to a Ray actor and it connects there.

    ``infer_table`` may be called from several threads at once; each call keeps its own
    ``max_inflight`` window, and the endpoints' health and in-flight counts are shared.

    Args:
        url: gRPC address ``host:port``, or a sequence of them serving the same model.
        model: Model name.
        inputs: Input column -> input tensor, e.g. ``{"features": "FEATURES"}``.
        outputs: Output tensor -> output column, e.g. ``{"PROBS": "probs"}``; columns are
            appended in this order.
        batch_size: Rows per request (capped at the model's ``max_batch_size``).
        max_inflight: Requests in flight at once, per ``infer_table`` call, over all endpoints.
        timeout_s: End-to-end deadline of one request (``client_timeout``).
        model_version: The version every call names (``""``: the server's policy picks).
        retry: Failover, backoff and readiness waits for retryable failures.
        sleep: Called with each backoff and poll delay; inject to test without sleeping.
        client_factory: ``url -> tritonclient.grpc.InferenceServerClient``-like object
            (a seam for tests; must be picklable, e.g. a module-level function).
        clock: Monotonic seconds for cool-downs and readiness deadlines (a seam for tests,
            to go with ``sleep``).
        shared_memory: ``"auto"``: requests to a server on this host carry their numeric
            tensors in system shared memory when they hold at least
            ``shared_memory_min_bytes`` of them; ``"off"``: always over gRPC.
        shared_memory_min_bytes: Smallest request (input + output bytes) that uses shared
            memory.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        model: str,
        inputs: Mapping[str, str],
        outputs: Mapping[str, str],
        batch_size: int = 64,
        max_inflight: int = 4,
        timeout_s: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep,
        *,
        client_factory: Callable[[str], Any] = _default_factory,
        clock: Callable[[], float] = time.monotonic,
        model_version: str = "",
        shared_memory: Literal["auto", "off"] = "auto",
        shared_memory_min_bytes: int = DEFAULT_MIN_BYTES,
    ) -> None:
        urls = (url,) if isinstance(url, str) else tuple(url)
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError(f"url must be a non-empty 'host:port' or a list of them, got {url!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"url lists an endpoint twice: {list(urls)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not inputs or not outputs:
            raise ValueError("inputs and outputs must each map at least one tensor")
        if len(set(outputs.values())) != len(outputs):
            raise ValueError(f"two output tensors map to the same column: {dict(outputs)}")
        if shared_memory not in ("auto", "off"):
            raise ValueError(f"shared_memory must be 'auto' or 'off', got {shared_memory!r}")
        if shared_memory_min_bytes < 0:
            raise ValueError(f"shared_memory_min_bytes must be >= 0, got {shared_memory_min_bytes}")
        self.urls = urls
        #: The endpoints as errors name them: the URL, or the URLs joined by ", ".
        self.url = ", ".join(urls)
        self.model = model
        self.model_version = model_version
        self.inputs = dict(inputs)
        self.outputs = dict(outputs)
        self.batch_size = batch_size
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s
        self.retry = retry
        self.sleep = sleep
        self.client_factory = client_factory
        self.clock = clock
        self.shared_memory = shared_memory
        self.shared_memory_min_bytes = shared_memory_min_bytes
        self._spec: ModelSpec | None = None
        self._init_transient()

    def _init_transient(self) -> None:
        self._pool = EndpointPool(self.urls, self.client_factory, self.retry, self.clock)
        self._spec_lock = threading.Lock()
        self._rng = random.Random()
        self._shm = SharedMemoryPool(self.model)
        # Unregister and unlink the regions when the client goes or the process exits (an
        # actor's teardown); the finalizer holds the pool, not the client.
        self._shm_finalizer = weakref.finalize(self, self._shm.close)
        #: Called when every endpoint is out of rotation, before each backoff and readiness
        #: poll: a hook that may call :meth:`set_endpoints` with fresh ones (a deployment's
        #: replacement servers). Not pickled.
        self.on_all_out: Callable[[], None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_pool", "_spec_lock", "_rng", "on_all_out", "_shm", "_shm_finalizer"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_transient()

    def __repr__(self) -> str:
        url = self.urls[0] if len(self.urls) == 1 else list(self.urls)
        return (
            f"TritonStageClient({url!r}, {self.model!r}, "
            f"batch_size={self.batch_size}, max_inflight={self.max_inflight})"
        )

    def endpoint_stats(self) -> tuple[EndpointStats, ...]:
        """Health and counters of each endpoint, in ``urls`` order. Thread-safe."""
        return self._pool.stats()

    def set_endpoints(self, urls: Sequence[str], prefer: Collection[str] = ()) -> None:
        """Send calls to ``urls`` from now on, ``prefer`` ones first (the same node's server).

        Endpoints that stay keep their health and connection; calls in flight to one that
        went end as they would have, and a failed request is resent to the others, so
        every row still comes from exactly one answered request. An empty list is allowed
        (every server is being replaced): calls then wait as when every endpoint is out.
        Thread-safe.

        Raises:
            ValueError: ``urls`` lists an endpoint twice.
        """
        urls = tuple(urls)
        if len(set(urls)) != len(urls):
            raise ValueError(f"url lists an endpoint twice: {list(urls)}")
        # Before the pool closes their channels: unregistering needs them.
        self._shm.close(u for u in self.urls if u not in urls)
        if self._pool.replace(urls, prefer):
            self.urls = urls
            self.url = ", ".join(urls) or "(no endpoint)"

    # -- model config

    @property
    def spec(self) -> ModelSpec:
        """The model's spec as the server reports it (fetched on first use).

        Raises:
            TritonUnavailable: No endpoint could be reached after every retry.
            ModelError: Unknown model, or the column/tensor mappings do not fit it.
        """
        with self._spec_lock:
            if self._spec is None:
                response = self._call(
                    lambda client: client.get_model_config(
                        self.model, self.model_version, client_timeout=self.timeout_s
                    )
                )
                spec = spec_from_config(response.config)
                self._check_mapping(spec)
                self._spec = spec
            return self._spec

    def close(self) -> None:
        """Release the shared-memory regions and close every gRPC channel (a later call
        reconnects). Call it with no ``infer_table`` running. Idempotent."""
        self._shm.close()
        self._pool.close()

    def shared_memory_regions(self, url: str) -> list[str]:
        """Names of the shared-memory regions this process holds on ``url``."""
        return self._shm.registered(url)

    def _check_mapping(self, spec: ModelSpec) -> None:
        for tensor in self.inputs.values():
            if tensor not in spec.inputs:
                raise ModelError(
                    self.model, f"has no input tensor {tensor!r} (inputs: {', '.join(spec.inputs)})"
                )
        for tensor in self.outputs:
            if tensor not in spec.outputs:
                raise ModelError(
                    self.model,
                    f"has no output tensor {tensor!r} (outputs: {', '.join(spec.outputs)})",
                )
        missing = [t for t in spec.inputs if t not in self.inputs.values()]
        if missing:
            raise ModelError(
                self.model,
                f"input tensor(s) {', '.join(map(repr, missing))} are not fed by any column",
            )
        if spec.max_batch_size < 1:
            raise ModelError(
                self.model,
                "max_batch_size is 0 (no batch dimension); table inference needs a batching model",
            )

    # -- retries

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        """Run one unary call ``fn(grpc_client)`` on some endpoint, failing over and retrying."""
        attempt, reason = 0, ""
        while True:
            got = self._pool.acquire()
            if got is None:
                self._wait_for_endpoint(max(attempt, 1), reason)
                continue
            ep, epoch = got
            attempt += 1
            try:
                with map_triton_errors(ep.url, self.model):
                    result = fn(self._pool.client(ep))
            except TritonUnavailable as exc:
                self._pool.failed(ep, epoch, exc.reason)
                self._shm.reset(ep.url)
                if attempt >= self.retry.max_attempts:
                    raise self._gave_up(ep.url, exc, attempt) from exc
                reason = exc.reason
                continue
            except BaseException:
                self._pool.succeeded(ep, epoch)  # it answered; the answer is the problem
                raise
            self._pool.succeeded(ep, epoch)
            return result

    def _gave_up(self, url: str, exc: TritonUnavailable, attempts: int) -> TritonUnavailable:
        where = f" (last from {url})" if len(self.urls) > 1 else ""
        return TritonUnavailable(
            self.url, f"{exc.reason}{where} (gave up after {attempts} attempt(s))"
        )

    def _wait_for_endpoint(self, retry: int, reason: str) -> None:
        """Return once some endpoint can take a call; back off and poll readiness if needed.

        Endpoints that are merely busy (on trial with their one call in flight elsewhere)
        are waited for without a backoff. When every endpoint is out of rotation: sleep the
        backoff for retry ``retry``, then poll each endpoint's ``is_model_ready`` (the one
        whose cool-down ends first first) at growing intervals up to
        ``_MAX_PROBE_INTERVAL_S``, and readmit the first that says ready.

        Raises:
            TritonUnavailable: No endpoint was ready within ``retry.ready_timeout_s``.
        """
        if not self._pool.all_out():
            self._pool.wait(timeout_s=0.1)
            return
        if self._refreshed():
            return
        start = self.clock()
        self.sleep(self.retry.delay_s(retry, self._rng.random()))
        if self.retry.ready_timeout_s == 0:  # no polling: resend blindly after the backoff
            for ep in self._pool.by_cooldown_end():
                self._pool.readmit(ep)
            return
        deadline = start + self.retry.ready_timeout_s
        poll, last = 0, "not ready"
        while True:
            if self._refreshed():
                return
            for ep in self._pool.by_cooldown_end():
                remaining = deadline - self.clock()
                try:
                    with map_triton_errors(ep.url, self.model):
                        client = self._pool.client(ep)
                        ready = client.is_model_ready(
                            self.model, self.model_version, client_timeout=max(min(_PROBE_TIMEOUT_S, remaining), 0.01)
                        )
                except InferenceError as exc:
                    ready = False
                    reason = getattr(exc, "reason", str(exc))
                    last = f"{ep.url}: {reason}" if len(self.urls) > 1 else reason
                if ready:
                    _log.info("Triton endpoint %s reports %s ready", ep.url, self.model)
                    self._pool.readmit(ep)
                    return
            remaining = deadline - self.clock()
            if remaining <= 0:
                some = "any endpoint" if len(self.urls) > 1 else "the endpoint"
                raise TritonUnavailable(
                    self.url,
                    f"{reason or 'every endpoint out of rotation'}; model {self.model!r} not ready "
                    f"on {some} within {self.retry.ready_timeout_s:g}s (last poll: {last})",
                )
            poll += 1
            interval = min(_MAX_PROBE_INTERVAL_S, self.retry.delay_s(poll, self._rng.random()))
            self.sleep(min(interval, remaining))

    def _refreshed(self) -> bool:
        """Run the ``on_all_out`` hook; whether some endpoint can now take a call."""
        if self.on_all_out is None:
            return False
        self.on_all_out()
        return not self._pool.all_out()

    # -- inference

    def infer_table(self, table: pa.Table) -> pa.Table:
        """Run every row of ``table`` through the model.

        Returns:
            ``table`` with one column per entry of ``outputs`` appended, in mapping order,
            rows in the original order; each row's outputs come from exactly one answered
            request, whatever was retried or failed over.

        Raises:
            TritonUnavailable: A request still failed transiently after ``retry.max_attempts``
                sends, or no endpoint became ready within ``retry.ready_timeout_s``.
            ModelError: Bad input column, a non-retryable server error, or a response whose
                tensor is missing or has the wrong dtype or shape. Nothing is returned then.
            ValueError: An input column is absent, or an output column already exists.
        """
        spec = self.spec
        for column in self.inputs:
            if column not in table.column_names:
                raise ValueError(
                    f"input column {column!r} not in table (columns: {table.column_names})"
                )
        for column in self.outputs.values():
            if column in table.column_names:
                raise ValueError(f"output column {column!r} already exists in the table")

        n = table.num_rows
        step = min(self.batch_size, spec.max_batch_size)
        bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        # Convert each input column once (zero-copy for a single-chunk numeric column) and
        # slice NumPy views per request: per-request Arrow slicing cost ~25 % of throughput
        # at 64-row requests, and bad columns now fail before anything is sent.
        arrays = {
            tensor: column_to_tensor(table.column(column), spec.inputs[tensor], self.model, column)
            for column, tensor in self.inputs.items()
        }
        parts: dict[str, list[np.ndarray]] = {t: [None] * len(bounds) for t in self.outputs}  # type: ignore[list-item]
        self._run_requests(spec, arrays, bounds, parts)

        for tensor, column in self.outputs.items():
            out_spec = spec.outputs[tensor]
            if bounds:
                array = (
                    np.concatenate(parts[tensor], axis=0) if len(bounds) > 1 else parts[tensor][0]
                )
            else:
                dims = tuple(max(d, 1) for d in out_spec.dims)
                array = np.empty((0, *dims), dtype=numpy_dtype(out_spec))
            table = table.append_column(column, tensor_to_column(array, out_spec))
        return table

    def _make_request(
        self,
        spec: ModelSpec,
        arrays: dict[str, np.ndarray],
        lo: int,
        hi: int,
        ep: Endpoint,
        wire_outputs: list[Any],
    ) -> tuple[list[Any], list[Any], tuple[Region, Layout] | None]:
        """The inputs and requested outputs of rows ``lo:hi`` for ``ep``, and the leased
        shared-memory region with its layout if the request goes that way."""
        layout = None
        if self.shared_memory == "auto" and not self._shm.uses_wire(ep.url):
            layout = request_layout(spec, arrays, self.outputs, lo, hi)
        region = None
        if layout is not None and layout.nbytes >= self.shared_memory_min_bytes:
            region = self._shm.acquire(ep.url, layout.nbytes, self._pool.client(ep))
        if region is None or layout is None:
            return self._make_inputs(spec, arrays, lo, hi), wire_outputs, None
        try:
            shared = {t: (offset, n) for t, offset, n in layout.inputs}
            infer_inputs = []
            for tensor, array in arrays.items():
                part = array[lo:hi]
                inp = grpcclient.InferInput(tensor, list(part.shape), spec.inputs[tensor].dtype)
                if tensor in shared:
                    offset, n = shared[tensor]
                    region.write(part, offset)
                    inp.set_shared_memory(region.name, n, offset=offset)
                else:
                    with map_triton_errors(self.url, self.model):
                        inp.set_data_from_numpy(part)
                infer_inputs.append(inp)
            placed = {t: (offset, n) for t, offset, n, _ in layout.outputs}
            requested = []
            for tensor in self.outputs:
                out = grpcclient.InferRequestedOutput(tensor)
                if tensor in placed:
                    offset, n = placed[tensor]
                    out.set_shared_memory(region.name, n, offset=offset)
                requested.append(out)
        except BaseException:
            self._shm.release(ep.url, region, reusable=True)  # never sent
            raise
        return infer_inputs, requested, (region, layout)

    def _make_inputs(
        self, spec: ModelSpec, arrays: dict[str, np.ndarray], lo: int, hi: int
    ) -> list[Any]:
        infer_inputs = []
        for tensor, array in arrays.items():
            part = array[lo:hi]  # a view; tritonclient serialises it into the request
            inp = grpcclient.InferInput(tensor, list(part.shape), spec.inputs[tensor].dtype)
            with map_triton_errors(self.url, self.model):
                inp.set_data_from_numpy(part)
            infer_inputs.append(inp)
        return infer_inputs

    def _run_requests(
        self,
        spec: ModelSpec,
        arrays: dict[str, np.ndarray],
        bounds: list[tuple[int, int]],
        parts: dict[str, list[np.ndarray]],
    ) -> None:
        """Keep up to ``max_inflight`` requests in flight until every one has a result.

        Each request goes to the endpoint the pool picks. A retryable failure takes that
        endpoint out of rotation (once per outage, however many of its calls fail) and puts
        the request back at the head of the queue, so it is resent at once to another
        endpoint. Only when this call has nothing in flight and nothing can be sent does it
        wait (:meth:`_wait_for_endpoint`): one backoff and readiness wait per outage, not
        one per request.

        A request in shared memory holds its region until its answer is read. A server
        that answers that it does not know the region lost its registrations (it
        restarted): the endpoint's regions are dropped and the request resent, which
        registers new ones.
        """
        requested = [grpcclient.InferRequestedOutput(t) for t in self.outputs]
        done: queue.SimpleQueue[tuple[int, Any, Any]] = queue.SimpleQueue()
        pending: deque[int] = deque(range(len(bounds)))
        attempts = [0] * len(bounds)
        calls: dict[int, tuple[Any, Endpoint, int]] = {}  # request -> (call, endpoint, epoch)
        leases: dict[int, tuple[Region, Layout]] = {}  # request -> its shared memory
        remaining = len(bounds)
        last_reason = ""

        def release(i: int, url: str, reusable: bool) -> None:
            lease = leases.pop(i, None)
            if lease is not None:
                self._shm.release(url, lease[0], reusable=reusable)

        try:
            while remaining:
                while pending and len(calls) < self.max_inflight:
                    got = self._pool.acquire()
                    if got is None:
                        break
                    ep, epoch = got
                    i = pending.popleft()
                    lo, hi = bounds[i]
                    attempts[i] += 1
                    try:
                        infer_inputs, outputs, lease = self._make_request(
                            spec, arrays, lo, hi, ep, requested
                        )
                        if lease is not None:
                            leases[i] = lease
                        with map_triton_errors(ep.url, self.model, served=True):
                            call = self._pool.client(ep).async_infer(
                                self.model,
                                infer_inputs,
                                callback=lambda result, error, i=i: done.put((i, result, error)),
                                model_version=self.model_version,
                                outputs=outputs,
                                client_timeout=self.timeout_s,
                            )
                    except TritonUnavailable as exc:  # refused before it left
                        calls[i] = (None, ep, epoch)
                        done.put((i, None, exc))
                        continue
                    except BaseException:
                        release(i, ep.url, reusable=False)
                        self._pool.dropped(ep, epoch)
                        raise
                    calls[i] = (call, ep, epoch)
                if not calls:
                    self._wait_for_endpoint(max(attempts[pending[0]], 1), last_reason)
                    continue
                try:
                    # The per-call deadline guarantees a callback; this only guards a lost one.
                    i, result, error = done.get(timeout=self.timeout_s + 30.0)
                except queue.Empty:
                    where = ", ".join(sorted({ep.url for _, ep, _ in calls.values()}))
                    raise TritonUnavailable(
                        where, f"no callback within {self.timeout_s + 30.0:g}s"
                    ) from None
                _, ep, epoch = calls.pop(i)
                if error is None:
                    self._pool.succeeded(ep, epoch)
                    try:
                        self._collect(result, spec, bounds[i], i, parts, ep.url, leases.get(i))
                    finally:
                        release(i, ep.url, reusable=True)
                    remaining -= 1
                    continue
                try:
                    with map_triton_errors(ep.url, self.model, served=True):
                        raise error
                except TritonUnavailable as exc:
                    if i in leases and self._shm.owns(ep.url, exc.reason):
                        # It answered, but without our registrations: a restarted server.
                        self._shm.reset(ep.url)
                        release(i, ep.url, reusable=False)
                        self._pool.succeeded(ep, epoch)
                    else:
                        release(i, ep.url, reusable=False)  # it may still write into it
                        self._pool.failed(ep, epoch, exc.reason)
                        self._shm.reset(ep.url)
                    if attempts[i] >= self.retry.max_attempts:
                        raise self._gave_up(ep.url, exc, attempts[i]) from exc
                    last_reason = exc.reason
                    pending.appendleft(i)
                except BaseException:
                    release(i, ep.url, reusable=True)  # it answered: done with the region
                    self._pool.succeeded(ep, epoch)  # it answered; the answer is the problem
                    raise
        finally:
            for i, (call, ep, epoch) in calls.items():  # only non-empty when raising
                self._pool.dropped(ep, epoch)
                if call is not None:
                    with contextlib.suppress(Exception):
                        call.cancel()
                release(i, ep.url, reusable=False)

    def _collect(
        self,
        result: Any,
        spec: ModelSpec,
        bound: tuple[int, int],
        i: int,
        parts: dict[str, list[np.ndarray]],
        url: str,
        lease: tuple[Region, Layout] | None = None,
    ) -> None:
        rows = bound[1] - bound[0]
        shared = {} if lease is None else {t: offset for t, offset, _, _ in lease[1].outputs}
        for tensor in self.outputs:
            out_spec = spec.outputs[tensor]
            meta = result.get_output(tensor)
            where = f"output tensor {tensor!r} from {url}"
            if meta is None:
                raise ModelError(self.model, f"response from {url} has no output tensor {tensor!r}")
            if meta.datatype != out_spec.dtype:
                raise ModelError(
                    self.model,
                    f"{where} has dtype {meta.datatype}, config declares {out_spec.dtype}",
                )
            shape = tuple(int(d) for d in meta.shape)
            expected = (rows, *out_spec.dims)
            if len(shape) != len(expected) or any(
                e >= 0 and s != e for s, e in zip(shape, expected, strict=True)
            ):
                raise ModelError(
                    self.model, f"{where} has shape {list(shape)}, expected {list(expected)}"
                )
            if lease is not None and tensor in shared:
                # The server wrote it into our region (it fails the request when the
                # tensor does not fit); copy it out, the region is reused.
                parts[tensor][i] = lease[0].read(numpy_dtype(out_spec), shape, shared[tensor])
                continue
            try:
                array = result.as_numpy(tensor)
            except ValueError as exc:  # raw content does not fill the declared shape
                raise ModelError(self.model, f"{where} is malformed: {exc}") from exc
            if array is None or array.shape != shape:
                raise ModelError(self.model, f"{where} carries no data for shape {list(shape)}")
            parts[tensor][i] = array
