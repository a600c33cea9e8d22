"""Cache tier throughput and latency next to each tier's ceiling, measured in the same run
on the same bytes.

(Users measure their own cache with ``tierflow bench cache``, ``tierflow/cache/bench.py``:
each tier alone, on the configured directory and store. This script shares its sizes and
figures and adds what only a developer needs: the ceilings, the codec, ratios.)

Command behind ``docs/cache-benchmarks.md``::

    /tmp/venv/bin/python tools/bench_cache.py --json /tmp/bench-cache.json

Options: ``--sizes 64K,1M,4M,16M,64M`` (block sizes), ``--dir DIR`` (scratch directory on
the disk under test; default a temporary directory under /tmp), ``--no-ray`` (skip the
Ray ceiling), ``--s3`` (also measure the remote tier against a local moto S3 server),
``--s3-endpoint URL`` (against a running S3 server instead, e.g. SeaweedFS, see
``storage/README.md``; keys from ``TF_BENCH_S3_KEY``/``TF_BENCH_S3_SECRET``),
``--quick`` (a quarter of the iterations, for a smoke run), ``--repeat N`` (passes over
every size, default 3; the table and ratios are medians over the passes, with their range).

What is measured, per block size (the payload is the Arrow IPC stream of a mixed
int64/float64/string table of that size; "tier" operations store the same payload inside
a 40-byte header with its XXH3-128 checksum, as the cache does):

==================  ====================================  ==================================
tier operation      what the tier does                    ceiling (same bytes, same store)
==================  ====================================  ==================================
lmdb put            frame + ``LmdbTier.put`` (1 txn)      raw ``txn.put`` of the payload, 1
                                                          txn per value, same env flags
lmdb get            ``LmdbTier.get``: copy + verify       raw ``txn.get(buffers=True)`` +
                                                          copy out
remote put          frame + ``RemoteTier.put``            raw fsspec ``pipe_file``
                    (file://, temp+rename, no fsync)
remote put fsync    same with ``fsync`` (the default)     disk: file write + ``fsync``
remote get          ``RemoteTier.get``: read + verify     raw fsspec ``cat_file``
memory put          frame + ``MemoryTier.put``            ``ray.put`` (numpy view)
memory get          ``MemoryTier.get`` + Arrow decode     ``ray.get`` (zero-copy numpy)
==================  ====================================  ==================================

Each pair is measured alternately, one ceiling operation then one tier operation, after a
warm-up, so drifts of the machine (above all the disk's write-back state) hit both. Throughput is bytes / median latency;
p50/p90/p99/max latencies are reported. Averages are left out: one fsync stall or page
fault burst would move them without saying anything about the typical operation.
Reads cycle over enough distinct blocks (up to 128 MiB) that they do not all sit in the
CPU cache; they are served from the page cache (never from the device).

Verified reads cannot beat "copy + hash": the ``... vs bound`` rows compare each verified
read with the raw read followed by an XXH3-128 of the same bytes, which shows how much of
the gap to the raw read is the checksum itself and how much is tierflow's own overhead.

``--json PATH`` writes every figure plus ``ratios`` (tier / ceiling throughput at 4 MiB):
``lmdb_get_vs_raw``, ``lmdb_put_vs_raw``, ``remote_get_vs_raw``, ``remote_put_vs_raw``,
``remote_put_fsync_vs_disk``, ``memory_get_vs_ray``, ``memory_put_vs_ray``,
``lmdb_get_vs_raw_plus_xxh3``, ``remote_get_vs_raw_plus_xxh3`` (and ``s3_*`` with ``--s3``).

This is a script, not a test: it is never collected by pytest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lmdb
import numpy as np
import pyarrow as pa
import xxhash

from _harness import machine, parser, write_json
from tierflow.cache import codec
from tierflow.cache.bench import Figure, figure, human, parse_size
from tierflow.cache.tiers.lmdb import LmdbTier
from tierflow.cache.tiers.memory import MemoryTier
from tierflow.cache.tiers.remote import RemoteTier

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = [64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]
RATIO_SIZE = 4 * MiB


def iterations(size: int, quick: bool) -> int:
    """Operations per measurement: about 320 MiB of traffic, between 10 and 1000 ops."""
    n = max(10, min(1000, (320 * MiB) // size))
    return max(3, n // 4) if quick else n


def working_set(size: int) -> int:
    """Distinct blocks read in turn: ~128 MiB worth, between 2 and 64."""
    return max(2, min(64, math.ceil(128 * MiB / size)))


def make_payload(size: int, seed: int = 0) -> bytes:
    """An Arrow IPC stream of ``size`` bytes within 0.5 % (int64, float64, string columns)."""
    rows = max(1, size // 25)
    for _ in range(3):
        payload = _ipc_stream(rows, seed)
        if abs(len(payload) - size) <= size // 200:
            break
        rows = max(1, int(rows * size / len(payload)))
    return payload


def _ipc_stream(rows: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i:04d}" for i in range(1000)])
    table = pa.table(
        {
            "id": np.arange(rows, dtype=np.int64),
            "value": rng.random(rows),
            "label": pa.array(words[rng.integers(0, 1000, rows)]),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def measure_pair(
    size: int,
    n: int,
    ceiling: tuple[str, Callable[[int], Any]],
    tier: tuple[str, Callable[[int], Any]],
    warmup: int = 2,
) -> tuple[Figure, Figure]:
    """Run ceiling and tier operations alternately, one each in turn, after a warm-up.

    Alternating single operations (rather than a block of one then a block of the other)
    matters most for writes: the disk's write-back state (dirty pages, device cache)
    drifts within seconds, and both sides then see the same drift.
    """
    (c_name, c_fn), (t_name, t_fn) = ceiling, tier
    for i in range(warmup):
        c_fn(i)
        t_fn(i)
    c_samples: list[float] = []
    t_samples: list[float] = []
    for i in range(warmup, warmup + n):
        start = time.perf_counter()
        c_fn(i)
        middle = time.perf_counter()
        t_fn(i)
        end = time.perf_counter()
        c_samples.append(middle - start)
        t_samples.append(end - middle)
    return figure("ceiling", c_name, size, c_samples), figure("tier", t_name, size, t_samples)


class Bench:
    """Runs every pair at every size and collects figures."""

    def __init__(self, root: str, quick: bool, use_ray: bool, use_s3: bool, s3_endpoint: str | None = None) -> None:
        self.root = root
        self.quick = quick
        self.use_ray = use_ray
        self.use_s3 = use_s3 or bool(s3_endpoint)
        self.s3_endpoint = s3_endpoint
        self.pairs: list[dict[str, Any]] = []
        self.repeat = 0

    def record(self, group: str, ceiling: Figure, tier: Figure) -> None:
        ratio = tier.mb_s / ceiling.mb_s
        self.pairs.append(
            {"group": group, "repeat": self.repeat, "ceiling": asdict(ceiling), "tier": asdict(tier), "ratio": ratio}
        )
        print(
            f"{human(tier.block_size):>7}  {group:<17} tier {tier.mb_s:9.0f} MB/s "
            f"(p50 {tier.p50_ms:8.3f} p99 {tier.p99_ms:8.3f} ms)  "
            f"ceiling {ceiling.op:<22} {ceiling.mb_s:9.0f} MB/s "
            f"(p50 {ceiling.p50_ms:8.3f} p99 {ceiling.p99_ms:8.3f} ms)  ratio {ratio:5.2f}",
            flush=True,
        )

    def run_size(self, size: int) -> None:
        payload = make_payload(size)
        frame = codec.frame(payload)
        n = iterations(size, self.quick)
        k = working_set(size)
        scratch = tempfile.mkdtemp(prefix=f"bench-{size}-", dir=self.root)
        try:
            self._disk(size, payload, n, scratch)
            self._lmdb(size, payload, frame, n, k, scratch)
            self._remote("remote", f"file://{scratch}/store", {}, size, payload, frame, n, k, scratch)
            if self.use_s3:
                self._s3(size, payload, frame, n, k)
            self._memory(size, payload, frame, n, k)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _disk(self, size: int, payload: bytes, n: int, scratch: str) -> None:
        path = os.path.join(scratch, "disk.bin")

        def write(i: int) -> None:
            with open(path, "wb", buffering=0) as f:
                f.write(payload)
                os.fsync(f.fileno())

        def read(i: int) -> bytes:
            with open(path, "rb", buffering=0) as f:
                return f.read()

        write(0)
        w, r = measure_pair(size, n, ("disk write+fsync", write), ("disk cached read", read))
        self.pairs.append({"group": "disk", "repeat": self.repeat, "write": asdict(w), "read": asdict(r)})
        print(f"{human(size):>7}  disk              write+fsync {w.mb_s:9.0f} MB/s   cached read {r.mb_s:9.0f} MB/s", flush=True)

    def _lmdb(self, size: int, payload: bytes, frame: bytes, n: int, k: int, scratch: str) -> None:
        map_size = 1 << 36
        env = lmdb.open(
            os.path.join(scratch, "raw-lmdb"), map_size=map_size, subdir=True, max_dbs=8,
            max_readers=1024, sync=True, metasync=False, readahead=True, meminit=True,
        )
        db = env.open_db(b"blocks")
        tier = LmdbTier(os.path.join(scratch, "tier-lmdb"), capacity_bytes=map_size // 2, map_size=map_size)

        def raw_put(i: int) -> None:
            with env.begin(write=True, db=db) as txn:
                txn.put(b"bench/p/s/%06d" % i, payload)

        def tier_put(i: int) -> None:
            tier.put("bench/p/s/%06d" % i, codec.frame(payload))

        self.record("lmdb put", *measure_pair(size, n, ("raw lmdb put", raw_put), ("LmdbTier.put", tier_put)))

        def raw_get(i: int) -> bytes:
            with env.begin(db=db, buffers=True) as txn:
                return bytes(txn.get(b"bench/p/s/%06d" % (i % k)))

        def tier_get(i: int) -> bytes | None:
            return tier.get("bench/p/s/%06d" % (i % k))

        self.record("lmdb get", *measure_pair(size, n, ("raw lmdb get", raw_get), ("LmdbTier.get", tier_get)))

        def raw_get_hash(i: int) -> bytes:
            data = raw_get(i)
            xxhash.xxh3_128_digest(data)
            return data

        self.record(
            "lmdb get vs bound",
            *measure_pair(size, n, ("raw lmdb get + xxh3", raw_get_hash), ("LmdbTier.get", tier_get)),
        )

        def tier_get_table(i: int) -> pa.Table:
            data = tier.get("bench/p/s/%06d" % (i % k))
            assert data is not None
            return codec.decode_table_unchecked(data, "k")

        self.record(
            "lmdb get_table", *measure_pair(size, n, ("raw lmdb get", raw_get), ("LmdbTier.get+decode", tier_get_table))
        )
        tier.close()
        env.close()

    def _remote(
        self, label: str, url: str, options: dict[str, str], size: int, payload: bytes, frame: bytes,
        n: int, k: int, scratch: str,
    ) -> None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url.replace("/store", "/raw"), **_resolved(options))
        fs.makedirs(f"{root}/bench/p/s", exist_ok=True)
        tier = RemoteTier(url, options, fsync=False)
        tier_fsync = RemoteTier(url.replace("/store", "/store-fsync"), options, fsync=True)

        def raw_put(i: int) -> None:
            fs.pipe_file(f"{root}/bench/p/s/{i:06d}", payload)

        def tier_put(i: int) -> None:
            tier.put(f"bench/p/s/{i:06d}", codec.frame(payload))

        self.record(f"{label} put", *measure_pair(size, n, ("raw fsspec pipe", raw_put), ("RemoteTier.put", tier_put)))

        if url.startswith("file://"):
            disk = os.path.join(scratch, "disk-fsync")
            os.makedirs(disk, exist_ok=True)

            def disk_write(i: int) -> None:
                with open(os.path.join(disk, f"{i:06d}"), "wb", buffering=0) as f:
                    f.write(payload)
                    os.fsync(f.fileno())

            def tier_put_fsync(i: int) -> None:
                tier_fsync.put(f"bench/p/s/{i:06d}", codec.frame(payload))

            self.record(
                f"{label} put fsync",
                *measure_pair(size, max(3, n // 2), ("disk write+fsync", disk_write), ("RemoteTier.put fsync", tier_put_fsync)),
            )

        def raw_get(i: int) -> bytes:
            return fs.cat_file(f"{root}/bench/p/s/{i % k:06d}")

        def tier_get(i: int) -> bytes | None:
            return tier.get(f"bench/p/s/{i % k:06d}")

        self.record(f"{label} get", *measure_pair(size, n, ("raw fsspec cat", raw_get), ("RemoteTier.get", tier_get)))

        def raw_get_hash(i: int) -> bytes:
            data = raw_get(i)
            xxhash.xxh3_128_digest(data)
            return data

        self.record(
            f"{label} get vs bound",
            *measure_pair(size, n, ("raw fsspec cat + xxh3", raw_get_hash), ("RemoteTier.get", tier_get)),
        )
        tier.close()
        tier_fsync.close()

    def _s3(self, size: int, payload: bytes, frame: bytes, n: int, k: int) -> None:
        import s3fs

        if not hasattr(self, "_s3_endpoint"):
            os.environ.setdefault("TF_BENCH_S3_KEY", "bench")
            os.environ.setdefault("TF_BENCH_S3_SECRET", "bench-secret")
            if self.s3_endpoint:
                self._s3_endpoint, self._s3_label = self.s3_endpoint, "s3"
            else:
                import logging

                from moto.server import ThreadedMotoServer

                logging.getLogger("werkzeug").setLevel(logging.ERROR)
                self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
                self._moto.start()
                host, port = self._moto.get_host_and_port()
                self._s3_endpoint, self._s3_label = f"http://{host}:{port}", "s3 (moto)"
            fs = s3fs.S3FileSystem(
                key=os.environ["TF_BENCH_S3_KEY"], secret=os.environ["TF_BENCH_S3_SECRET"],
                endpoint_url=self._s3_endpoint, skip_instance_cache=True,
            )
            if not fs.exists("bench"):
                fs.mkdir("bench")
        options = {"key": "${TF_BENCH_S3_KEY}", "secret": "${TF_BENCH_S3_SECRET}", "endpoint_url": self._s3_endpoint}
        n = max(3, min(n, 40))
        prefix = f"s3://bench/{os.getpid()}-{self.repeat}-{size}"
        self._remote(self._s3_label, f"{prefix}/store", options, size, payload, frame, n, k, "")

    def _memory(self, size: int, payload: bytes, frame: bytes, n: int, k: int) -> None:
        tier = MemoryTier(capacity_bytes=max(2 * k * len(frame), 1 << 30))
        for i in range(k):
            tier.put(f"bench/p/s/{i:06d}", frame)
        if not self.use_ray:
            return
        import ray

        array = np.frombuffer(payload, dtype=np.uint8)
        refs = [ray.put(array) for _ in range(k)]

        def ray_put(i: int) -> None:
            ref = ray.put(array)
            del ref

        def tier_put(i: int) -> None:
            tier.put(f"bench/p/w/{i % k:06d}", codec.frame(payload))

        self.record("memory put", *measure_pair(size, n, ("ray.put", ray_put), ("MemoryTier.put", tier_put)))

        def ray_get(i: int) -> np.ndarray:
            return ray.get(refs[i % k])

        def tier_get(i: int) -> pa.Table:
            data = tier.get(f"bench/p/s/{i % k:06d}")
            assert data is not None
            return codec.decode_table_unchecked(data, "k")

        self.record("memory get", *measure_pair(size, n, ("ray.get", ray_get), ("MemoryTier.get+decode", tier_get)))
        refs.clear()  # free the object store copies
        tier.close()

    def codec_figures(self, size: int) -> None:
        table = pa.ipc.open_stream(make_payload(size)).read_all()
        frame = codec.encode_table(table)
        n = iterations(size, self.quick)

        def encode(i: int) -> bytes:
            return codec.encode_table(table)

        def decode(i: int) -> pa.Table:
            return codec.decode_table(frame, "k")

        e, d = measure_pair(len(frame), n, ("encode_table", encode), ("decode_table (verified)", decode))
        self.pairs.append({"group": "codec", "repeat": self.repeat, "encode": asdict(e), "decode": asdict(d)})
        print(f"{human(size):>7}  codec             encode {e.mb_s:9.0f} MB/s   decode+verify {d.mb_s:9.0f} MB/s", flush=True)


def _resolved(options: dict[str, str]) -> dict[str, str]:
    from tierflow.credentials import resolve_storage_options

    return resolve_storage_options(options)


RATIO_NAMES = {
    "lmdb get": "lmdb_get_vs_raw",
    "lmdb put": "lmdb_put_vs_raw",
    "remote get": "remote_get_vs_raw",
    "remote put": "remote_put_vs_raw",
    "remote put fsync": "remote_put_fsync_vs_disk",
    "lmdb get vs bound": "lmdb_get_vs_raw_plus_xxh3",
    "remote get vs bound": "remote_get_vs_raw_plus_xxh3",
    "memory get": "memory_get_vs_ray",
    "memory put": "memory_put_vs_ray",
    "s3 (moto) get": "s3_get_vs_raw",
    "s3 (moto) put": "s3_put_vs_raw",
    "s3 get": "s3_get_vs_raw",
    "s3 put": "s3_put_vs_raw",
}


def summary(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over repeats of every (group, size): MB/s, p50/p99 and ratio."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for pair in pairs:
        if "ratio" in pair:
            grouped.setdefault((pair["group"], pair["tier"]["block_size"]), []).append(pair)
    rows = []
    for (group, size), runs in grouped.items():
        med = statistics.median
        rows.append(
            {
                "group": group,
                "size": size,
                "repeats": len(runs),
                "tier_op": runs[0]["tier"]["op"],
                "ceiling_op": runs[0]["ceiling"]["op"],
                "tier_mb_s": med(r["tier"]["mb_s"] for r in runs),
                "tier_p50_ms": med(r["tier"]["p50_ms"] for r in runs),
                "tier_p99_ms": med(r["tier"]["p99_ms"] for r in runs),
                "ceiling_mb_s": med(r["ceiling"]["mb_s"] for r in runs),
                "ceiling_p50_ms": med(r["ceiling"]["p50_ms"] for r in runs),
                "ceiling_p99_ms": med(r["ceiling"]["p99_ms"] for r in runs),
                "ratio": med(r["ratio"] for r in runs),
                "ratio_min": min(r["ratio"] for r in runs),
                "ratio_max": max(r["ratio"] for r in runs),
            }
        )
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The named ratios at ``RATIO_SIZE`` (medians over repeats)."""
    return {
        RATIO_NAMES[r["group"]]: round(r["ratio"], 3)
        for r in rows
        if r["group"] in RATIO_NAMES and r["size"] == RATIO_SIZE
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table as Markdown (what docs/cache-benchmarks.md shows)."""
    lines = [
        "| block | tier operation | MB/s | p50 / p99 ms | ceiling | MB/s | p50 / p99 ms | ratio (min-max) |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    order = list(RATIO_NAMES) + ["lmdb get_table"]
    for r in sorted(rows, key=lambda r: (r["size"], order.index(r["group"]) if r["group"] in order else 99)):
        lines.append(
            f"| {human(r['size'])} | {r['tier_op']} | {r['tier_mb_s']:,.0f} | "
            f"{r['tier_p50_ms']:.3f} / {r['tier_p99_ms']:.3f} | {r['ceiling_op']} | "
            f"{r['ceiling_mb_s']:,.0f} | {r['ceiling_p50_ms']:.3f} / {r['ceiling_p99_ms']:.3f} | "
            f"**{r['ratio']:.2f}** ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "write figures and ratios here")
    ap.add_argument("--sizes", default=",".join(human(s).replace(" ", "").replace("iB", "") for s in DEFAULT_SIZES))
    ap.add_argument("--dir", default=None, help="scratch directory on the disk under test")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray object store ceiling")
    ap.add_argument("--s3", action="store_true", help="also measure against a local moto S3 server")
    ap.add_argument(
        "--s3-endpoint", default=None,
        help="measure against this S3 endpoint instead of moto (e.g. SeaweedFS: http://127.0.0.1:8333)",
    )
    ap.add_argument("--quick", action="store_true", help="a quarter of the iterations")
    ap.add_argument("--repeat", type=int, default=3, help="passes over every size (medians are reported)")
    args = ap.parse_args(argv)

    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    root = args.dir or tempfile.mkdtemp(prefix="tierflow-bench-")
    os.makedirs(root, exist_ok=True)
    use_ray = not args.no_ray
    started = time.time()
    if use_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                 object_store_memory=max(2 << 30, 6 * max(sizes) * working_set(max(sizes))))
    bench = Bench(root, args.quick, use_ray, args.s3, args.s3_endpoint)
    try:
        for repeat in range(args.repeat):
            print(f"-- pass {repeat + 1} of {args.repeat}", flush=True)
            bench.repeat = repeat
            for size in sizes:
                bench.codec_figures(size)
                bench.run_size(size)
    finally:
        if use_ray:
            import ray

            ray.shutdown()
        if hasattr(bench, "_moto"):
            bench._moto.stop()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = summary(bench.pairs)
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine(lmdb=lmdb.version()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "repeats": args.repeat,
        "ratio_block_size": RATIO_SIZE,
        "ratios": ratios(rows),
        "summary": rows,
        "pairs": bench.pairs,
    }
    print(markdown(rows))
    print(json.dumps(result["ratios"], indent=2))
    print(f"total {result['seconds']} s")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
