"""A private copy of the example pipeline for tests (manifest, stage code, data)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "reviews.yaml"


def load_module(path: Path, name: str) -> ModuleType:
    """Import the file ``path`` as module ``name`` (an example script, a Triton model.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_example(d: Path, rows: int = 500) -> Path:
    """A copy of the example (manifest, stage code, some data) in ``d``."""
    import numpy as np
    import pyarrow.parquet as pq

    make_data = load_module(ROOT / "examples" / "make_data.py", "make_data")

    (d / "data").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "review_stages.py", d)
    pq.write_table(make_data.make_table(rows, 0, np.random.default_rng(1)), d / "data" / "a.parquet")
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["triton"]["repository"] = str(ROOT / "triton_models")
    (d / "reviews.yaml").write_text(yaml.safe_dump(doc))
    return d


def make_documents_example(d: Path, docs: int = 16, block_rows: int = 5) -> Path:
    """A copy of the document example (``examples/documents.yaml``, its stage code and
    ``docs`` generated documents) in ``d``; returns the manifest's path."""
    import numpy as np
    import pyarrow.parquet as pq

    make_documents = load_module(ROOT / "examples" / "make_documents.py", "make_documents")

    (d / "docs_data").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "document_stages.py", d)
    table = make_documents.make_documents(docs, 0, np.random.default_rng(1))
    pq.write_table(table, d / "docs_data" / "a.parquet")
    doc = yaml.safe_load((ROOT / "examples" / "documents.yaml").read_text())
    doc["source"]["block_rows"] = block_rows
    doc["triton"]["repository"] = str(ROOT / "triton_models")
    manifest = d / "documents.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    return manifest
