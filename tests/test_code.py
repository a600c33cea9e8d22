"""Manifests' own modules: one process running manifests from two directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tierflow.code import add_import_paths, code_digest, load_object


def _module_dir(root: Path, name: str, body: str) -> str:
    root.mkdir()
    (root / "steps_twice.py").write_text(body)
    (root / "json.py").write_text("raise RuntimeError('a manifest directory never replaces an installed module')\n")
    return str(root)


def test_a_second_manifest_gets_its_own_same_named_module(tmp_path: Path) -> None:
    first = _module_dir(tmp_path / "first", "steps_twice", "def step():\n    return 'first'\n")
    second = _module_dir(tmp_path / "second", "steps_twice", "def other():\n    return 'second'\n")
    try:
        add_import_paths([first])
        assert load_object("steps_twice:step")() == "first"
        digest = code_digest("steps_twice:step")

        add_import_paths([second])
        assert load_object("steps_twice:other")() == "second"
        assert code_digest("steps_twice:step") != digest  # keys follow the file that now answers
        assert sys.modules["json"] is json  # only modules an earlier manifest supplied are dropped
    finally:
        sys.modules.pop("steps_twice", None)
        for d in (first, second):
            if d in sys.path:
                sys.path.remove(d)
