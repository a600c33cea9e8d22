"""Triton Inference Server integration: model repository, local server, table client.

* :mod:`~tierflow.triton.repository` reads ``triton_models/`` (specs, digests) offline.
* :mod:`~tierflow.triton.bundle` finds the ``tritonserver`` binary and Python backend that
  ship in ``nvidia-pytriton``.
* :mod:`~tierflow.triton.server` runs that binary on a model repository;
  :mod:`~tierflow.triton.serving` is ``tierflow triton serve``.
* :mod:`~tierflow.triton.readiness` waits until a server and its models are ready.
* :mod:`~tierflow.triton.client` runs Arrow tables through a model over gRPC.
* :mod:`~tierflow.triton.errors` is the one place ``tritonclient`` errors become tierflow
  errors.
* :mod:`~tierflow.triton.endpoints` balances calls over one or more servers, takes a
  failing one out of rotation, and holds the retry policy.
* :mod:`~tierflow.triton.convert` turns Arrow columns into tensors and back.
"""

from __future__ import annotations

from tierflow.triton.client import TritonStageClient
from tierflow.retry import RetryPolicy
from tierflow.triton.endpoints import EndpointStats
from tierflow.triton.errors import STATUS_ERRORS, map_triton_errors
from tierflow.triton.readiness import wait_until_ready
from tierflow.triton.repository import (
    ModelSpec,
    TensorSpec,
    list_models,
    load_model_spec,
    model_digest,
)
from tierflow.triton.server import TritonServer
from tierflow.triton.serving import serve

__all__ = [
    "STATUS_ERRORS",
    "EndpointStats",
    "ModelSpec",
    "RetryPolicy",
    "TensorSpec",
    "TritonServer",
    "TritonStageClient",
    "list_models",
    "load_model_spec",
    "map_triton_errors",
    "model_digest",
    "serve",
    "wait_until_ready",
]
