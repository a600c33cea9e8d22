"""Read a standard Triton model repository (``<repo>/<model>/config.pbtxt``) without a server.

``config.pbtxt`` is parsed by protobuf's ``text_format`` into tritonclient's own
``ModelConfig`` message, the same schema the server uses, so anything Triton accepts parses
here too. The client reuses :func:`spec_from_config` on the config the *server* reports
(``get_model_config``), so both sides describe tensors the same way.

Usage::

    spec = load_model_spec(Path("triton_models"), "mlp_classifier")
    spec.inputs["FEATURES"]        # TensorSpec(name='FEATURES', dtype='FP32', dims=(16,))
    model_digest(Path("triton_models"), "mlp_classifier")   # 'sha256:…', for fingerprints
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tierflow.errors import ModelError

__all__ = [
    "ModelSpec",
    "TensorSpec",
    "list_models",
    "load_model_spec",
    "model_digest",
    "spec_from_config",
]

CONFIG_NAME = "config.pbtxt"

# Files the Python backend or an editor drops into a model directory; they must not change
# the digest, or merely serving a model once would invalidate every cached block.
_DIGEST_SKIP_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints"})
_DIGEST_SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output tensor of a model.

    Attributes:
        name: Tensor name as the model declares it.
        dtype: Triton wire dtype: ``"FP32"``, ``"INT64"``, ``"BYTES"`` (config ``TYPE_STRING``), …
        dims: Shape per row, without the batch dimension; ``-1`` is a variable dimension.
    """

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What tierflow needs to know about one model.

    Attributes:
        name: Model name.
        max_batch_size: Largest batch one request may carry; 0 means the model does not batch.
        inputs: Input tensors by name, in declaration order.
        outputs: Output tensors by name, in declaration order.
        instance_count: Total model instances over all instance groups.
        path: The model directory, or ``None`` for a spec built from a server's config.
    """

    name: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    instance_count: int
    path: Path | None = None


def wire_dtype(data_type: int) -> str:
    """Triton wire dtype (``"FP32"``, ``"BYTES"``) of a config ``DataType`` enum value."""
    name = mc.DataType.Name(data_type)  # "TYPE_FP32"
    short = name.removeprefix("TYPE_")
    return "BYTES" if short == "STRING" else short


def spec_from_config(config: mc.ModelConfig, path: Path | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed (or server-reported) ``ModelConfig``."""
    inputs = {
        t.name: TensorSpec(t.name, wire_dtype(t.data_type), tuple(int(d) for d in t.dims))
        for t in config.input
    }
    outputs = {
        t.name: TensorSpec(t.name, wire_dtype(t.data_type), tuple(int(d) for d in t.dims))
        for t in config.output
    }
    # An absent instance_group means one instance (Triton's default for CPU and for one GPU).
    count = sum(max(int(g.count), 1) for g in config.instance_group) or 1
    return ModelSpec(
        name=config.name,
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        instance_count=count,
        path=path,
    )


def list_models(repo: Path) -> list[str]:
    """Names of the models in a repository, sorted.

    Triton treats every sub-directory of the repository as a model, so this does too
    (hidden and dunder directories excepted); a directory without a usable config then
    fails in :func:`load_model_spec` or at load time, where the reason can be reported.

    Raises:
        FileNotFoundError: ``repo`` is not a directory.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise FileNotFoundError(f"Triton model repository {repo} is not a directory")
    return sorted(
        p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))
    )


def load_model_spec(repo: Path, model: str) -> ModelSpec:
    """Parse ``<repo>/<model>/config.pbtxt``.

    Raises:
        ModelError: The model directory or its config is missing, the config does not parse,
            or it names a different model.
    """
    model_dir = Path(repo) / model
    config_path = model_dir / CONFIG_NAME
    if not model_dir.is_dir():
        raise ModelError(model, f"no model directory {model_dir}")
    if not config_path.is_file():
        raise ModelError(model, f"no {CONFIG_NAME} in {model_dir}")
    config = mc.ModelConfig()
    try:
        text_format.Parse(config_path.read_text(encoding="utf-8"), config)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ModelError(model, f"cannot parse {config_path}: {exc}") from exc
    # Triton fills an absent name from the directory and rejects a different one.
    if not config.name:
        config.name = model
    elif config.name != model:
        raise ModelError(
            model, f"{config_path} names model {config.name!r}, but its directory is {model!r}"
        )
    return spec_from_config(config, path=model_dir)


def model_digest(repo: Path, model: str) -> str:
    """A stable content hash of a model directory, for cache fingerprints.

    Hashes every file's relative path and bytes, in sorted order, skipping byte-code caches
    and editor droppings. Returns ``"sha256:<hex>"``.

    Raises:
        ModelError: The model directory does not exist.
    """
    model_dir = Path(repo) / model
    if not model_dir.is_dir():
        raise ModelError(model, f"no model directory {model_dir}")
    h = hashlib.sha256()
    files = sorted(
        p
        for p in model_dir.rglob("*")
        if p.is_file()
        and not _DIGEST_SKIP_DIRS.intersection(p.relative_to(model_dir).parts)
        and not p.name.endswith(_DIGEST_SKIP_SUFFIXES)
    )
    for path in files:
        rel = path.relative_to(model_dir).as_posix().encode("utf-8")
        data = path.read_bytes()
        # Length-prefix both fields so ("ab", "c") and ("a", "bc") cannot collide.
        h.update(len(rel).to_bytes(8, "little") + rel)
        h.update(len(data).to_bytes(8, "little") + data)
    return f"sha256:{h.hexdigest()}"
