"""Arrow column <-> tensor conversion rules (pure functions, no server)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tierflow.errors import ModelError
from tierflow.triton.convert import column_to_tensor, tensor_to_column
from tierflow.triton.repository import TensorSpec


def _fsl(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def test_fixed_size_list_is_zero_copy() -> None:
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    column = pa.chunked_array([_fsl(x, 16)])
    out = column_to_tensor(column, TensorSpec("F", "FP32", (16,)), "m", "c")
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_array_equal(out, x)
    assert out.__array_interface__["data"][0] == column.chunk(0).flatten().buffers()[1].address


def test_slice_of_a_list_column_respects_the_offset() -> None:
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    out = column_to_tensor(_fsl(x, 16).slice(1, 2), TensorSpec("F", "FP32", (16,)), "m", "c")
    np.testing.assert_array_equal(out, x[1:])


def test_scalar_column_feeds_dims_one_with_a_safe_cast() -> None:
    out = column_to_tensor(pa.array([1, 2, 3]), TensorSpec("X", "FP32", (1,)), "m", "c")
    assert out.shape == (3, 1) and out.dtype == np.float32
    with pytest.raises(ModelError, match="cannot cast double to INT64"):
        column_to_tensor(pa.array([1.5]), TensorSpec("X", "INT64", (1,)), "m", "c")


def test_multi_dims_and_variable_dim() -> None:
    x = np.arange(32, dtype=np.int32).reshape(2, 16)
    out = column_to_tensor(_fsl(x, 16), TensorSpec("X", "INT32", (2, 8)), "m", "c")
    assert out.shape == (2, 2, 8)
    out = column_to_tensor(_fsl(x, 16), TensorSpec("X", "INT32", (-1, 4)), "m", "c")
    assert out.shape == (2, 4, 4)
    with pytest.raises(ModelError, match="cannot fill dims"):
        column_to_tensor(_fsl(x, 16), TensorSpec("X", "INT32", (-1, 5)), "m", "c")
    with pytest.raises(ModelError, match="cannot fill dims"):
        column_to_tensor(pa.array([1, 2]), TensorSpec("X", "INT32", (4,)), "m", "c")


def test_strings_become_bytes_objects() -> None:
    spec = TensorSpec("T", "BYTES", (1,))
    for column in (pa.array(["a", "\u00e9"]), pa.array(["a", "\u00e9"], pa.large_string())):
        out = column_to_tensor(column, spec, "m", "c")
        assert out.dtype == np.object_ and out.shape == (2, 1)
        assert out.reshape(-1).tolist() == [b"a", "\u00e9".encode()]
    with pytest.raises(ModelError, match="tensor is BYTES but the column holds int64"):
        column_to_tensor(pa.array([1]), spec, "m", "c")


def test_nulls_are_refused() -> None:
    with pytest.raises(ModelError, match="1 null"):
        column_to_tensor(pa.array([1.0, None]), TensorSpec("X", "FP32", (1,)), "m", "c")
    inner_null = pa.array([[1.0, None]], pa.list_(pa.float32(), 2))
    with pytest.raises(ModelError, match="inside lists"):
        column_to_tensor(inner_null, TensorSpec("X", "FP32", (2,)), "m", "c")


def test_outputs_to_columns() -> None:
    label = tensor_to_column(np.array([[1], [2]], np.int64), TensorSpec("L", "INT64", (1,)))
    assert label.type == pa.int64() and label.to_pylist() == [1, 2]
    probs = tensor_to_column(np.zeros((2, 4), np.float32), TensorSpec("P", "FP32", (4,)))
    assert probs.type == pa.list_(pa.float32(), 4)
    grid = tensor_to_column(np.zeros((2, 2, 3), np.float16), TensorSpec("G", "FP16", (2, 3)))
    assert grid.type == pa.list_(pa.float16(), 6)
    text = tensor_to_column(np.array([[b"x"], [b"yz"]], np.object_), TensorSpec("T", "BYTES", (1,)))
    assert text.type == pa.binary() and text.to_pylist() == [b"x", b"yz"]
    empty = tensor_to_column(np.zeros((0, 4), np.float32), TensorSpec("P", "FP32", (4,)))
    assert len(empty) == 0 and empty.type == pa.list_(pa.float32(), 4)
