"""Triton Python-backend model: a 2-layer MLP classifier with fixed-seed weights.

The math lives in :func:`forward`, a pure-NumPy function, and ``triton_python_backend_utils``
is imported only inside the Triton entry points, so tests can import this file by path and
compute the exact reference output without a server.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SEED = 20240611
N_FEATURES = 16
N_HIDDEN = 64
N_CLASSES = 4


def _weights() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    w1 = rng.standard_normal((N_FEATURES, N_HIDDEN)) / np.sqrt(N_FEATURES)
    b1 = rng.standard_normal(N_HIDDEN) * 0.1
    w2 = rng.standard_normal((N_HIDDEN, N_CLASSES)) / np.sqrt(N_HIDDEN)
    b2 = rng.standard_normal(N_CLASSES) * 0.1
    return w1, b1, w2, b2


W1, B1, W2, B2 = _weights()


def forward(features: np.ndarray) -> dict[str, np.ndarray]:
    """Classify a batch.

    Args:
        features: ``[n, 16]`` array (any float dtype).

    Returns:
        ``{"PROBS": float32 [n, 4], "LABEL": int64 [n, 1]}``.
    """
    # float64 internally: the result must not depend on how the dynamic batcher grouped
    # rows (float32 BLAS kernels can round differently for different batch shapes).
    x = np.asarray(features, dtype=np.float64).reshape(-1, N_FEATURES)
    hidden = np.maximum(x @ W1 + B1, 0.0)
    logits = hidden @ W2 + B2
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    probs = exp / exp.sum(axis=1, keepdims=True)
    label = probs.argmax(axis=1).astype(np.int64).reshape(-1, 1)
    return {"PROBS": probs.astype(np.float32), "LABEL": label}


class TritonPythonModel:
    """Triton entry point. ``execute`` runs every queued request as one batch."""

    def initialize(self, args: dict[str, str]) -> None:
        self.model_name = args.get("model_name", "mlp_classifier")

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        try:
            parts = [pb_utils.get_input_tensor_by_name(r, "FEATURES").as_numpy() for r in requests]
            sizes = [len(p) for p in parts]
            out = forward(np.concatenate(parts, axis=0))
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the stub
            error = pb_utils.TritonError(f"{self.model_name}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        start = 0
        for size in sizes:
            stop = start + size
            tensors = [
                pb_utils.Tensor(k, np.ascontiguousarray(v[start:stop])) for k, v in out.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses
