"""Parsing the model repository offline: specs, errors, digests. No server."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tierflow.errors import ModelError
from tierflow.triton.repository import (
    ModelSpec,
    TensorSpec,
    list_models,
    load_model_spec,
    model_digest,
)

REPO = Path(__file__).resolve().parents[2] / "triton_models"


def test_list_models() -> None:
    assert list_models(REPO) == ["minilm", "mlp_classifier", "text_embedder"]


def test_list_models_skips_hidden_and_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "README.md").write_text("x")
    assert list_models(tmp_path) == ["a", "b"]


def test_list_models_missing_repo(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_models(tmp_path / "nope")


def test_mlp_classifier_spec() -> None:
    spec = load_model_spec(REPO, "mlp_classifier")
    assert spec == ModelSpec(
        name="mlp_classifier",
        max_batch_size=256,
        inputs={"FEATURES": TensorSpec("FEATURES", "FP32", (16,))},
        outputs={
            "PROBS": TensorSpec("PROBS", "FP32", (4,)),
            "LABEL": TensorSpec("LABEL", "INT64", (1,)),
        },
        instance_count=1,
        path=REPO / "mlp_classifier",
    )
    assert list(spec.outputs) == ["PROBS", "LABEL"]  # declaration order kept


def test_text_embedder_spec_maps_string_to_bytes() -> None:
    spec = load_model_spec(REPO, "text_embedder")
    assert spec.inputs == {"TEXT": TensorSpec("TEXT", "BYTES", (1,))}
    assert spec.outputs == {"EMBEDDING": TensorSpec("EMBEDDING", "FP32", (32,))}
    assert spec.max_batch_size == 256


def test_configs_agree_with_model_code(reference: Callable[[str], ModuleType]) -> None:
    mlp = reference("mlp_classifier")
    spec = load_model_spec(REPO, "mlp_classifier")
    assert spec.inputs["FEATURES"].dims == (mlp.N_FEATURES,)
    assert spec.outputs["PROBS"].dims == (mlp.N_CLASSES,)
    emb = reference("text_embedder")
    assert load_model_spec(REPO, "text_embedder").outputs["EMBEDDING"].dims == (emb.DIM,)


def _write(tmp_path: Path, model: str, config: str) -> Path:
    (tmp_path / model).mkdir(parents=True)
    (tmp_path / model / "config.pbtxt").write_text(config)
    return tmp_path


def test_absent_model_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model directory") as info:
        load_model_spec(tmp_path, "ghost")
    assert info.value.model == "ghost"


def test_absent_config_names_it(tmp_path: Path) -> None:
    (tmp_path / "bare").mkdir()
    with pytest.raises(ModelError, match="no config.pbtxt") as info:
        load_model_spec(tmp_path, "bare")
    assert info.value.model == "bare"


def test_unparseable_config(tmp_path: Path) -> None:
    _write(tmp_path, "bad", 'backend: "python"\nmax_batch_size: "lots"\n')
    with pytest.raises(ModelError, match="cannot parse") as info:
        load_model_spec(tmp_path, "bad")
    assert info.value.model == "bad"
    assert "max_batch_size" in info.value.reason


def test_unknown_field_is_rejected(tmp_path: Path) -> None:
    _write(tmp_path, "bad", 'backend: "python"\nmax_batch_sise: 8\n')
    with pytest.raises(ModelError, match="max_batch_sise"):
        load_model_spec(tmp_path, "bad")


def test_name_defaults_to_directory_and_must_match(tmp_path: Path) -> None:
    config = (
        'backend: "python"\nmax_batch_size: 8\n'
        'input [{ name: "X" data_type: TYPE_UINT8 dims: [ -1, 3 ] }]\n'
        "instance_group [{ kind: KIND_CPU, count: 2 }, { kind: KIND_CPU, count: 3 }]\n"
    )
    _write(tmp_path, "anon", config)
    spec = load_model_spec(tmp_path, "anon")
    assert spec.name == "anon"
    assert spec.inputs["X"] == TensorSpec("X", "UINT8", (-1, 3))
    assert spec.instance_count == 5
    _write(tmp_path, "other", 'name: "elsewhere"\nbackend: "python"\n')
    with pytest.raises(ModelError, match="names model 'elsewhere'"):
        load_model_spec(tmp_path, "other")


def test_no_instance_group_means_one(tmp_path: Path) -> None:
    _write(tmp_path, "m", 'backend: "python"\nmax_batch_size: 0\n')
    assert load_model_spec(tmp_path, "m").instance_count == 1


def test_digest_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo)
    first = model_digest(repo, "mlp_classifier")
    assert first.startswith("sha256:")
    assert model_digest(repo, "mlp_classifier") == first
    assert model_digest(REPO, "mlp_classifier") == first  # location does not matter
    assert model_digest(repo, "text_embedder") != first

    # Byte code and editor droppings (written by merely serving the model) do not count.
    cache = repo / "mlp_classifier" / "1" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "model.cpython-311.pyc").write_bytes(b"\x00junk")
    (repo / "mlp_classifier" / "1" / "model.py~").write_text("backup")
    assert model_digest(repo, "mlp_classifier") == first

    model_py = repo / "mlp_classifier" / "1" / "model.py"
    model_py.write_text(model_py.read_text().replace("SEED = 20240611", "SEED = 1"))
    assert model_digest(repo, "mlp_classifier") != first


def test_digest_sees_new_files_and_renames(tmp_path: Path) -> None:
    _write(tmp_path, "m", 'backend: "python"\n')
    before = model_digest(tmp_path, "m")
    (tmp_path / "m" / "1").mkdir()
    (tmp_path / "m" / "1" / "a.bin").write_bytes(b"x")
    with_a = model_digest(tmp_path, "m")
    assert with_a != before
    (tmp_path / "m" / "1" / "a.bin").rename(tmp_path / "m" / "1" / "b.bin")
    assert model_digest(tmp_path, "m") != with_a


def test_digest_absent_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        model_digest(tmp_path, "ghost")
    assert info.value.model == "ghost"
