"""Helpers for the Triton tests: the models' own pure-NumPy ``forward`` as the reference."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

TRITON_MODELS = Path(__file__).resolve().parents[2] / "triton_models"


def _load(model: str) -> ModuleType:
    """Import ``triton_models/<model>/1/model.py`` by path (no Triton needed)."""
    path = TRITON_MODELS / model / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"_tierflow_ref_{model}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference() -> Callable[[str], ModuleType]:
    """``reference("mlp_classifier").forward(x)`` computes what the served model returns."""
    cache: dict[str, ModuleType] = {}

    def get(model: str) -> ModuleType:
        if model not in cache:
            cache[model] = _load(model)
        return cache[model]

    return get
