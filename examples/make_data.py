"""Write the example input: product reviews with unique ids, text and numeric signals.

    python examples/make_data.py [--rows 20000] [--files 4] [--out examples/data]

Deterministic for a given seed, so every run and every test sees the same rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = (
    "battery screen fast slow great terrible cheap pricey light heavy loud quiet sturdy flimsy "
    "bright dim warm cold sharp blurry smooth rough happy broken works returned love hate "
    "shipping box cable charger case lens strap button app update price quality"
).split()


def make_table(rows: int, start_id: int, rng: np.random.Generator) -> pa.Table:
    n_words = rng.integers(3, 25, size=rows)
    texts = [
        "  ".join(rng.choice(WORDS, size=k).tolist()).upper() if i % 7 == 0 else " ".join(rng.choice(WORDS, size=k))
        for i, k in enumerate(n_words)
    ]
    return pa.table({
        "id": pa.array(np.arange(start_id, start_id + rows, dtype=np.int64)),
        "text": pa.array(texts, pa.string()),
        "rating": pa.array(rng.integers(1, 6, size=rows).astype(np.int64)),
        "price": pa.array(np.round(rng.lognormal(3.0, 1.0, size=rows), 2)),
        "helpful_votes": pa.array(rng.poisson(2.0, size=rows).astype(np.int64)),
        "age_days": pa.array(rng.integers(0, 2000, size=rows).astype(np.int64)),
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    per_file = -(-args.rows // args.files)
    for i in range(args.files):
        start = i * per_file
        n = min(per_file, args.rows - start)
        if n <= 0:
            break
        pq.write_table(make_table(n, start, rng), out / f"reviews-{i:03d}.parquet", row_group_size=2_000)
    print(f"wrote {args.rows} rows in {args.files} files to {out}")


if __name__ == "__main__":
    main()
