"""The document example (``examples/documents.yaml``): documents -> pages -> overlapping
chunks -> all-MiniLM-L6-v2 embeddings on Triton -> Parquet.

The stage functions are checked on their own first (word coverage and overlap), then the
whole pipeline runs through the real CLI, a real local Ray and the bundled tritonserver; the
oracle is the same stage code and the model's NumPy forward pass in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml

from example_copy import ROOT, make_documents_example
from example_copy import load_module as _load




@pytest.fixture(scope="module")
def stages() -> ModuleType:
    return _load(ROOT / "examples" / "document_stages.py", "ref_document_stages")


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load(ROOT / "examples" / "make_documents.py", "ref_make_documents")


@pytest.mark.parametrize(("n", "words", "overlap"), [(0, 4, 1), (1, 4, 1), (4, 4, 1), (5, 4, 1), (10, 4, 0), (130, 64, 16)])
def test_chunk_spans_cover_every_word_with_the_overlap(stages: ModuleType, n: int, words: int, overlap: int) -> None:
    spans = stages.chunk_spans(n, words, overlap)
    covered = sorted({i for start, stop in spans for i in range(start, stop)})
    assert covered == list(range(n))
    assert all(0 < stop - start <= words for start, stop in spans)
    for (_, prev_stop), (start, _) in zip(spans, spans[1:]):
        assert prev_stop - start == overlap


def test_chunk_spans_reject_an_overlap_as_long_as_the_chunk(stages: ModuleType) -> None:
    with pytest.raises(ValueError, match="overlap < words"):
        stages.chunk_spans(10, 4, 4)


def test_pages_and_chunks_grow_rows_and_keep_the_text(stages: ModuleType, gen: ModuleType) -> None:
    docs = gen.make_documents(20, 100, np.random.default_rng(4))
    pages = stages.split_pages(docs)
    assert pages.num_rows > docs.num_rows
    by_doc = {d: t.split("\f")[:-1] for d, t in zip(docs["doc_id"].to_pylist(), docs["text"].to_pylist())}
    # Every page of every document, in order, numbered from 1; the blank one after the
    # trailing form feed is gone.
    assert [(r["doc_id"], r["page"], r["text"]) for r in pages.select(["doc_id", "page", "text"]).to_pylist()] == [
        (d, i + 1, text) for d, texts in by_doc.items() for i, text in enumerate(texts)
    ]
    assert pages["title"].to_pylist() == [t for t, d in zip(docs["title"].to_pylist(), by_doc) for _ in by_doc[d]]

    chunks = stages.chunk_pages(pages, words=20, overlap=5)
    assert chunks.num_rows > pages.num_rows
    assert len(set(chunks["chunk_id"].to_pylist())) == chunks.num_rows
    # The chunks of a page, put back together at their first_word, give the page's words.
    for page in pages.to_pylist():
        mine = [c for c in chunks.to_pylist() if (c["doc_id"], c["page"]) == (page["doc_id"], page["page"])]
        assert [c["chunk"] for c in mine] == list(range(len(mine)))
        rebuilt: list[str] = []
        for c in mine:
            words = c["text"].split()
            assert len(words) <= 20
            assert rebuilt[c["first_word"] :] == words[: len(rebuilt) - c["first_word"]]  # the overlap
            rebuilt = rebuilt[: c["first_word"]] + words
        assert rebuilt == page["text"].split()


def _tierflow(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "tierflow", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.ray
@pytest.mark.triton
def test_documents_pipeline_embeds_every_chunk_once(tmp_path: Path, stages: ModuleType) -> None:
    manifest = make_documents_example(tmp_path / "ex", docs=16, block_rows=5)
    res = _tierflow("run", "--quiet", str(manifest))
    assert res.returncode == 0, res.stdout + res.stderr

    doc = yaml.safe_load(manifest.read_text())
    docs = ds.dataset(manifest.parent / "docs_data").to_table()
    want = stages.chunk_pages(stages.split_pages(docs), **doc["stages"][1]["params"])
    out_dir = manifest.parent / "out" / "documents"
    got = ds.dataset(out_dir, format="parquet").to_table()
    success = json.loads((out_dir / "_SUCCESS").read_text())
    assert success["rows"] == sum(p["rows"] for p in success["parts"]) == got.num_rows
    assert len(success["parts"]) == 4  # 16 documents in blocks of 5

    # One to many: more rows than documents, each chunk exactly once, none lost.
    ids = got["chunk_id"].to_pylist()
    assert docs.num_rows == 16 and got.num_rows > 3 * docs.num_rows
    assert len(ids) == len(set(ids)) == want.num_rows
    assert set(ids) == set(want["chunk_id"].to_pylist())

    got = got.take(pa.array(np.argsort(ids)))
    want = want.take(pa.array(np.argsort(want["chunk_id"].to_pylist())))
    for name in ("doc_id", "title", "topic", "page", "chunk", "first_word", "text"):
        assert got[name].to_pylist() == want[name].to_pylist(), name

    # Every row's embedding is what the pretrained model gives its text in this process.
    minilm = _load(ROOT / "triton_models" / "minilm" / "1" / "model.py", "ref_minilm")
    texts = np.array([[t.encode()] for t in want["text"].to_pylist()], dtype=np.object_)
    emb = got["embedding"].combine_chunks()
    vectors = emb.values.to_numpy().reshape(len(emb), -1)
    assert vectors.shape == (want.num_rows, 384)
    np.testing.assert_allclose(vectors, minilm.forward(texts)["EMBEDDING"], atol=1e-4)
    # Chunks of one document are about one topic: closer to each other than to others'.
    topic = np.array(got["topic"].to_pylist())
    sims = vectors @ vectors.T
    same = topic[:, None] == topic[None, :]
    np.fill_diagonal(same, False)
    assert sims[same].mean() > sims[~same].mean() + 0.3  # ~0.66 vs ~0.13 on 300 documents
