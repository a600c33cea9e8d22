"""What one journal flush costs as a pipeline grows: a delta vs the whole journal.

    python tools/bench_journal.py [--parts 100000] [--changed 100] [--repeat 20] [--url DIR] [--json PATH]

A running journal holds ``--parts`` committed sink parts (and a few hundred intermediate
blocks). Measured side by side on the same journal, alternately, ``--repeat`` times:

* **delta**: ``--changed`` more parts, then a flush — what every periodic flush writes now
  (journal v2: a delta of the changes since the last flush);
* **whole**: the same changes, then the whole journal written at once — what every flush
  wrote before (journal v1), and about what a compaction writes now.

Prints the median time and bytes of each and their ratio (also written to ``--json PATH``). ``--url`` may name an fsspec URL
(e.g. an S3 bucket through ``memory://`` or ``s3://``) instead of a local directory.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from _harness import machine, parser, spread, write_json
from tierflow.engine.journal import Journal, delta_name
from tierflow.io.fs import filesystem, write_atomic
from tierflow.io.sink import PartMeta


def part(b: int) -> PartMeta:
    return PartMeta(f"part-{b:06d}.parquet", 1000, 180_000, f"{b:064x}")


def main() -> None:
    ap = parser(__doc__, "also write the figures here")
    ap.add_argument("--parts", type=int, default=100_000)
    ap.add_argument("--changed", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--url", default=None)
    a = ap.parse_args()
    host = machine()
    with tempfile.TemporaryDirectory() as tmp:
        url = a.url or str(Path(tmp) / "journal")
        j = Journal.load(url, interval_s=0)
        j.begin("bench", a.parts + a.changed * a.repeat * 2, {"s": "f" * 64}, "g" * 64)
        for b in range(a.parts):
            j.record_part(b, part(b))
        for b in range(500):  # blocks in flight between two stages
            j.record_block("s", b, 1000, 180_000, f"{b:064x}", ("lmdb:" + "n" * 56, "lmdb:" + "m" * 56))
        j.finish("running")  # one snapshot holding all of it
        fs, root = filesystem(url)
        nxt = a.parts
        times: dict[str, list[float]] = {"delta": [], "whole": []}
        sizes: dict[str, list[int]] = {"delta": [], "whole": []}
        for _ in range(a.repeat):
            for how in ("delta", "whole"):
                for b in range(nxt, nxt + a.changed):
                    j.record_part(b, part(b))
                nxt += a.changed
                t0 = time.perf_counter()
                if how == "delta":
                    j.flush(force=True)
                    written = fs.size(f"{root}/{delta_name(j.seq)}")
                else:  # the whole state, as every v1 flush wrote it (and renewed the lease)
                    data = json.dumps(j.document(), separators=(",", ":")).encode()
                    write_atomic(fs, f"{root}/whole.json", data)
                    j.renew_lease()
                    written = len(data)
                times[how].append(time.perf_counter() - t0)
                sizes[how].append(int(written))
        med = {k: statistics.median(v) for k, v in times.items()}
        out = {
            "parts": a.parts, "changed_per_flush": a.changed, "repeat": a.repeat,
            "delta_s": round(med["delta"], 5), "whole_s": round(med["whole"], 5),
            "delta_bytes": int(statistics.median(sizes["delta"])),
            "whole_bytes": int(statistics.median(sizes["whole"])),
            "time_ratio_whole_over_delta": round(med["whole"] / med["delta"], 1),
            "spread_s": {k: spread(v, 5) for k, v in times.items()},
        }
        print(json.dumps(out, indent=1))
        write_json(a.json, {**out, "machine": host})


if __name__ == "__main__":
    main()
