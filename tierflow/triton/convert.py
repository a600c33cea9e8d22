"""Arrow columns <-> Triton tensors, zero-copy where the layout allows.

Conventions (``dims`` exclude the batch dimension; ``n`` rows):

* scalar column (int/float/bool) -> dims ``[1]`` as ``[n, 1]``, cast safely to the
  tensor's dtype if it differs (an unsafe cast is a ``ModelError``);
* ``fixed_size_list<T>[d]`` (or ``list<T>`` with every row of length ``d``) -> dims with
  ``prod(dims) == d`` (one ``-1`` is filled in) as ``[n, *dims]``;
* ``string``/``binary`` -> BYTES dims ``[1]`` as ``[n, 1]`` ``np.object_`` of ``bytes``;
* nulls are a ``ModelError`` (a tensor cannot carry them).

Outputs: dims ``[1]`` become a scalar column, other dims a ``fixed_size_list`` of the
flattened row (value type from the tensor's dtype), BYTES a ``binary`` column.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tritonclient.utils import triton_to_np_dtype

from tierflow.errors import ModelError
from tierflow.triton.repository import TensorSpec

__all__ = ["column_to_tensor", "numpy_dtype", "tensor_to_column"]



def numpy_dtype(spec: TensorSpec) -> np.dtype[Any]:
    return (
        np.dtype(np.object_) if spec.dtype == "BYTES" else np.dtype(triton_to_np_dtype(spec.dtype))
    )


def _resolve_dims(dims: tuple[int, ...], width: int) -> tuple[int, ...] | None:
    """Fill one ``-1`` so that ``prod(dims) == width``; ``None`` if impossible."""
    known = math.prod(d for d in dims if d >= 0)
    free = [i for i, d in enumerate(dims) if d < 0]
    if not free:
        return dims if known == width else None
    if len(free) > 1 or known == 0 or width % known:
        return None
    return tuple(width // known if d < 0 else d for d in dims)


def column_to_tensor(
    column: pa.ChunkedArray | pa.Array, spec: TensorSpec, model: str, name: str
) -> np.ndarray:
    """Convert an Arrow column to the ``[n, *dims]`` array ``spec`` asks for.

    Zero-copy for numeric columns without nulls that already have the tensor's type and sit
    in one chunk; otherwise one cast or concatenation.

    Raises:
        ModelError: Nulls, an impossible cast, or a width that does not match ``dims``.
    """
    arr = column
    if isinstance(column, pa.ChunkedArray):
        # combine_chunks() copies even a single chunk (pyarrow 25); take that chunk as is.
        arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    n = len(arr)
    where = f"column {name!r} -> tensor {spec.name!r}"
    if arr.null_count:
        raise ModelError(
            model, f"{where}: {arr.null_count} null value(s); tensors cannot hold nulls"
        )
    typ = arr.type
    if pa.types.is_fixed_size_list(typ):
        width, values = typ.list_size, arr.flatten()
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else 0
        if n and not np.all(lengths == width):
            raise ModelError(
                model,
                f"{where}: list lengths differ between rows ({lengths.min()}..{lengths.max()})",
            )
        values = arr.flatten()
    else:
        width, values = 1, arr
    if values.null_count:
        raise ModelError(model, f"{where}: null values inside lists; tensors cannot hold nulls")
    dims = _resolve_dims(spec.dims, width)
    if dims is None:
        raise ModelError(
            model, f"{where}: {width} value(s) per row cannot fill dims {list(spec.dims)}"
        )

    if spec.dtype == "BYTES":
        vtype = values.type
        if pa.types.is_string(vtype) or pa.types.is_large_string(vtype):
            # Cast to binary so NumPy gets bytes objects, not str (no decode + re-encode).
            values = values.cast(
                pa.large_binary() if pa.types.is_large_string(vtype) else pa.binary()
            )
        elif not (pa.types.is_binary(vtype) or pa.types.is_large_binary(vtype)):
            raise ModelError(model, f"{where}: tensor is BYTES but the column holds {vtype}")
        out = values.to_numpy(zero_copy_only=False)
    else:
        np_dtype = numpy_dtype(spec)
        target = pa.from_numpy_dtype(np_dtype)
        if values.type != target:
            try:
                values = values.cast(target, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ModelError(
                    model, f"{where}: cannot cast {values.type} to {spec.dtype}: {exc}"
                ) from exc
        out = values.to_numpy(zero_copy_only=False)
    return out.reshape((n, *dims))


def tensor_to_column(array: np.ndarray, spec: TensorSpec) -> pa.Array:
    """Convert a ``[n, *dims]`` output array to an Arrow column (see module table)."""
    width = math.prod(array.shape[1:])
    if spec.dtype == "BYTES":
        flat = pa.array(array.reshape(-1), type=pa.binary())
    else:
        flat = pa.array(np.ascontiguousarray(array).reshape(-1))
    if spec.dims == (1,):
        return flat
    return pa.FixedSizeListArray.from_arrays(flat, width)
