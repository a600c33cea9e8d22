"""One multi-stage pipeline run by tierflow and by Ray Data: same data, same stage code,
same batch sizes and concurrency, one Triton server for both.

Command behind the "Pipeline" section of ``docs/throughput-benchmarks.md``::

    /tmp/venv/bin/python tools/bench_pipeline.py --json /tmp/bench-pipeline.json

Options: ``--rows N`` (default 2,500,000), ``--block-rows B`` (rows per tierflow block =
Ray Data ``batch_size``; default 20,000), ``--rounds N`` (default 3), ``--replicas 1,2``
(the tierflow configurations measured; Ray Data runs once per round next to each),
``--quiet-wait-s S`` / ``--quiet-cores C`` (before each run, wait up to S s, default 180, until
other users' jobs use fewer than C cores, default 0.5, over 3 s: the machine is shared),
``--num-cpus N`` (logical CPUs of the Ray instance both systems share; default 3, what
tierflow's embedded Ray would give this manifest), ``--cluster`` (also run both systems on
a 2-node ``ray.cluster_utils.Cluster``, where ``replicas: 2`` has a second node to put
its copy on), ``--ray-default-config`` (start Ray with its own default system config rather
than the one tierflow gives its embedded Ray, ``tierflow.driver.RAY_SYSTEM_CONFIG``; both systems
share the Ray instance either way), ``--quick`` (100k rows, 1 round: a smoke run).

The pipeline (the stage functions are in this file, importable as ``bench_pipeline``)::

    parquet (id, text, rating, price, helpful_votes, age_days)
      -> clean      task   Arrow regex normalisation of the text; n_chars, n_words
      -> featurize  task   per-row Python: hashed bag of words (crc32 per word) + numeric
                           signals -> features float32[16]
      -> classify   Triton mlp_classifier (FEATURES -> PROBS, LABEL), 256-row requests,
                           4 in flight, 1 client actor
      -> score      actor  per-row Python: label name, confidence, keyword topic, summary
      -> finalize   task   output columns, needs_review flag
    -> parquet

Each system, each round:

* tierflow: ``tierflow.driver.run_pipeline(manifest, fresh=True, progress_out=None)`` on a
  manifest with ``triton.url`` set to the shared server. Start-up ends when the engine's
  backend has every stage actor constructed (``RayBackend.start`` returns; nothing is
  dispatched before): manifest checks, planning, journal lease, Triton readiness probe,
  cache servers and actor pools are start-up.
* Ray Data: ``read_parquet -> map_batches(...) x 5 -> write_parquet``, task stages as
  functions with ``concurrency``/``num_cpus`` equal to tierflow's, the model stage a
  callable class holding a ``tritonclient`` gRPC client that keeps the same number of
  requests of the same size in flight (``async_infer``), the score stage the same class.
  Start-up ends when the last actor's ``__init__`` has returned (timestamps written by the
  actors). Ray Data already reads and runs the task stages while its actors start, so
  this split favours Ray Data.

``rows/s`` = rows / (end - start-up end); ``total`` = wall time of the whole call. The Ray
instance is started once and shared (its start-up is reported, not counted). Systems
alternate within each round (the order flips every round); the table gives medians and
ranges over rounds; ``ratio`` = tierflow rows/s / Ray Data rows/s of the same round, then
the median. Outputs are checked: same row count and same aggregates (sum of labels, of
topics, count of needs_review) in both systems.

``--json PATH`` writes every run plus ``pipeline_ratio_replicas1`` and
``pipeline_ratio_replicas2`` (from the 2-node cluster when ``--cluster`` ran, else the
single-node figure, see ``replicas2_where``).

This is a script, not a test: it is never collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import warnings
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import _harness
from _harness import ROOT, machine, parser, raydata_context, spread, worker_env, write_json, write_parquet_parts

WORDS = (
    "battery screen fast slow great terrible cheap pricey light heavy loud quiet sturdy flimsy "
    "bright dim warm cold sharp blurry smooth rough happy broken works returned love hate "
    "shipping box cable charger case lens strap button app update price quality"
).split()
LABEL_NAMES = ["negative", "neutral", "positive", "mixed"]
TOPICS = {"power": {"battery", "charger", "cable"}, "display": {"screen", "bright", "dim", "blurry", "sharp"},
          "build": {"sturdy", "flimsy", "heavy", "light", "broken", "case", "strap", "button"},
          "service": {"shipping", "box", "returned", "update", "app"}, "value": {"cheap", "pricey", "price"}}
TOPIC_IDS = {name: i + 1 for i, name in enumerate(TOPICS)}
WORD_TOPIC = {w: TOPIC_IDS[t] for t, ws in TOPICS.items() for w in ws}
N_HASH = 8


# --------------------------------------------------------------------------- stage code
# Each stage takes and returns a pyarrow.Table; both systems call exactly these.


def clean(table: pa.Table, *, max_chars: int = 400) -> pa.Table:
    """Lower-case, collapse whitespace, trim, truncate; add n_chars and n_words."""
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
    """Per row: a hashed bag of words (crc32 of every word, 8 buckets) next to 8 numeric
    signals -> features float32[16]."""
    n = table.num_rows
    bag = np.zeros((n, N_HASH), dtype=np.float32)
    for i, text in enumerate(table["text"].to_pylist()):
        row = [0] * N_HASH
        for word in text.split(" "):
            row[zlib.crc32(word.encode()) & (N_HASH - 1)] += 1
        bag[i] = row
    bag /= np.maximum(bag.sum(axis=1, keepdims=True), 1.0)
    cols = [table[c].to_numpy().astype(np.float64) for c in ("rating", "price", "helpful_votes", "age_days", "n_chars", "n_words")]
    rating, price, votes, age, chars, words = cols
    base = np.stack([
        (rating - 3.0) / 1.4, np.log1p(price) - 3.0, np.log1p(votes) - 1.0, age / 1000.0 - 1.0,
        np.log1p(chars) / 5.0 - 1.0, words / 12.0 - 1.0, chars / np.maximum(words, 1.0) / 6.0 - 1.0,
        np.sin(age / 97.0),
    ], axis=1)
    feats = np.concatenate([base.astype(np.float32), bag], axis=1)
    return table.append_column("features", pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), 16))


class Scorer:
    """Stateful stage: per row, label name, confidence, the first topic keyword in the text
    and a summary string. ``ready_file`` (benchmark only) records when __init__ is done."""

    def __init__(self, label_names: list[str] = LABEL_NAMES, ready_file: str | None = None) -> None:
        self.label_names = list(label_names)
        self.word_topic = dict(WORD_TOPIC)
        _mark_ready(ready_file)

    def __call__(self, table: pa.Table) -> pa.Table:
        probs = table["probs"].combine_chunks()
        p = probs.flatten().to_numpy().reshape(len(probs), -1)
        conf = p.max(axis=1)
        labels = table["label"].to_pylist()
        words = table["n_words"].to_pylist()
        names, topics, summaries = [], [], []
        wt = self.word_topic
        for text, label, c, nw in zip(table["text"].to_pylist(), labels, conf.tolist(), words):
            name = self.label_names[label]
            topic = 0
            for w in text.split(" "):
                topic = wt.get(w, 0)
                if topic:
                    break
            names.append(name)
            topics.append(topic)
            summaries.append(f"{name}:{c:.3f}:{topic}:{nw}")
        return (
            table.append_column("confidence", pa.array(conf.astype(np.float32)))
            .append_column("label_name", pa.array(names, pa.string()))
            .append_column("topic", pa.array(topics, pa.int64()))
            .append_column("summary", pa.array(summaries, pa.string()))
        )


def finalize(table: pa.Table, mark_file: str | None = None) -> pa.Table:
    """Output columns; flag rows the model is unsure about. ``mark_file`` (benchmark only)
    gets one line per call: when it finished and how many rows it returned."""
    keep = ["id", "rating", "n_words", "label", "label_name", "confidence", "topic", "summary"]
    out = table.select(keep)
    out = out.append_column("needs_review", pc.less(out["confidence"], pa.scalar(0.5, pa.float32())))
    if mark_file:
        with open(mark_file, "a") as fh:
            fh.write(f"{time.time()!r} {out.num_rows}\n")
    return out


def steady_rate(mark_file: Path) -> float | None:
    """Rows/s between the first and the last finalize call (the first call's rows excluded)."""
    if not mark_file.exists():
        return None
    marks = sorted((float(t), int(n)) for t, n in (line.split() for line in mark_file.read_text().splitlines()))
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return None
    return sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0])


def _mark_ready(path: str | None) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(f"{time.time()!r}\n")


class TritonUDF(_harness.TritonUDF):
    """Ray Data's model stage (``_harness.TritonUDF``); ``ready_file`` records when
    ``__init__`` is done."""

    def __init__(self, url: str, model: str, batch_size: int, max_inflight: int,
                 ready_file: str | None = None) -> None:
        super().__init__(url, model, batch_size, max_inflight)
        _mark_ready(ready_file)


# --------------------------------------------------------------------------- data


def write_data(out: Path, rows: int, files: int, row_group: int, seed: int = 7) -> None:
    vocab = np.array(WORDS, dtype=object)

    def make(lo: int, hi: int, rng: np.random.Generator) -> pa.Table:
        n = hi - lo
        lengths = rng.integers(3, 25, size=n)
        words = vocab[rng.integers(0, len(vocab), size=int(lengths.sum()))]
        texts, pos = [], 0
        for i, k in enumerate(lengths.tolist()):
            seg = words[pos : pos + k]
            pos += k
            texts.append("  ".join(seg).upper() if i % 7 == 0 else " ".join(seg))
        return pa.table({
            "id": pa.array(np.arange(lo, hi, dtype=np.int64)),
            "text": pa.array(texts, pa.string()),
            "rating": pa.array(rng.integers(1, 6, size=n).astype(np.int64)),
            "price": pa.array(np.round(rng.lognormal(3.0, 1.0, size=n), 2)),
            "helpful_votes": pa.array(rng.poisson(2.0, size=n).astype(np.int64)),
            "age_days": pa.array(rng.integers(0, 2000, size=n).astype(np.int64)),
        })

    write_parquet_parts(out, rows, -(-rows // files), make, seed=seed, row_group=row_group)


# --------------------------------------------------------------------------- the two systems

STAGE_NAMES = ["clean", "featurize", "classify", "score", "finalize"]


def manifest_text(work: Path, data: Path, name: str, args: argparse.Namespace, url: str, replicas: int,
                  cache_dir: Path, remote_url: str | None) -> str:
    import yaml

    task = {"concurrency": args.task_concurrency, "num_cpus": 1}
    doc = {
        "name": name,
        "source": {"format": "parquet", "path": str(data), "block_rows": args.block_rows},
        "stages": [
            {"name": "clean", "kind": "python", "fn": "bench_pipeline:clean", **task,
             "requires": ["text"], "produces": {"n_chars": "int64", "n_words": "int64"}},
            {"name": "featurize", "kind": "python", "fn": "bench_pipeline:featurize", **task,
             "requires": ["text", "rating", "price", "helpful_votes", "age_days", "n_chars", "n_words"],
             "produces": {"features": "float32[16]"}},
            {"name": "classify", "kind": "triton", "model": "mlp_classifier",
             "inputs": {"features": "FEATURES"}, "outputs": {"PROBS": "probs", "LABEL": "label"},
             "batch_size": args.triton_batch, "max_inflight": args.max_inflight, "concurrency": 1, "num_cpus": 0.5},
            {"name": "score", "kind": "python", "cls": "bench_pipeline:Scorer", "concurrency": 1, "num_cpus": 0.5,
             "requires": ["text", "probs", "label", "n_words"],
             "produces": {"confidence": "float32", "label_name": "string", "topic": "int64", "summary": "string"}},
            {"name": "finalize", "kind": "python", "fn": "bench_pipeline:finalize", **task,
             "params": {"mark_file": str(work / f"marks-{name}.txt")}, "produces": {"needs_review": "bool"}},
        ],
        "sink": {"path": str(work / f"out-{name}"), "mode": "overwrite"},
        "triton": {"url": url},
        "cache": {"dir": str(cache_dir), "replicas": replicas, **({"remote_url": remote_url} if remote_url else {})},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def run_tierflow(manifest: Path, mark_file: Path) -> dict[str, Any]:
    from tierflow.driver import run_pipeline

    marks: dict[str, float] = {}

    def on_event(event: Any) -> None:
        if event.kind == "run_started":  # the backend is ready to dispatch: start-up is over
            marks["ready"] = time.time()

    mark_file.unlink(missing_ok=True)
    t0 = time.time()
    report = run_pipeline(manifest, fresh=True, progress_out=None, on_event=on_event)
    t1 = time.time()
    ready = marks.get("ready", t0)
    execs = {s["name"]: s["executions"] for s in report["stages"]}
    return {"system": "tierflow", "total_s": t1 - t0, "startup_s": ready - t0, "run_s": t1 - ready,
            "rows": report["rows_out"], "steady_rows_per_s": steady_rate(mark_file), "report_elapsed_s": report["elapsed_s"], "executions": execs,
            "reexecutions": sum(s.get("reexecutions", 0) for s in report["stages"]),
            "busy_s": {s["name"]: s["busy_s"] for s in report["stages"]}}


def run_raydata(work: Path, data: Path, out: Path, args: argparse.Namespace, url: str, tag: str) -> dict[str, Any]:
    import ray.data

    import bench_pipeline as stages  # by module name, so workers import it (not __main__)

    ready_file = work / f"ready-{tag}.txt"
    ready_file.unlink(missing_ok=True)
    mark_file = work / f"marks-raydata-{tag}.txt"
    mark_file.unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    B = args.block_rows
    tasks = ray.data.TaskPoolStrategy(size=args.task_concurrency)
    one_actor = ray.data.ActorPoolStrategy(size=1)
    import pyarrow.parquet as pq

    raydata_context(plan_banner=True)  # the V1 reader: as many read blocks as tierflow has blocks
    files = sorted(data.glob("*.parquet"))
    n_blocks = sum(-(-pq.ParquetFile(f).metadata.num_rows // B) for f in files)
    t0 = time.time()
    ds = ray.data.read_parquet(str(data), override_num_blocks=n_blocks)
    ds = ds.map_batches(stages.clean, batch_format="pyarrow", batch_size=B, compute=tasks, num_cpus=1)
    ds = ds.map_batches(stages.featurize, batch_format="pyarrow", batch_size=B, compute=tasks, num_cpus=1)
    ds = ds.map_batches(stages.TritonUDF, batch_format="pyarrow", batch_size=B, compute=one_actor, num_cpus=0.5,
                        fn_constructor_kwargs={"url": url, "model": "mlp_classifier",
                                               "batch_size": args.triton_batch, "max_inflight": args.max_inflight,
                                               "ready_file": str(ready_file)})
    ds = ds.map_batches(stages.Scorer, batch_format="pyarrow", batch_size=B, compute=one_actor, num_cpus=0.5,
                        fn_constructor_kwargs={"label_names": LABEL_NAMES, "ready_file": str(ready_file)})
    ds = ds.map_batches(stages.finalize, batch_format="pyarrow", batch_size=B, compute=tasks, num_cpus=1,
                        fn_kwargs={"mark_file": str(mark_file)})
    ds.write_parquet(str(out))
    t1 = time.time()
    marks = [float(x) for x in ready_file.read_text().split()] if ready_file.exists() else []
    ready = max(marks) if len(marks) >= 2 else t0

    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))
    return {"system": "raydata", "total_s": t1 - t0, "startup_s": ready - t0, "run_s": t1 - ready, "rows": rows,
            "steady_rows_per_s": steady_rate(mark_file)}


def output_digest(path: Path) -> dict[str, int]:
    import pyarrow.dataset as pads

    t = pads.dataset(str(path), format="parquet").to_table(columns=["id", "label", "topic", "needs_review"])
    return {"rows": t.num_rows, "sum_id": int(pc.sum(t["id"]).as_py()), "sum_label": int(pc.sum(t["label"]).as_py()),
            "sum_topic": int(pc.sum(t["topic"]).as_py()),
            "needs_review": int(pc.sum(pc.cast(t["needs_review"], pa.int64())).as_py())}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rows_per_s": spread([r["rows"] / r["run_s"] for r in runs]),
        "rows_per_s_total": spread([r["rows"] / r["total_s"] for r in runs]),
        "run_s": spread([r["run_s"] for r in runs]),
        "startup_s": spread([r["startup_s"] for r in runs]),
        "total_s": spread([r["total_s"] for r in runs]),
        "cpu_busy_s": spread([r["cpu_busy_s"] for r in runs]),
        "ours_cpu_s": spread([r["ours_cpu_s"] for r in runs]),
        "others_cpu_s": spread([r["others_cpu_s"] for r in runs]),
        "steady_rows_per_s": spread([r["steady_rows_per_s"] or float("nan") for r in runs]),
    }


def _tree_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of this process and every descendant, by pid, with a
    coarse group: driver, ray-worker, ray-daemon, triton."""
    tick = os.sysconf("SC_CLK_TCK")
    info: dict[int, tuple[int, float, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        info[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    me = os.getpid()
    out: dict[int, tuple[str, float]] = {}
    for pid, (ppid, cpu, cmd) in info.items():
        p, seen = pid, 0
        while p not in (me, 0, 1) and p in info and seen < 64:
            p, seen = info[p][0], seen + 1
        if p != me:
            continue
        if pid == me:
            group = "driver"
        elif "tritonserver" in cmd or "triton_python_backend_stub" in cmd:
            group = "triton"
        elif cmd.startswith("ray::") or "default_worker.py" in cmd or not cmd.strip():
            group = "ray-worker"  # an empty command line: a worker being torn down
        else:
            group = "ray-daemon"
        out[pid] = (group, cpu)
    return out


def cpu_by_group(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each group used between the snapshots, plus ``new_processes`` (started
    in between and still alive; a process that both started and ended in between is
    missed, and so is the CPU an ending process used after ``before``)."""
    groups: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        groups[group] = groups.get(group, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    out = {g: round(v, 1) for g, v in sorted(groups.items())}
    out["new_processes"] = sum(pid not in before for pid in after)
    return out


def cpu_busy_s() -> float:
    """Machine-wide busy CPU seconds so far (/proc/stat; includes other users' work)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait_s: float, max_cores: float, window_s: float = 3.0) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) until other users' jobs use under ``max_cores`` cores
    over a ``window_s`` window. Returns (seconds waited, their cores in the last window)."""
    t0 = time.time()
    while True:
        busy, tree = cpu_busy_s(), _tree_cpu()
        time.sleep(window_s)
        ours = cpu_by_group(tree, _tree_cpu())
        others = (cpu_busy_s() - busy - sum(v for k, v in ours.items() if k != "new_processes")) / window_s
        if others < max_cores or time.time() - t0 >= max_wait_s:
            return time.time() - t0, others


def compare(work: Path, args: argparse.Namespace, url: str, replicas_list: list[int], where: str,
            remote_url: str | None, cache_root: str) -> dict[str, Any]:
    """Alternate tierflow (each replicas setting) and Ray Data over args.rounds rounds,
    after one unmeasured warm-up run of each on a small input (worker processes started,
    modules imported, Triton connections made, for both systems alike)."""
    manifests, warm = {}, {}
    for r in replicas_list:
        path = work / f"tf-{where}-r{r}.yaml"
        path.write_text(manifest_text(work, work / "data", f"bench-{where}-r{r}", args, url, r,
                                      Path(cache_root), remote_url))
        manifests[r] = path
        wpath = work / f"tf-{where}-r{r}-warmup.yaml"
        wpath.write_text(manifest_text(work, work / "warmup", f"warmup-{where}-r{r}", args, url, r,
                                       Path(cache_root), remote_url))
        warm[r] = wpath
    t = time.time()
    for r in replicas_list:
        run_tierflow(warm[r], work / f"marks-warmup-{where}-r{r}.txt")
    run_raydata(work, work / "warmup", work / f"out-raydata-warmup-{where}", args, url, f"{where}-warmup")
    warmup_s = time.time() - t
    runs: dict[str, list[dict[str, Any]]] = {f"tierflow_r{r}": [] for r in replicas_list}
    runs["raydata"] = []
    digests: dict[str, dict[str, int]] = {}
    for rnd in range(args.rounds):
        order = [f"tierflow_r{r}" for r in replicas_list] + ["raydata"]
        if rnd % 2:
            order.reverse()
        for name in order:
            waited, load = wait_quiet(args.quiet_wait_s, args.quiet_cores) if args.quiet_wait_s > 0 else (0.0, float("nan"))
            busy, tree = cpu_busy_s(), _tree_cpu()
            if name == "raydata":
                res = run_raydata(work, work / "data", work / f"out-raydata-{where}", args, url, f"{where}-{rnd}")
                res["cpu_busy_s"] = cpu_busy_s() - busy
                res["cpu_s"] = cpu_by_group(tree, _tree_cpu())
                digests.setdefault("raydata", output_digest(work / f"out-raydata-{where}"))
            else:
                r = int(name.split("_r")[1])
                res = run_tierflow(manifests[r], work / f"marks-bench-{where}-r{r}.txt")
                res["cpu_busy_s"] = cpu_busy_s() - busy
                res["cpu_s"] = cpu_by_group(tree, _tree_cpu())
                digests.setdefault(name, output_digest(work / f"out-bench-{where}-r{r}"))
            res["ours_cpu_s"] = round(sum(v for k, v in res["cpu_s"].items() if k != "new_processes"), 1)
            res["others_cpu_s"] = round(res["cpu_busy_s"] - res["ours_cpu_s"], 1)  # other users' jobs
            res["round"] = rnd
            res["waited_for_quiet_s"], res["others_cores_at_start"] = round(waited, 1), round(load, 2)
            runs[name].append(res)
            print(f"  [{where}] round {rnd} {name:12s} rows {res['rows']:>9,d}  start-up {res['startup_s']:6.2f}s  "
                  f"run {res['run_s']:6.2f}s  total {res['total_s']:6.2f}s  -> {res['rows'] / res['run_s']:>9,.0f} rows/s"
                  f"  CPU-s: ours {res['ours_cpu_s']:.1f} {res['cpu_s']}, others {res['others_cpu_s']:.1f}", flush=True)
    out: dict[str, Any] = {"warmup_s": round(warmup_s, 1), "runs": runs, "digests": digests,
                           "outputs_match": len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1,
                           "summary": {k: summarize(v) for k, v in runs.items()}}
    for r in replicas_list:
        tf, rd = runs[f"tierflow_r{r}"], runs["raydata"]
        ratios = [(a["rows"] / a["run_s"]) / (b["rows"] / b["run_s"]) for a, b in zip(tf, rd)]
        totals = [(a["rows"] / a["total_s"]) / (b["rows"] / b["total_s"]) for a, b in zip(tf, rd)]
        out[f"ratio_replicas{r}"] = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                     "max": round(max(ratios), 3), "per_round": [round(x, 3) for x in ratios]}
        out[f"ratio_total_replicas{r}"] = {"median": round(statistics.median(totals), 3),
                                           "min": round(min(totals), 3), "max": round(max(totals), 3)}
        steady = [a["steady_rows_per_s"] / b["steady_rows_per_s"] for a, b in zip(tf, rd)
                  if a["steady_rows_per_s"] and b["steady_rows_per_s"]]
        if steady:
            out[f"ratio_steady_replicas{r}"] = {"median": round(statistics.median(steady), 3),
                                                "min": round(min(steady), 3), "max": round(max(steady), 3)}
    return out


class _PlanCatcher:
    """Keeps the operator chain Ray Data logs when it starts executing (after fusion)."""

    plan: str | None = None

    @classmethod
    def install(cls) -> None:
        import logging

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                if "Execution plan of Dataset" in msg and ": " in msg:
                    cls.plan = msg.split(": ", 1)[1].strip()

        logging.getLogger("ray.data").addHandler(Handler())


def main() -> None:
    ap = parser(__doc__, "write every run and the ratios here")
    ap.add_argument("--rows", type=int, default=2_500_000)
    ap.add_argument("--block-rows", type=int, default=20_000)
    ap.add_argument("--files", type=int, default=0, help="input files (default: 5 blocks per file)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--num-cpus", type=int, default=3)
    ap.add_argument("--task-concurrency", type=int, default=2)
    ap.add_argument("--triton-batch", type=int, default=256)
    ap.add_argument("--max-inflight", type=int, default=4)
    ap.add_argument("--cluster", action="store_true", help="also run on a 2-node ray.cluster_utils.Cluster")
    ap.add_argument("--no-single", action="store_true", help="skip the single-node runs")
    ap.add_argument("--quiet-wait-s", type=float, default=180.0,
                    help="before each run, wait up to this long for other jobs to calm down (0: never wait)")
    ap.add_argument("--quiet-cores", type=float, default=0.5,
                    help="'calm' = other jobs use fewer cores than this over 3 s")
    ap.add_argument("--ray-default-config", action="store_true",
                    help="start Ray with its default system config instead of tierflow's embedded one "
                         "(RAY_SYSTEM_CONFIG: idle task workers kept 30 s); both systems share it either way")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", help="scratch directory (default: a new temp dir, removed at the end)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.rounds, args.quiet_wait_s = 100_000, 1, 0.0
    replicas_list = [int(x) for x in args.replicas.split(",") if x]

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Data's hint that a task pool got fewer inputs than its size (the last blocks).
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
    ray_env = worker_env()  # workers import this file's stage code, and this checkout's tierflow
    import ray
    import ray.data

    from tierflow.driver import RAY_SYSTEM_CONFIG
    from tierflow.triton.server import TritonServer

    _PlanCatcher.install()
    system_config = {} if args.ray_default_config else dict(RAY_SYSTEM_CONFIG)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"argv": sys.argv[1:], "machine": machine(), "rows": args.rows,
                              "block_rows": args.block_rows, "num_cpus": args.num_cpus,
                              "task_concurrency": args.task_concurrency, "triton_batch": args.triton_batch,
                              "max_inflight": args.max_inflight, "ray_system_config": system_config}
    t_all = time.time()
    try:
        t = time.time()
        files = args.files or max(1, -(-args.rows // (5 * args.block_rows)))
        write_data(work / "data", args.rows, files, row_group=args.block_rows)
        write_data(work / "warmup", 2 * args.block_rows, 2, row_group=args.block_rows, seed=8)
        report["data_write_s"] = round(time.time() - t, 2)
        with TritonServer(ROOT / "triton_models", models=["mlp_classifier"]) as server:
            url = server.grpc_url
            report["triton_startup_s"] = round(server.startup_s or 0.0, 2)
            if not args.no_single:
                t = time.time()
                ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING",
                         runtime_env=ray_env, _system_config=system_config)
                report["ray_startup_s"] = round(time.time() - t, 2)
                print(f"single node: {args.num_cpus} logical CPUs on {os.cpu_count()} cores, {args.rows:,} rows, "
                      f"blocks/batches of {args.block_rows:,}", flush=True)
                report["single"] = compare(work, args, url, replicas_list, "single", None, str(work / "cache"))
                report["raydata_plan"] = _PlanCatcher.plan
                ray.shutdown()
            if args.cluster:
                from tierflow.testing import LocalCluster

                per_node = max(2, (args.num_cpus + 1) // 2)
                t = time.time()
                cluster = LocalCluster(nodes=1, cpus_per_node=per_node, head_cpus=per_node,
                                       system_config=system_config).start()
                report["cluster_startup_s"] = round(time.time() - t, 2)
                print(f"2-node cluster: {per_node} logical CPUs per node", flush=True)
                try:
                    report["cluster"] = compare(work, args, url, replicas_list, "cluster",
                                                "file://" + str(work / "store"), str(work / "cache-{node}"))
                    report["cluster"]["logical_cpus_per_node"] = per_node
                finally:
                    cluster.shutdown()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["elapsed_s"] = round(time.time() - t_all, 1)
    for where in ("single", "cluster"):
        if where not in report:
            continue
        sec = report[where]
        print(f"\n{where}: outputs match: {sec['outputs_match']}")
        for name, s in sec["summary"].items():
            print(f"  {name:12s} rows/s {s['rows_per_s']['median']:>9,.0f} ({s['rows_per_s']['min']:,.0f}-"
                  f"{s['rows_per_s']['max']:,.0f})  run {s['run_s']['median']:.2f}s  start-up "
                  f"{s['startup_s']['median']:.2f}s  total {s['total_s']['median']:.2f}s  "
                  f"our CPU {s['ours_cpu_s']['median']:.1f}s, others' {s['others_cpu_s']['median']:.1f}s")
        for r in replicas_list:
            q = sec[f"ratio_replicas{r}"]
            st = sec.get(f"ratio_steady_replicas{r}", {}).get("median", float("nan"))
            print(f"  tierflow replicas:{r} / Ray Data  {q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f})  "
                  f"total-time ratio {sec[f'ratio_total_replicas{r}']['median']:.3f}  steady-state ratio {st:.3f}")
    if "single" in report and 1 in replicas_list:
        report["pipeline_ratio_replicas1"] = report["single"]["ratio_replicas1"]["median"]
    if 2 in replicas_list:
        where = "cluster" if "cluster" in report else "single"
        if where in report:
            report["pipeline_ratio_replicas2"] = report[where]["ratio_replicas2"]["median"]
            report["replicas2_where"] = where
    write_json(args.json, report)


if __name__ == "__main__":
    main()
