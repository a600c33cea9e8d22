"""Stage code of the example pipeline (``examples/reviews.yaml``). Each stage takes and
returns a ``pyarrow.Table``; all of it is deterministic, so a re-run gives the same rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

N_FEATURES = 16


def clean(table: pa.Table, *, max_chars: int = 400) -> pa.Table:
    """Lower-case, collapse whitespace, truncate; add word and character counts."""
    text = pc.utf8_lower(table["text"])
    text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"\s+", " "))
    text = pc.utf8_slice_codeunits(text, 0, max_chars)
    words = pc.list_value_length(pc.split_pattern(text, " "))
    return (
        table.set_column(table.schema.get_field_index("text"), "text", text)
        .append_column("n_chars", pc.cast(pc.utf8_length(text), pa.int64()))
        .append_column("n_words", pc.cast(words, pa.int64()))
    )


def featurize(table: pa.Table) -> pa.Table:
    """Numeric signals -> a 16-wide float32 feature vector (standardised, with interactions)."""
    cols = [table[c].to_numpy().astype(np.float64) for c in ("rating", "price", "helpful_votes", "age_days", "n_chars", "n_words")]
    rating, price, votes, age, chars, words = cols
    base = np.stack([
        (rating - 3.0) / 1.4,
        (np.log1p(price) - 3.0),
        np.log1p(votes) - 1.0,
        age / 1000.0 - 1.0,
        np.log1p(chars) / 5.0 - 1.0,
        words / 12.0 - 1.0,
        chars / np.maximum(words, 1.0) / 6.0 - 1.0,
        np.sin(age / 97.0),
    ], axis=1)
    feats = np.concatenate([base, np.tanh(base * np.roll(base, 1, axis=1))], axis=1).astype(np.float32)
    assert feats.shape[1] == N_FEATURES
    values = pa.array(feats.reshape(-1))
    return table.append_column("features", pa.FixedSizeListArray.from_arrays(values, N_FEATURES))


class Scorer:
    """Stateful stage: topic centroids are built once per actor, then every block is scored
    against them (cosine similarity of the text embedding) and labelled."""

    def __init__(self, label_names: list[str], n_topics: int = 6, seed: int = 11) -> None:
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((n_topics, 32))
        self.centroids = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        self.label_names = np.array(label_names, dtype=object)

    def __call__(self, table: pa.Table) -> pa.Table:
        emb = table["embedding"].combine_chunks()
        vectors = emb.values.to_numpy().reshape(len(emb), -1)
        sims = vectors @ self.centroids.T
        probs = table["probs"].combine_chunks()
        p = probs.values.to_numpy().reshape(len(probs), -1)
        labels = table["label"].to_numpy()
        return (
            table.append_column("topic", pa.array(sims.argmax(axis=1).astype(np.int64)))
            .append_column("topic_score", pa.array(sims.max(axis=1).astype(np.float32)))
            .append_column("confidence", pa.array(p.max(axis=1).astype(np.float32)))
            .append_column("label_name", pa.array(self.label_names[labels].tolist(), pa.string()))
        )


def finalize(table: pa.Table) -> pa.Table:
    """Keep the output columns; flag reviews the model is unsure about."""
    keep = ["id", "text", "rating", "n_words", "label", "label_name", "confidence", "topic", "topic_score"]
    out = table.select(keep)
    return out.append_column("needs_review", pc.less(out["confidence"], pa.scalar(0.5, pa.float32())))
