"""Everything about a manifest that can be checked without running it.

``check_manifest`` imports stage code, reads the Triton model repository and the source's
schema, and follows columns from the source through every stage. It starts no Ray and no
Triton. All problems are collected and raised together as one ManifestError, each with
its field path, so one ``tierflow validate`` shows them all.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pyarrow as pa

from tierflow.code import add_import_paths, load_object
from tierflow.errors import ManifestError, ModelError, StoreError
from tierflow.io.source import Source
from tierflow.manifest import Manifest, PythonStage, TritonStage
from tierflow.triton.repository import TensorSpec, load_model_spec

_TRITON_TO_ARROW = {
    "FP16": pa.float16(), "FP32": pa.float32(), "FP64": pa.float64(), "BOOL": pa.bool_(),
    "INT8": pa.int8(), "INT16": pa.int16(), "INT32": pa.int32(), "INT64": pa.int64(),
    "UINT8": pa.uint8(), "UINT16": pa.uint16(), "UINT32": pa.uint32(), "UINT64": pa.uint64(),
}
_BYTES_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())

Columns = dict[str, pa.DataType | None]  # None: the column exists, its type is not declared


def parse_type(text: str) -> pa.DataType:
    """``float32``, ``int64``, ``string`` ... or ``float32[16]`` (a fixed-size list).

    >>> parse_type("float32[16]")
    FixedSizeListType(fixed_size_list<item: float>[16])
    """
    text = text.strip()
    if text.endswith("]") and "[" in text:
        base, _, size = text[:-1].partition("[")
        return pa.list_(pa.type_for_alias(base.strip()), int(size))
    return pa.type_for_alias(text)


def tensor_column_type(spec: TensorSpec) -> pa.DataType:
    """The Arrow type a tensor maps to per row (what the Triton client reads and writes)."""
    if spec.dtype == "BYTES":
        return pa.binary()
    value = _TRITON_TO_ARROW[spec.dtype]
    n = 1
    for d in spec.dims:
        n *= d
    return value if n == 1 else pa.list_(value, n)


def _fits(column: pa.DataType, spec: TensorSpec) -> bool:
    if spec.dtype == "BYTES":
        return column in _BYTES_TYPES
    want = tensor_column_type(spec)
    if any(d < 0 for d in spec.dims):  # variable-length rows: any list of the value type
        return (pa.types.is_list(column) or pa.types.is_fixed_size_list(column)) and (
            column.value_type == _TRITON_TO_ARROW[spec.dtype]
        )
    return bool(column == want)


def check_manifest(manifest: Manifest, path: str) -> None:
    """Raise ManifestError listing every problem found; return quietly when there is none."""
    problems: list[tuple[str, str]] = []
    add_import_paths([manifest.base_dir])
    columns = _source_columns(manifest, problems)
    has_triton = any(isinstance(s, TritonStage) for s in manifest.stages)
    if has_triton and not (manifest.triton.url or manifest.triton.launch or manifest.triton.deploy):
        problems.append(("triton", "the pipeline has Triton stages: set triton.url, triton.launch: true or triton.deploy"))
    repo = Path(manifest.resolve(manifest.triton.repository))
    if (manifest.triton.launch or manifest.triton.deploy) and not repo.is_dir():
        problems.append(("triton.repository", f"model repository {repo} does not exist"))

    for i, stage in enumerate(manifest.stages):
        where = f"stages[{i}]"
        if isinstance(stage, PythonStage):
            _check_python(stage, where, columns, problems)
        else:
            _check_triton(stage, where, repo if repo.is_dir() else None, columns, problems)
    if problems:
        raise ManifestError(path, problems)


def _source_columns(manifest: Manifest, problems: list[tuple[str, str]]) -> Columns | None:
    source = Source(manifest.source, manifest.resolve(manifest.source.path))
    try:
        files = source.files()
        schema = source.read_schema(files[0])
    except (StoreError, OSError, KeyError, ValueError, pa.ArrowException) as exc:
        problems.append(("source.path", getattr(exc, "reason", None) or str(exc)))
        return None
    columns: Columns = {f.name: f.type for f in schema}
    for name in manifest.source.columns or ():
        if name not in columns:
            problems.append(("source.columns", f"column {name!r} is not in {files[0].path}"))
    if manifest.source.columns:
        columns = {c: columns.get(c) for c in manifest.source.columns}
    return columns


def _check_python(stage: PythonStage, where: str, columns: Columns | None, problems: list[tuple[str, str]]) -> None:
    field = "fn" if stage.fn else "cls"
    try:
        obj = load_object(stage.target)
    except Exception as exc:  # noqa: BLE001 - any import-time failure makes the stage unusable
        problems.append((f"{where}.{field}", f"cannot import {stage.target!r}: {type(exc).__name__}: {exc}"))
        obj = None
    if obj is not None:
        if stage.cls and not inspect.isclass(obj):
            problems.append((f"{where}.cls", f"{stage.target!r} is not a class"))
        elif stage.fn and not callable(obj):
            problems.append((f"{where}.fn", f"{stage.target!r} is not callable"))
    if columns is None:
        return
    for col in stage.requires:
        if col not in columns:
            problems.append((f"{where}.requires", f"column {col!r} is produced by no earlier stage"))
    for col, type_text in stage.produces.items():
        try:
            columns[col] = parse_type(type_text)
        except (ValueError, KeyError):
            problems.append((f"{where}.produces.{col}", f"unknown type {type_text!r}"))
            columns[col] = None
    for col in stage.drops:
        columns.pop(col, None)


def _check_triton(
    stage: TritonStage, where: str, repo: Path | None, columns: Columns | None, problems: list[tuple[str, str]]
) -> None:
    spec = None
    if repo is not None:
        try:
            spec = load_model_spec(repo, stage.model)
        except ModelError as exc:
            problems.append((f"{where}.model", exc.reason))
    if spec is not None:
        for col, tensor in stage.inputs.items():
            if tensor not in spec.inputs:
                problems.append((f"{where}.inputs.{col}", f"model {stage.model!r} has no input {tensor!r} "
                                 f"(inputs: {sorted(spec.inputs)})"))
        missing = set(spec.inputs) - set(stage.inputs.values())
        if missing:
            problems.append((f"{where}.inputs", f"model inputs not fed by any column: {sorted(missing)}"))
        for tensor in stage.outputs:
            if tensor not in spec.outputs:
                problems.append((f"{where}.outputs.{tensor}", f"model {stage.model!r} has no output "
                                 f"{tensor!r} (outputs: {sorted(spec.outputs)})"))
    if columns is None:
        return
    for col, tensor in stage.inputs.items():
        if col not in columns:
            problems.append((f"{where}.inputs.{col}", f"column {col!r} is produced by no earlier stage"))
            continue
        ctype = columns[col]
        if spec is not None and tensor in spec.inputs and ctype is not None and not _fits(ctype, spec.inputs[tensor]):
            t = spec.inputs[tensor]
            problems.append((f"{where}.inputs.{col}", f"column type {ctype} does not fit tensor {tensor} "
                             f"({t.dtype} {list(t.dims)}; expected {tensor_column_type(t)})"))
    for tensor, col in stage.outputs.items():
        out = spec.outputs.get(tensor) if spec is not None else None
        columns[col] = tensor_column_type(out) if out is not None else None
