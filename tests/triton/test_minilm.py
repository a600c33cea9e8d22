"""all-MiniLM-L6-v2 (``triton_models/minilm``): the pretrained model, in process and served.

The similarity values are the ones sentence-transformers documents for this model
(PyTorch); a forward pass with a wrong weight layout, mask, pooling or activation misses
them by far more than the tolerance (ReLU for GELU: 0.858 for the first pair).
"""

from __future__ import annotations

import functools
import queue
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tierflow.errors import ModelError
from tierflow.triton.server import TritonServer

TRITON_MODELS = Path(__file__).resolve().parents[2] / "triton_models"

# (a, b, cosine) from the sentence-transformers documentation for all-MiniLM-L6-v2.
DOCUMENTED = [
    ("A man is eating food.", "A man is eating a piece of bread.", 0.7553),
    ("The new movie is awesome", "The new movie is so great", 0.8939),
    ("The cat sits outside", "The dog plays in the garden", 0.2838),
    ("A man is playing guitar", "A woman watches TV", -0.0327),
]


@pytest.fixture(scope="module")
def minilm(reference: Callable[[str], ModuleType]) -> ModuleType:
    return reference("minilm")


def _put(done: queue.Queue[tuple[int, Any, Any]], i: int, result: Any, error: Any) -> None:
    # tritonclient calls back with keywords: the names must be result and error.
    done.put((i, result, error))


def _texts(*texts: str) -> np.ndarray:
    return np.array([[t.encode()] for t in texts], dtype=np.object_)


@pytest.mark.parametrize(("a", "b", "cosine"), DOCUMENTED)
def test_documented_similarities_in_process(minilm: ModuleType, a: str, b: str, cosine: float) -> None:
    emb = minilm.forward(_texts(a, b))["EMBEDDING"]
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert float(emb[0] @ emb[1]) == pytest.approx(cosine, abs=0.002)


def test_batch_rows_do_not_depend_on_their_neighbours(minilm: ModuleType) -> None:
    """Rows are sorted by length and padded per chunk: a row's embedding is the one it gets
    alone, whatever else is in the batch, and rows come back in input order."""
    rng = np.random.default_rng(3)
    words = "the river bank was quiet at dawn while old boats drifted past green hills".split()
    texts = [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(1, 60, size=40)]
    texts += ["", "caf\u00e9 na\u00efve r\u00e9sum\u00e9"]
    batch = minilm.get_model().encode(texts, chunk_rows=7)
    alone = np.stack([minilm.get_model().encode([t])[0] for t in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-5)


def test_long_text_is_cut_at_256_tokens(minilm: ModuleType) -> None:
    model = minilm.get_model()
    long_text = "word " * 1000
    assert len(model.token_ids([long_text])[0]) == 256
    # Beyond the limit nothing changes the embedding; within it, text does.
    base = model.encode([long_text, long_text + " extra words", "word " * 10])
    np.testing.assert_allclose(base[0], base[1], atol=1e-6)
    assert not np.allclose(base[0], base[2], atol=1e-3)


def test_missing_files_name_the_directory(minilm: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        minilm.MiniLM.load(tmp_path)


def test_blas_threads_share_the_cores_among_cpu_instances(minilm: ModuleType) -> None:
    def cpu(count: int) -> dict[str, Any]:
        return {"instance_group": [{"kind": "KIND_CPU", "count": count}]}

    assert minilm.blas_threads(cpu(2), 8) == 4 and minilm.blas_threads(cpu(3), 2) == 1
    assert minilm.blas_threads({}, 6) == 6  # no instance group: Triton's default, one instance
    assert minilm.blas_threads({**cpu(2), "parameters": {"cpu_threads": {"string_value": "3"}}}, 8) == 3
    assert minilm.blas_threads({"instance_group": [{"kind": "KIND_GPU", "count": 1}]}, 8) is None


def test_a_cpu_instance_limits_the_blas_threads_of_its_process(minilm: ModuleType) -> None:
    import json

    from threadpoolctl import threadpool_info, threadpool_limits

    def blas() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas()
    if not before or max(before) < 2:
        pytest.skip("NumPy's BLAS runs one thread here already")
    config = {"instance_group": [{"kind": "KIND_CPU", "count": max(before)}]}  # one core each
    try:
        minilm.TritonPythonModel().initialize({"model_name": "minilm", "model_config": json.dumps(config)})
        assert blas() == [1] * len(before)
    finally:
        threadpool_limits(limits=max(before), user_api="blas")  # the rest of this process as it was


@pytest.mark.triton
def test_served_model_matches_the_reference(triton_server: TritonServer, minilm: ModuleType) -> None:
    """A stock tritonclient against the bundled server: the documented cosine, and the
    served rows equal the in-process forward pass."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        texts = _texts(*[s for a, b, _ in DOCUMENTED for s in (a, b)])
        inp = grpcclient.InferInput("TEXT", list(texts.shape), "BYTES")
        inp.set_data_from_numpy(texts)
        emb = client.infer("minilm", [inp]).as_numpy("EMBEDDING")
    finally:
        client.close()
    assert emb.shape == (len(texts), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, minilm.forward(texts)["EMBEDDING"], atol=1e-5)
    for i, (_, _, cosine) in enumerate(DOCUMENTED):
        assert float(emb[2 * i] @ emb[2 * i + 1]) == pytest.approx(cosine, abs=0.002)


@pytest.mark.triton
def test_concurrent_requests_merged_by_the_server_keep_their_rows(
    triton_server: TritonServer, minilm: ModuleType
) -> None:
    """Dynamic batching runs several requests in one execute(); each must get its own rows."""
    rng = np.random.default_rng(5)
    words = "a small red fox jumped over the lazy brown dog near an old stone wall".split()
    requests = [
        _texts(*(" ".join(rng.choice(words, size=int(k))) for k in rng.integers(2, 30, size=n)))
        for n in (1, 5, 17, 3, 64, 9, 2, 30)
    ]
    done: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        for i, texts in enumerate(requests):
            inp = grpcclient.InferInput("TEXT", list(texts.shape), "BYTES")
            inp.set_data_from_numpy(texts)
            client.async_infer("minilm", [inp], callback=functools.partial(_put, done, i))
        answers = [done.get(timeout=120) for _ in requests]
    finally:
        client.close()
    assert all(error is None for _, _, error in answers), answers
    results = {i: result.as_numpy("EMBEDDING") for i, result, _ in answers}
    for i, texts in enumerate(requests):
        emb = results[i]
        np.testing.assert_allclose(emb, minilm.forward(texts)["EMBEDDING"], atol=1e-5)


def _repo_with_model_dir(tmp_path: Path, model_dir: Path) -> Path:
    """A repository whose ``minilm`` reads its files from ``model_dir`` (config parameter)."""
    repo = tmp_path / "repo"
    shutil.copytree(TRITON_MODELS / "minilm", repo / "minilm", ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / "minilm" / "config.pbtxt"
    param = f'parameters {{ key: "model_dir" value {{ string_value: "{model_dir}" }} }}\n'
    config.write_text(config.read_text() + param)
    return repo


@pytest.mark.triton
def test_model_dir_parameter_serves_files_from_elsewhere(tmp_path: Path, minilm: ModuleType) -> None:
    elsewhere = tmp_path / "all-MiniLM-L6-v2"
    elsewhere.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (elsewhere / name).symlink_to(minilm.default_model_dir() / name)
    with TritonServer(_repo_with_model_dir(tmp_path, elsewhere), startup_timeout_s=120) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            texts = _texts(*DOCUMENTED[0][:2])
            inp = grpcclient.InferInput("TEXT", list(texts.shape), "BYTES")
            inp.set_data_from_numpy(texts)
            emb = client.infer("minilm", [inp]).as_numpy("EMBEDDING")
        finally:
            client.close()
    np.testing.assert_allclose(emb, minilm.forward(texts)["EMBEDDING"], atol=1e-5)


@pytest.mark.triton
def test_missing_weights_fail_the_load_with_the_reason(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = TritonServer(_repo_with_model_dir(tmp_path, empty), startup_timeout_s=120)
    with pytest.raises(ModelError) as info:
        server.start()
    assert info.value.model == "minilm"
    assert f"no model.safetensors in {empty}" in info.value.reason
