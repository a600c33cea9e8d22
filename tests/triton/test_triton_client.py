"""TritonStageClient against the real tritonserver: exact outputs, order, errors."""

from __future__ import annotations

import pickle
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np
import pyarrow as pa
import pytest

from tierflow.errors import ModelError, TritonUnavailable
from tierflow.triton.client import TritonStageClient
from tierflow.retry import RetryPolicy
from tierflow.triton.server import TritonServer, _free_port

pytestmark = pytest.mark.triton

MLP_OUT = {"PROBS": "probs", "LABEL": "label"}
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05)


def _features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def _mlp_table(x: np.ndarray) -> pa.Table:
    ids = np.random.default_rng(1).permutation(
        len(x)
    )  # not sorted: order must be kept, not restored
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 16)
    return pa.table({"id": ids, "features": column})


def _stack(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.flatten().to_numpy().reshape(len(arr), -1)


def _mlp(url: str, **kwargs: object) -> TritonStageClient:
    return TritonStageClient(url, "mlp_classifier", {"features": "FEATURES"}, MLP_OUT, **kwargs)  # type: ignore[arg-type]


def test_mlp_matches_reference_and_keeps_row_order(
    triton_server: TritonServer, reference: Callable[[str], ModuleType]
) -> None:
    x = _features(1000)
    table = _mlp_table(x)
    out = _mlp(triton_server.grpc_url, batch_size=64, max_inflight=4).infer_table(table)

    assert out.column_names == ["id", "features", "probs", "label"]
    assert out.schema.field("probs").type == pa.list_(pa.float32(), 4)
    assert out.schema.field("label").type == pa.int64()
    assert out.column("id").equals(table.column("id"))
    assert out.column("features").equals(table.column("features"))
    ref = reference("mlp_classifier").forward(x)
    np.testing.assert_allclose(_stack(out.column("probs")), ref["PROBS"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out.column("label").to_numpy(), ref["LABEL"].reshape(-1))
    assert (
        len(set(out.column("label").to_pylist())) > 1
    )  # a classifier that says one thing is no test


def test_text_embedder_string_binary_and_chunked_columns(
    triton_server: TritonServer, reference: Callable[[str], ModuleType]
) -> None:
    texts = [
        f"document {i}: {'lorem ipsum ' * (i % 5)}caf\u00e9 #{i * 7919 % 1000}" for i in range(500)
    ]
    texts[3] = ""
    # Three chunks whose boundaries fall inside requests (batch_size 64).
    table = pa.concat_tables(
        [
            pa.table({"text": texts[:100]}),
            pa.table({"text": texts[100:333]}),
            pa.table({"text": texts[333:]}),
        ]
    )
    assert table.column("text").num_chunks == 3
    client = TritonStageClient(
        triton_server.grpc_url,
        "text_embedder",
        {"text": "TEXT"},
        {"EMBEDDING": "emb"},
        batch_size=64,
        max_inflight=3,
    )
    expected = reference("text_embedder").forward(np.array(texts, dtype=np.object_))["EMBEDDING"]

    out = client.infer_table(table)
    assert out.schema.field("emb").type == pa.list_(pa.float32(), 32)
    np.testing.assert_allclose(_stack(out.column("emb")), expected, rtol=1e-6, atol=1e-7)

    binary = pa.table({"text": pa.array([t.encode() for t in texts], type=pa.binary())})
    np.testing.assert_allclose(
        _stack(client.infer_table(binary).column("emb")), expected, rtol=1e-6, atol=1e-7
    )


def test_list_of_double_column_is_cast(
    triton_server: TritonServer, reference: Callable[[str], ModuleType]
) -> None:
    x = _features(100, seed=3)
    table = pa.table(
        {"features": pa.array(x.astype(np.float64).tolist(), type=pa.list_(pa.float64()))}
    )
    out = _mlp(triton_server.grpc_url).infer_table(table)
    ref = reference("mlp_classifier").forward(x)
    np.testing.assert_allclose(_stack(out.column("probs")), ref["PROBS"], rtol=1e-6, atol=1e-7)


def test_batch_size_above_max_batch_size_is_capped(triton_server: TritonServer) -> None:
    client = _mlp(triton_server.grpc_url, batch_size=10_000)
    assert client.spec.max_batch_size == 256
    assert (
        client.infer_table(_mlp_table(_features(600))).num_rows == 600
    )  # 3 requests, not 1 rejected


def test_empty_table(triton_server: TritonServer) -> None:
    out = _mlp(triton_server.grpc_url).infer_table(_mlp_table(_features(0)))
    assert out.num_rows == 0
    assert out.schema.field("probs").type == pa.list_(pa.float32(), 4)
    assert out.schema.field("label").type == pa.int64()


def test_concurrent_calls_share_one_client(
    triton_server: TritonServer, reference: Callable[[str], ModuleType]
) -> None:
    client = _mlp(triton_server.grpc_url, batch_size=32, max_inflight=2)
    results: dict[int, pa.Table] = {}

    def work(seed: int) -> None:
        results[seed] = client.infer_table(_mlp_table(_features(300, seed)))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    forward = reference("mlp_classifier").forward
    for seed, out in results.items():
        np.testing.assert_allclose(
            _stack(out.column("probs")),
            forward(_features(300, seed))["PROBS"],
            rtol=1e-6,
            atol=1e-7,
        )
    assert len(results) == 4


def test_pickles_without_its_connections(triton_server: TritonServer) -> None:
    unreachable = f"127.0.0.1:{_free_port('127.0.0.1')}"
    client = _mlp([triton_server.grpc_url, unreachable], batch_size=4)
    client.infer_table(_mlp_table(_features(40)))
    assert all(ep.client is not None for ep in client._pool.endpoints)
    assert [s.state for s in client.endpoint_stats()] == ["healthy", "out"]
    clone = pickle.loads(pickle.dumps(client))  # what shipping it to a Ray actor does
    assert clone.urls == client.urls
    assert all(ep.client is None for ep in clone._pool.endpoints)
    assert [s.state for s in clone.endpoint_stats()] == ["healthy", "healthy"]  # fresh health
    assert clone.infer_table(_mlp_table(_features(10))).num_rows == 10
    client.close()
    client.close()


@pytest.mark.parametrize(
    ("inputs", "outputs", "tensor"),
    [
        ({"features": "FEATURE"}, MLP_OUT, "FEATURE"),
        ({"features": "FEATURES"}, {"PROB": "p"}, "PROB"),
    ],
)
def test_wrong_tensor_name_is_a_model_error(
    triton_server: TritonServer, inputs: dict[str, str], outputs: dict[str, str], tensor: str
) -> None:
    client = TritonStageClient(triton_server.grpc_url, "mlp_classifier", inputs, outputs)
    with pytest.raises(ModelError, match=f"tensor '{tensor}'") as info:
        client.infer_table(_mlp_table(_features(4)))
    assert info.value.model == "mlp_classifier"


def test_unknown_model_is_not_retried(triton_server: TritonServer) -> None:
    sleeps: list[float] = []
    client = TritonStageClient(
        triton_server.grpc_url, "no_such_model", {"x": "X"}, {"Y": "y"}, sleep=sleeps.append
    )
    with pytest.raises(ModelError, match="NOT_FOUND") as info:
        client.infer_table(pa.table({"x": [1]}))
    assert info.value.model == "no_such_model"
    assert sleeps == []


@pytest.mark.parametrize(
    ("column", "match"),
    [
        (pa.array([[0.0] * 16, None], type=pa.list_(pa.float32(), 16)), "null"),
        (pa.array([[0.0] * 15] * 2, type=pa.list_(pa.float32(), 15)), "15 value"),
        (pa.array([[0.0] * 16, [0.0] * 17]), "lengths differ"),
        (pa.array([["a"] * 16] * 2, type=pa.list_(pa.string(), 16)), "cannot cast string"),
    ],
    ids=["null", "width", "ragged", "string"],
)
def test_bad_input_column_is_a_model_error(
    triton_server: TritonServer, column: pa.Array, match: str
) -> None:
    with pytest.raises(ModelError, match=match) as info:
        _mlp(triton_server.grpc_url).infer_table(pa.table({"features": column}))
    assert "FEATURES" in info.value.reason


def test_output_column_clash_and_missing_input_column(triton_server: TritonServer) -> None:
    table = _mlp_table(_features(2)).append_column("label", pa.array([1, 2]))
    with pytest.raises(ValueError, match="'label' already exists"):
        _mlp(triton_server.grpc_url).infer_table(table)
    with pytest.raises(ValueError, match="'features' not in table"):
        _mlp(triton_server.grpc_url).infer_table(pa.table({"x": [1]}))


def test_unreachable_url_fails_after_the_readiness_wait() -> None:
    url = f"127.0.0.1:{_free_port('127.0.0.1')}"
    policy = RetryPolicy(3, 0.01, 0.05, jitter=0.0, ready_timeout_s=0.5)
    client = _mlp(url, timeout_s=2.0, retry=policy)
    t0 = time.monotonic()
    with pytest.raises(TritonUnavailable, match=r"not ready on the endpoint within 0.5s") as info:
        client.infer_table(_mlp_table(_features(4)))
    assert time.monotonic() - t0 < 5
    assert info.value.url == url and url in str(info.value)
    (stats,) = client.endpoint_stats()
    assert stats.sent == 1 and stats.state == "out"  # polled, never blindly resent


def test_unreachable_url_without_readiness_wait_gives_up_after_the_backoff() -> None:
    url = f"127.0.0.1:{_free_port('127.0.0.1')}"
    sleeps: list[float] = []
    policy = RetryPolicy(3, 0.01, 0.05, jitter=0.0, ready_timeout_s=0)
    client = _mlp(url, timeout_s=2.0, retry=policy, sleep=sleeps.append)
    with pytest.raises(TritonUnavailable, match="gave up after 3 attempt") as info:
        client.infer_table(_mlp_table(_features(4)))
    assert info.value.url == url
    assert sleeps == pytest.approx([0.01, 0.02])


# ----------------------------------------------------------------------------- validation

LIAR_CONFIG = """
backend: "python"
max_batch_size: 8
input [{ name: "X" data_type: TYPE_FP32 dims: [ 2 ] }]
output [
  { name: "GOOD" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "BAD_SHAPE" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "BAD_DTYPE" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "BAD_ROWS" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "ABSENT" data_type: TYPE_FP32 dims: [ 2 ] }
]
"""

LIAR_MODEL = '''
import numpy as np


class TritonPythonModel:
    """Answers with tensors that contradict its own config (Triton passes them through)."""

    def execute(self, requests):
        import triton_python_backend_utils as pb

        responses = []
        for request in requests:
            x = pb.get_input_tensor_by_name(request, "X").as_numpy()
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor("GOOD", x),
                pb.Tensor("BAD_SHAPE", np.zeros((len(x), 3), np.float32)),
                pb.Tensor("BAD_DTYPE", x.astype(np.int32)),
                pb.Tensor("BAD_ROWS", np.zeros((len(x) + 1, 2), np.float32)),
            ]))
        return responses
'''


@pytest.fixture(scope="module")
def liar_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("liar_repo")
    (repo / "liar" / "1").mkdir(parents=True)
    (repo / "liar" / "config.pbtxt").write_text(LIAR_CONFIG)
    (repo / "liar" / "1" / "model.py").write_text(LIAR_MODEL)
    with TritonServer(repo) as server:
        yield server
    shutil.rmtree(repo, ignore_errors=True)


def test_consistent_output_passes(liar_server: TritonServer) -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 2)})
    out = TritonStageClient(liar_server.grpc_url, "liar", {"x": "X"}, {"GOOD": "good"}).infer_table(
        table
    )
    np.testing.assert_array_equal(_stack(out.column("good")), x)


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        ("BAD_SHAPE", r"shape \[\d+, 3\], expected \[\d+, 4\]"),
        ("BAD_DTYPE", "dtype INT32, config declares FP32"),
        ("BAD_ROWS", r"shape \[(\d+), 2\], expected"),
        ("ABSENT", "no output tensor 'ABSENT'"),
    ],
)
def test_response_contradicting_the_config_is_a_model_error(
    liar_server: TritonServer, tensor: str, match: str
) -> None:
    table = pa.table(
        {"x": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(20, np.float32)), 2)}
    )
    client = TritonStageClient(
        liar_server.grpc_url, "liar", {"x": "X"}, {"GOOD": "good", tensor: "bad"}
    )
    with pytest.raises(ModelError, match=match) as info:
        client.infer_table(table)
    assert info.value.model == "liar"
    assert tensor in info.value.reason
    assert liar_server.grpc_url in info.value.reason  # which server answered so


def test_model_version_is_sent_with_every_call(triton_server: TritonServer) -> None:
    """The repository serves version 1 only: naming it works, naming another is refused
    (a version that silently fell back to the server's choice would change keys and nothing else)."""
    x = _features(8)
    assert _mlp(triton_server.grpc_url, model_version="1").infer_table(_mlp_table(x)).num_rows == 8
    with pytest.raises(ModelError) as info:
        _mlp(triton_server.grpc_url, model_version="7").infer_table(_mlp_table(x))
    assert info.value.model == "mlp_classifier"


def test_stage_model_version_reaches_the_client(triton_server: TritonServer) -> None:
    from tierflow.engine.runners import make_transform
    from tierflow.manifest import TritonStage

    stage = TritonStage(kind="triton", name="classify", model="mlp_classifier", model_version="7",
                        inputs={"features": "FEATURES"}, outputs=MLP_OUT)
    transform = make_transform((stage,), triton_server.grpc_url)
    with pytest.raises(ModelError):
        transform(_mlp_table(_features(4)))
