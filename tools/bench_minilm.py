"""Throughput of triton_models/minilm (all-MiniLM-L6-v2 in NumPy): in process and served.

    python tools/bench_minilm.py [--rows 512] [--json PATH]

Two workloads: short sentences (~14 tokens, like the model card's examples) and the
document example's 64-word chunks (~70 tokens). In process: ``MiniLM.encode`` on the whole
list. Served: the bundled tritonserver with only ``minilm`` loaded, a stock tritonclient
sending requests of 64 rows, 2 in flight (what ``examples/documents.yaml`` does). Each
figure is the median of 3 timed passes after one warm-up pass. Prints the machine's load
average too: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import os
import queue
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from _harness import ROOT, load_module, machine, parser, write_json
from tierflow.triton.server import TritonServer


def workloads(rows: int) -> dict[str, list[str]]:
    gen = load_module(ROOT / "examples" / "make_documents.py", "bench_make_documents")
    stages = load_module(ROOT / "examples" / "document_stages.py", "bench_document_stages")
    rng = np.random.default_rng(0)
    sentences = [gen._sentence(rng, topic) for topic in sorted(gen.TOPICS) for _ in range(rows)][:rows]
    chunks = stages.chunk_pages(stages.split_pages(gen.make_documents(rows, 0, rng)))["text"].to_pylist()[:rows]
    return {"sentences": sentences, "chunks_64_words": chunks}


def _median_rate(n: int, run: Callable[[], object]) -> float:
    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def served(url: str, texts: list[str], batch: int = 64, inflight: int = 2) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    done: queue.Queue[Any] = queue.Queue()
    try:
        pending = 0
        for start in range(0, len(texts), batch):
            if pending == inflight:
                result, error = done.get(timeout=300)
                pending -= 1
                assert error is None, error
            arr = np.array([[t.encode()] for t in texts[start : start + batch]], dtype=np.object_)
            inp = grpcclient.InferInput("TEXT", list(arr.shape), "BYTES")
            inp.set_data_from_numpy(arr)
            client.async_infer("minilm", [inp], callback=lambda result, error: done.put((result, error)))  # called with keywords
            pending += 1
        for _ in range(pending):
            result, error = done.get(timeout=300)
            assert error is None, error
    finally:
        client.close()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=512)
    args = ap.parse_args()
    host = machine()

    model = load_module(ROOT / "triton_models" / "minilm" / "1" / "model.py", "bench_minilm").get_model()
    loads = [os.getloadavg()[0]]
    results: dict[str, dict[str, float]] = {}
    data = workloads(args.rows)
    for name, texts in data.items():
        tokens = float(np.mean([len(t) for t in model.token_ids(texts)]))
        results[name] = {"rows": len(texts), "mean_tokens": round(tokens, 1),
                         "in_process_rows_per_s": round(_median_rate(len(texts), lambda: model.encode(texts)), 1)}
    loads.append(os.getloadavg()[0])
    with TritonServer(ROOT / "triton_models", models=["minilm"]) as server:
        for name, texts in data.items():
            results[name]["triton_rows_per_s"] = round(
                _median_rate(len(texts), lambda: served(server.grpc_url, texts)), 1)
    loads.append(os.getloadavg()[0])
    print(f"{'workload':<18}{'rows':>6}{'tokens':>8}{'in process/s':>14}{'triton/s':>10}")
    for name, r in results.items():
        print(f"{name:<18}{r['rows']:>6}{r['mean_tokens']:>8}{r['in_process_rows_per_s']:>14}{r['triton_rows_per_s']:>10}")
    print(f"cpus {os.cpu_count()}, 1-min load average at start/middle/end: {loads}")
    write_json(args.json, {"results": results, "load_average": loads, "cpus": os.cpu_count(), "machine": host})


if __name__ == "__main__":
    main()
