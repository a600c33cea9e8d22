"""The one place ``tritonclient``/gRPC exceptions become tierflow errors.

:func:`map_triton_errors` turns them into :class:`~tierflow.errors.TritonUnavailable`
(retryable: the server or network is in trouble) or :class:`~tierflow.errors.ModelError`
(never retried: the request or the model is wrong); :data:`STATUS_ERRORS` lists the decision
for every gRPC status code. The hierarchy itself lives in :mod:`tierflow.errors`.

Usage::

    with map_triton_errors(url, model):
        client.infer(model, inputs)          # InferenceServerException -> tierflow error
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import grpc
from tritonclient.utils import InferenceServerException

from tierflow.errors import InferenceError, ModelError, TritonUnavailable

__all__ = ["STATUS_ERRORS", "map_triton_errors"]

_S = grpc.StatusCode

#: The error class each gRPC status becomes. Every code is listed on purpose (a test fails
#: if grpc grows one that is not). Retryable = the same request may succeed later.
STATUS_ERRORS: Mapping[grpc.StatusCode, type[InferenceError]] = MappingProxyType(
    {
        # Transient: the server is down, overloaded, restarting, or too slow right now.
        _S.UNAVAILABLE: TritonUnavailable,  # connection refused/lost, queue full/timeout
        _S.DEADLINE_EXCEEDED: TritonUnavailable,  # our client_timeout elapsed
        _S.RESOURCE_EXHAUSTED: TritonUnavailable,  # server-side memory/queue pressure
        _S.ABORTED: TritonUnavailable,  # gRPC: "typically retry at a higher level"
        _S.CANCELLED: TritonUnavailable,  # tierflow never cancels a call it still wants
        # Deterministic: retrying the same request gives the same answer.
        _S.OK: ModelError,  # an "error" carrying OK is a protocol violation
        _S.UNKNOWN: ModelError,  # Triton: the model's execute raised
        _S.INVALID_ARGUMENT: ModelError,  # wrong tensor name/dtype/shape
        _S.NOT_FOUND: ModelError,  # no such model/version
        _S.ALREADY_EXISTS: ModelError,
        _S.PERMISSION_DENIED: ModelError,
        _S.UNAUTHENTICATED: ModelError,
        _S.FAILED_PRECONDITION: ModelError,
        _S.OUT_OF_RANGE: ModelError,
        _S.UNIMPLEMENTED: ModelError,  # Triton UNSUPPORTED
        _S.INTERNAL: ModelError,  # Triton/backend internal failure for this model
        _S.DATA_LOSS: ModelError,
    }
)


def _status_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of a tritonclient or gRPC exception, ``None`` if it has none."""
    if isinstance(exc, InferenceServerException):
        status = exc.status()  # "StatusCode.UNAVAILABLE" for gRPC errors, None client-side
        if status is None:
            return None
        return _S.__members__.get(str(status).rsplit(".", 1)[-1])
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code = exc.code()
        return code if isinstance(code, grpc.StatusCode) else None
    return None


@contextlib.contextmanager
def map_triton_errors(url: str, model: str, *, served: bool = False) -> Iterator[None]:
    """Translate tritonclient/gRPC exceptions raised inside into tierflow's errors.

    The one place this happens. ``raise ... from exc`` keeps the original as ``__cause__``.

    * A status in :data:`STATUS_ERRORS` -> that class (``TritonUnavailable`` names ``url``,
      ``ModelError`` names ``model``).
    * ``InferenceServerException`` without a status (tritonclient refused to build the
      request, e.g. a dtype mismatch) or with an unknown one -> ``ModelError``.
    * ``ConnectionError`` -> ``TritonUnavailable``.
    * With ``served`` (the model answered this client before), ``NOT_FOUND`` ->
      ``TritonUnavailable``: a server that is shutting down or reloading unloads its
      models first and answers "has no available versions" meanwhile. The readiness wait
      then tells a restart from a model that is gone for good.

    Anything else (including tierflow's own errors) passes through untouched.
    """
    try:
        yield
    except (InferenceServerException, grpc.RpcError) as exc:
        code = _status_code(exc)
        message = exc.message() if isinstance(exc, InferenceServerException) else None
        message = message or (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        reason = f"{code.name}: {message}" if code is not None else message
        cls = STATUS_ERRORS.get(code, ModelError) if code is not None else ModelError
        if cls is TritonUnavailable or (served and code is _S.NOT_FOUND):
            raise TritonUnavailable(url, reason) from exc
        raise ModelError(model, reason) from exc
    except ConnectionError as exc:
        raise TritonUnavailable(url, f"connection failed: {exc}") from exc
