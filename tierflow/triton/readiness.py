"""Wait until a Triton server is live and given models are ready.

Readiness is checked per model (``is_model_ready``), not just ``/v2/health/ready``: a
server that is up with one model failed is reported as that model's :class:`ModelError`
carrying Triton's own reason from the repository index. Every tritonclient failure goes
through :func:`~tierflow.triton.errors.map_triton_errors`.

Usage::

    wait_until_ready("triton-host:8001", ["mlp_classifier"], timeout_s=60)  # someone else's
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import tritonclient.grpc as grpcclient

from tierflow.errors import ModelError, TritonUnavailable
from tierflow.triton.errors import map_triton_errors

__all__ = ["poll_ready", "wait_until_ready"]

_POLL_INTERVAL_S = 0.1
#: The ``model`` named by a failed server-level call (liveness, the index); only its
#: reason is read.
_SERVER = "(server)"


def _repository_reasons(
    url: str, client: grpcclient.InferenceServerClient
) -> dict[str, tuple[str, str]]:
    """``{model: (state, reason)}`` from the repository index; empty if it cannot be read."""
    try:
        with map_triton_errors(url, _SERVER):
            index = client.get_model_repository_index(as_json=False, client_timeout=5.0)
    except (TritonUnavailable, ModelError):
        return {}
    return {m.name: (m.state, m.reason) for m in index.models}


def poll_ready(
    url: str,
    models: Sequence[str],
    deadline: float,
    timeout_s: float,
    *,
    failed_fast: bool,
    check_alive: Callable[[], None] = lambda: None,
) -> None:
    """Wait until the server at ``url`` is live and every model in ``models`` is ready.

    The loop behind :func:`wait_until_ready` and ``TritonServer.start``.

    Args:
        deadline: A ``time.monotonic()`` instant; ``timeout_s`` only names it in errors.
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
                with map_triton_errors(url, _SERVER):
                    live = client.is_server_live(client_timeout=1.0)
                if live:
                    break
                last = "server not live"
            except (TritonUnavailable, ModelError) as exc:
                last = exc.reason
            if time.monotonic() > deadline:
                raise TritonUnavailable(url, f"not live after {timeout_s:g}s ({last})")
            time.sleep(_POLL_INTERVAL_S)

        pending = list(models)
        while pending:
            check_alive()
            states = _repository_reasons(url, client)
            for model in list(pending):
                state, reason = states.get(model, ("", ""))
                try:
                    with map_triton_errors(url, model):
                        ready = client.is_model_ready(model, client_timeout=5.0)
                except (TritonUnavailable, ModelError):
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
    poll_ready(url, models, deadline, timeout_s, failed_fast=False)
