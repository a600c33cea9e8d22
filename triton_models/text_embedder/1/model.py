"""Triton Python-backend model: hashed character-trigram text embedding.

Each text becomes a bag of character trigrams (lower-cased, padded with one space on each
side), hashed with ``zlib.crc32`` into ``N_BUCKETS`` counts, projected by a fixed-seed random
matrix to ``DIM`` dims and L2-normalised. ``crc32`` rather than ``hash()``: Python's string
hash is salted per process, so two stub processes would disagree.

The math lives in :func:`forward`, a pure-NumPy function, and ``triton_python_backend_utils``
is imported only inside the Triton entry points, so tests can import this file by path.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np

SEED = 20240612
N_BUCKETS = 4096
DIM = 32

PROJECTION = np.random.default_rng(SEED).standard_normal((N_BUCKETS, DIM)) / np.sqrt(DIM)


def _as_text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def trigram_counts(texts: Iterable[Any]) -> np.ndarray:
    """Hashed trigram counts, ``float64 [n, N_BUCKETS]``."""
    rows = [_as_text(t) for t in texts]
    counts = np.zeros((len(rows), N_BUCKETS), dtype=np.float64)
    for i, text in enumerate(rows):
        padded = f" {text.lower()} "
        for j in range(len(padded) - 2):
            bucket = zlib.crc32(padded[j : j + 3].encode("utf-8")) % N_BUCKETS
            counts[i, bucket] += 1.0
    return counts


def forward(text: np.ndarray) -> dict[str, np.ndarray]:
    """Embed a batch of texts.

    Args:
        text: ``[n]`` or ``[n, 1]`` array of ``bytes``/``str`` (``np.object_``).

    Returns:
        ``{"EMBEDDING": float32 [n, 32]}``; an empty text maps to the zero vector.
    """
    flat = np.asarray(text, dtype=np.object_).reshape(-1)
    emb = trigram_counts(flat) @ PROJECTION
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.divide(emb, norm, out=np.zeros_like(emb), where=norm > 0)
    return {"EMBEDDING": emb.astype(np.float32)}


class TritonPythonModel:
    """Triton entry point. ``execute`` runs every queued request as one batch."""

    def initialize(self, args: dict[str, str]) -> None:
        self.model_name = args.get("model_name", "text_embedder")

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        try:
            parts = [pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy() for r in requests]
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
