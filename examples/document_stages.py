"""Stage code of the document example (``examples/documents.yaml``): documents -> pages ->
overlapping chunks, ready for a sentence embedder. Both stages return more rows than they
get; each output row carries its document's metadata and where it came from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAGE_BREAK = "\f"  # what pdftotext writes between (and after) pages


def split_pages(table: pa.Table) -> pa.Table:
    """One row per non-blank page: ``text`` becomes the page's text, ``page`` its number
    (from 1). A document's trailing form feed yields a blank last page, which is dropped."""
    pages = pc.split_pattern(table["text"].combine_chunks(), PAGE_BREAK)
    parent = pc.list_parent_indices(pages).to_numpy()
    offsets = pages.offsets.to_numpy()
    page_no = np.arange(len(parent), dtype=np.int64) - (offsets[parent] - offsets[0]) + 1
    text = pc.list_flatten(pages)
    out = (
        table.drop_columns(["text"])
        .take(pa.array(parent))
        .append_column("page", pa.array(page_no))
        .append_column("text", text)
    )
    return out.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0))


def chunk_spans(n_words: int, words: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, stop)`` word spans of ``words`` words, each sharing ``overlap`` words with
    the one before, covering ``n_words``; the last may be shorter. ``[]`` for no words.

    >>> chunk_spans(10, 4, 1)
    [(0, 4), (3, 7), (6, 10)]
    """
    if not 0 <= overlap < words:
        raise ValueError(f"need 0 <= overlap < words, got overlap={overlap}, words={words}")
    spans = []
    start = 0
    while start < n_words:
        stop = min(start + words, n_words)
        spans.append((start, stop))
        if stop == n_words:
            break
        start = stop - overlap
    return spans


def chunk_pages(table: pa.Table, *, words: int = 64, overlap: int = 16) -> pa.Table:
    """One row per chunk of a page: ``text`` becomes ``words`` whitespace-separated words
    (64 words are ~80 MiniLM tokens, well inside its 256), overlapping the previous chunk by
    ``overlap`` so a sentence cut at a boundary is whole in one of the two. Adds ``chunk``
    (from 0 within the page), ``first_word`` and ``chunk_id`` (``doc-page-chunk``)."""
    parent: list[int] = []
    chunk: list[int] = []
    first: list[int] = []
    texts: list[str] = []
    for i, page_text in enumerate(table["text"].to_pylist()):
        tokens = page_text.split()
        for j, (start, stop) in enumerate(chunk_spans(len(tokens), words, overlap)):
            parent.append(i)
            chunk.append(j)
            first.append(start)
            texts.append(" ".join(tokens[start:stop]))
    out = table.drop_columns(["text"]).take(pa.array(parent, pa.int64()))
    ids = [f"{d}-{p}-{c}" for d, p, c in zip(out["doc_id"].to_pylist(), out["page"].to_pylist(), chunk)]
    return (
        out.append_column("chunk", pa.array(chunk, pa.int64()))
        .append_column("first_word", pa.array(first, pa.int64()))
        .append_column("chunk_id", pa.array(ids, pa.string()))
        .append_column("text", pa.array(texts, pa.string()))
    )
