"""Write the document example's input: synthetic multi-page reports in English.

    python examples/make_documents.py [--docs 300] [--files 3] [--out examples/docs_data]

Each row is one document (``doc_id``, ``title``, ``topic``, ``text``); its pages are
separated by form feeds and the text ends with one, as ``pdftotext`` writes them.
Sentences come from a few templates filled with a topic's vocabulary, so documents on one
topic read alike and embed close together. Deterministic for a given seed; no downloads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# topic -> (nouns, verbs in the third person, adjectives)
TOPICS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "shipping": (
        "vessel container port harbour crane cargo freight dock pilot tide route manifest berth crew".split(),
        "loads unloads inspects delays schedules tracks reroutes secures clears anchors".split(),
        "heavy delayed coastal refrigerated bonded overnight empty crowded northern foreign".split(),
    ),
    "medicine": (
        "patient clinic nurse dose symptom treatment surgeon ward infection vaccine trial fever scan".split(),
        "treats monitors prescribes reduces examines reports prevents records admits discharges".split(),
        "chronic mild acute routine elderly sterile clinical severe early stable".split(),
    ),
    "finance": (
        "bank loan budget investor market bond rate fund audit invoice profit account share".split(),
        "approves reviews reports raises lowers funds audits borrows invests forecasts".split(),
        "quarterly annual fiscal volatile modest private public secured net overdue".split(),
    ),
    "weather": (
        "storm rain wind front cloud forecast snow heat flood drought pressure coast valley".split(),
        "brings moves reaches weakens strengthens floods cools warms clears threatens".split(),
        "cold humid tropical dry heavy strong light coastal sudden seasonal".split(),
    ),
    "software": (
        "server database release user query cache bug feature test deployment network cluster build".split(),
        "stores returns crashes updates caches deploys logs retries indexes compiles".split(),
        "slow stable nightly distributed legacy remote concurrent faulty new internal".split(),
    ),
    "cooking": (
        "oven recipe sauce bread dough onion garlic pan knife kitchen chef soup butter".split(),
        "bakes slices stirs boils roasts seasons chops melts serves tastes".split(),
        "fresh crisp warm golden spicy sweet tender thick bitter smoky".split(),
    ),
}
PREPOSITIONS = "near after before behind under beside without across during through".split()
ADVERBS = "Yesterday Meanwhile Later Again Usually Finally Suddenly Often Still Today".split()


def _sentence(rng: np.random.Generator, topic: str) -> str:
    nouns, verbs, adjs = TOPICS[topic]

    def pick(words: list[str]) -> str:
        return str(words[rng.integers(len(words))])

    n1, n2, n3 = pick(nouns), pick(nouns), pick(nouns)
    v, a, b, p = pick(verbs), pick(adjs), pick(adjs), pick(PREPOSITIONS)
    templates = (
        f"The {a} {n1} {v} the {n2} {p} the {b} {n3}.",
        f"{pick(ADVERBS)}, the {n1} {v} a {a} {n2}.",
        f"A {n1} that {v} the {n2} was {a} and {b}.",
        f"Every {a} {n1} {v} its {n2} {p} the {n3}.",
        f"Nobody expected the {n1} to be so {a} {p} the {n2}.",
        f"The report says the {b} {n1} {v} the {n2} twice a week.",
    )
    return templates[int(rng.integers(len(templates)))]


def _page(rng: np.random.Generator, topic: str) -> str:
    paragraphs = [
        " ".join(_sentence(rng, topic) for _ in range(int(rng.integers(3, 7))))
        for _ in range(int(rng.integers(2, 4)))
    ]
    return "\n\n".join(paragraphs)


def make_documents(n_docs: int, start_id: int, rng: np.random.Generator) -> pa.Table:
    """``n_docs`` documents with ids from ``start_id``: 1-4 pages of 2-3 paragraphs each."""
    names = sorted(TOPICS)
    ids, titles, topics, texts = [], [], [], []
    for doc_id in range(start_id, start_id + n_docs):
        topic = names[int(rng.integers(len(names)))]
        nouns, _, adjs = TOPICS[topic]
        pages = [_page(rng, topic) for _ in range(int(rng.integers(1, 5)))]
        ids.append(doc_id)
        titles.append(f"{adjs[int(rng.integers(len(adjs)))].title()} {nouns[int(rng.integers(len(nouns)))]} report {doc_id}")
        topics.append(topic)
        texts.append("\f".join(pages) + "\f")
    return pa.table({
        "doc_id": pa.array(ids, pa.int64()),
        "title": pa.array(titles, pa.string()),
        "topic": pa.array(topics, pa.string()),
        "text": pa.array(texts, pa.string()),
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=str(Path(__file__).parent / "docs_data"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    per_file = -(-args.docs // args.files)
    for i in range(args.files):
        start = i * per_file
        n = min(per_file, args.docs - start)
        if n <= 0:
            break
        pq.write_table(make_documents(n, start, rng), out / f"docs-{i:03d}.parquet")
    print(f"wrote {args.docs} documents in {args.files} files to {out}")


if __name__ == "__main__":
    main()
