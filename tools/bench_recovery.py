"""Recovery from a lost node: tierflow vs Ray Data on the same 20-stage pipeline, same run.

Command behind ``docs/recovery-benchmark.md``::

    /tmp/venv/bin/python tools/bench_recovery.py --json /tmp/bench-recovery.json

The pipeline (stage code in this file, importable as ``bench_recovery``)::

    parquet (id, h float32[16], payload 256 bytes)
      s01..s04  task   per row: ``--work`` rounds of h = tanh(W h + b) (one NumPy matvec per row and round)
      s05       actor  the same, W held by the actor
      s06..s09  task
      s10       Triton mlp_classifier (FEATURES <- h; PROBS, LABEL), 256-row requests, 4 in flight
      s11       task   mixes PROBS into h, then the same work
      s12..s14  task
      s15       actor
      s16..s19  task
      s20       actor  ``--last-factor`` x the work (the slow last stage, like a GPU bottleneck)
    -> parquet (id, label, s01..s20 row sums)

Every stage appends one float32 column (the row sum of its h), so the outputs of the two
systems are compared cell for cell at the end.

On a ``ray.cluster_utils.Cluster`` (head with 0 CPUs for the drivers, ``--nodes`` worker
nodes of ``--cpus-per-node`` logical CPUs, node death noticed within ~1 s) and one
bundled Triton server used by both systems, in this order (``--rounds`` > 1 flips the
order of the systems every round):

1. warm-up: each system runs a 4-block input once (worker processes, imports, Triton
   channels), unmeasured;
2. fault-free: tierflow, then Ray Data;
3. with the fault: tierflow, then Ray Data. When the stage functions have finished
   ``--at`` (default 60 %) of all stage x block executions of that run, the worker node
   where the most stage calls finished in the last 10 s -- the node holding the most
   freshly made blocks, the ones still waiting for their next stage -- is removed
   (``Cluster.remove_node``: every process of that node dies, with its object store and
   its LMDB) and a fresh node is added in its place at once (``--fault replace``, the
   default; ``--fault remove``: none is, as the issue words it; ``--fault join``: a node is
   only added, a control for what a node's start-up costs on these shared cores).

tierflow: ``tierflow.driver.run_pipeline`` with ``replicas: 2`` (each intermediate block on
two nodes), a ``file://`` durable store (the sink), the same Triton server by URL. Task
stages ``concurrency: 2, num_cpus: 1``; actor stages and the Triton stage one actor of
0.5 CPU; speculative copies of stragglers off (``speculate_after: null``; ``--speculate``
turns them on): Ray Data has no speculation, and on a loaded machine they fire in
fault-free runs and would be counted as repeated work. ``--standby N``: N constructed
spare actors per actor stage, off its working actor's node (Ray Data has no equivalent).
``--fuse``: every run of task stages
is fused into the stage after it (``fuse: true``, the same grouping Ray Data makes), so
tierflow caches 5 blocks per input block instead of 20. Ray Data: ``read_parquet ->
map_batches x 20 -> write_parquet``; task stages
``num_cpus=1`` (Ray Data fuses them into the next actor stage), actor stages
``ActorPoolStrategy(size=1)`` with 0.5 CPU, the model stage a callable class holding a
``tritonclient`` gRPC client with the same request size and requests in flight;
``batch_size`` = tierflow's ``block_rows``.

Measured per run: wall time of the whole call (planning, actor start-up and the write
included, for both); ``time ratio`` = fault run / the same system's fault-free run.
``fault cost`` (``<system>_fault_cost_s``): the seconds the fault added, = (fault run: time
from the removal to its end) - (fault-free run: time from the same progress to its end), so
that a run slowed before the fault by other load on the shared machine is not charged for
it (the time ratio is). Where a fault's time goes: ``last_stage_max_gap_s``, the longest wait between two finished
calls of the last (slowest) stage, and in a fault run ``last_stage_stall_after_fault_s``,
from the removal to that stage's next finished call.
Executions are counted by the stage functions themselves (one ``start`` and one ``end``
line per call, with the block's first row id), identically for both systems:
``calls repeated after finishing`` = calls of a (stage, block) that started after the
same (stage, block) had already finished once -- work that was complete and was done
again (Ray's lineage reconstruction, or a tierflow block whose every copy was lost; also
a tierflow step killed after its function returned but before its output was committed).
Calls cut short by the node's death and run again are counted apart (``in-flight
retries``). ``upstream re-executions``: for Ray Data the repeated calls above; for
tierflow its own report's ``reexecutions`` (committed blocks recomputed because every
copy was lost), the log-based figure next to it. tierflow's Triton stage runs the
engine's own client, which logs nothing: its figures come from the report.
Both outputs are checked: every id exactly once, the same values in both systems.

``--json PATH`` writes ``tierflow_time_ratio``, ``tierflow_upstream_reexecutions``,
``raydata_time_ratio``, ``raydata_upstream_reexecutions`` and every run's details.

This is a script, not a test: it is never collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import _harness
from _harness import (ROOT, TOOLS, engine_info, id_check, machine, parser, raydata_context, write_json,
                      write_parquet_parts)
from tierflow.testing import LocalCluster
N_STAGES = 20
ACTOR_STAGES = (5, 15, 20)
TRITON_STAGE = 10
#: bytes of opaque payload per row (a record's raw data), carried through every stage: it
#: makes a 1,000-row block ~0.3 MB, above Ray's 100 KB limit for objects returned inline
#: to the driver (which would survive a node loss in the driver's own memory).
PAYLOAD = 256

# --------------------------------------------------------------------------- stage code
# Row-independent and deterministic: the output does not depend on how rows are grouped
# or how often a call ran. Both systems call exactly these functions.


def _log(log: str | None, stage: str, table: pa.Table, event: str) -> None:
    if log:
        first = table["id"][0].as_py() if table.num_rows else -1
        if table.num_rows == 1:  # a standby spare's warm-up call (StageActor.warm), not a block's
            event = f"warm-{event}"
        with open(log, "a") as fh:  # one short O_APPEND write: lines never interleave
            fh.write(f"{stage} {first} {event} {os.getpid()} {time.time():.3f}\n")


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((16, 16)) / 4.0).astype(np.float32), (rng.standard_normal(16) / 8.0).astype(np.float32)


def _h(table: pa.Table) -> np.ndarray:
    col = table["h"].combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), 16)


def work(table: pa.Table, *, stage: str, seed: int, rounds: int, log: str | None = None,
         mix_probs: bool = False) -> pa.Table:
    """Per row: ``rounds`` x (h = tanh(W h + b)); replaces ``h``, appends ``<stage>`` = row sum."""
    _log(log, stage, table, "start")
    w, b = _weights(seed)
    h = _h(table).copy()
    if mix_probs:
        probs = table["probs"].combine_chunks()
        h[:, :4] += probs.flatten().to_numpy().reshape(len(probs), -1)
    out = np.empty_like(h)
    for i in range(len(h)):
        v = h[i]
        for _ in range(rounds):
            v = np.tanh(w @ v + b)
        out[i] = v
    table = table.set_column(table.schema.get_field_index("h"), "h",
                             pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), 16))
    table = table.append_column(stage, pa.array(out.sum(axis=1, dtype=np.float32)))
    if stage == f"s{N_STAGES:02d}":
        table = table.drop_columns([c for c in ("h", "probs", "payload") if c in table.column_names])
    _log(log, stage, table, "end")
    return table


class WorkActor:
    """A stateful stage: the same work, the weights made once per actor."""

    def __init__(self, *, stage: str, seed: int, rounds: int, log: str | None = None) -> None:
        self.kw = {"stage": stage, "seed": seed, "rounds": rounds, "log": log}
        _weights(seed)  # "loads the model"

    def __call__(self, table: pa.Table) -> pa.Table:
        return work(table, **self.kw)


class TritonUDF(_harness.TritonUDF):
    """Ray Data's model stage (``_harness.TritonUDF`` on column ``h``), logging its calls."""

    def __init__(self, *, url: str, model: str, batch_size: int, max_inflight: int, stage: str,
                 log: str | None = None) -> None:
        super().__init__(url, model, batch_size, max_inflight, column="h")
        self.stage, self.log = stage, log

    def __call__(self, table: pa.Table) -> pa.Table:
        _log(self.log, self.stage, table, "start")
        out = super().__call__(table)
        _log(self.log, self.stage, table, "end")
        return out


# --------------------------------------------------------------------------- data and stages


def stage_name(i: int) -> str:
    return f"s{i:02d}"


def stage_rounds(i: int, args: argparse.Namespace) -> int:
    return args.work * (args.last_factor if i == N_STAGES else 1)


def write_data(out: Path, rows: int, block_rows: int, seed: int = 11) -> None:
    """One parquet file per ``block_rows`` rows (so Ray Data reads the same blocks)."""

    def make(lo: int, hi: int, rng: np.random.Generator) -> pa.Table:
        h = rng.standard_normal((hi - lo, 16)).astype(np.float32)
        payload = rng.integers(0, 256, size=(hi - lo) * PAYLOAD, dtype=np.uint8).tobytes()
        return pa.table({"id": pa.array(np.arange(lo, hi, dtype=np.int64)),
                         "h": pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), 16),
                         "payload": pa.Array.from_buffers(pa.binary(PAYLOAD), hi - lo, [None, pa.py_buffer(payload)])})

    write_parquet_parts(out, rows, block_rows, make, seed=seed, digits=5)


def manifest_doc(name: str, data: Path, out: Path, cache: Path, durable: Path, url: str, log: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    stages: list[dict[str, Any]] = []
    for i in range(1, N_STAGES + 1):
        name_i = stage_name(i)
        if i == TRITON_STAGE:
            stages.append({"name": name_i, "kind": "triton", "model": "mlp_classifier",
                           "inputs": {"h": "FEATURES"}, "outputs": {"PROBS": "probs", "LABEL": "label"},
                           "batch_size": args.triton_batch, "max_inflight": args.max_inflight,
                           "concurrency": 1, "num_cpus": 0.5})
            continue
        params = {"stage": name_i, "seed": i, "rounds": stage_rounds(i, args), "log": log}
        if i in ACTOR_STAGES:
            stages.append({"name": name_i, "kind": "python", "cls": "bench_recovery:WorkActor", "params": params,
                           "concurrency": 1, "num_cpus": 0.5})
        else:
            if i == TRITON_STAGE + 1:
                params["mix_probs"] = True
            stages.append({"name": name_i, "kind": "python", "fn": "bench_recovery:work", "params": params,
                           "concurrency": args.task_concurrency, "num_cpus": 1})
    doc: dict[str, Any] = {
        "name": name,
        "source": {"format": "parquet", "path": str(data), "block_rows": args.block_rows},
        "stages": stages,
        "sink": {"path": str(out), "mode": "overwrite"},
        "triton": {"url": url, "repository": str(ROOT / "triton_models")},
        "cache": {"dir": str(cache) + "-{node}", "remote_url": f"file://{durable}", "replicas": args.replicas},
    }
    if args.fuse:  # as Ray Data does: each run of task stages goes into the stage after it
        for st in stages[:-1]:
            if "fn" in st:
                st["fuse"] = True
                del st["concurrency"], st["num_cpus"]
    if args.standby:  # a constructed spare per actor stage, off its working actor's node
        for st in stages:
            if "cls" in st or st["kind"] == "triton":
                st["standby"] = args.standby
    if not args.speculate:
        for st in doc["stages"]:
            if not st.get("fuse"):
                st["speculate_after"] = None
    return doc


# --------------------------------------------------------------------------- the two systems


def run_tierflow(manifest: Path) -> dict[str, Any]:
    import chaos

    report, error, wall = chaos.run_once(manifest)
    out: dict[str, Any] = {"wall_s": wall, "error": repr(error) if error else None}
    if report:
        out["report"] = {s["name"]: {k: s.get(k) for k in ("executions", "retries", "reexecutions", "speculated")}
                         for s in report["stages"]}
    return out


def run_raydata(data: Path, out: Path, url: str, log: str, args: argparse.Namespace) -> dict[str, Any]:
    import ray.data

    import bench_recovery as stages  # by module name, so workers import it (not __main__)

    if out.exists():
        shutil.rmtree(out)
    B = args.block_rows
    one_actor = ray.data.ActorPoolStrategy(size=1)
    t0 = time.monotonic()
    error = None
    try:
        ds = ray.data.read_parquet(str(data), override_num_blocks=-(-args.rows // B))
        for i in range(1, N_STAGES + 1):
            name = stage_name(i)
            if i == TRITON_STAGE:
                ds = ds.map_batches(stages.TritonUDF, batch_format="pyarrow", batch_size=B, compute=one_actor,
                                    num_cpus=0.5,
                                    fn_constructor_kwargs={"url": url, "model": "mlp_classifier",
                                                           "batch_size": args.triton_batch,
                                                           "max_inflight": args.max_inflight, "stage": name,
                                                           "log": log})
            elif i in ACTOR_STAGES:
                ds = ds.map_batches(stages.WorkActor, batch_format="pyarrow", batch_size=B, compute=one_actor,
                                    num_cpus=0.5,
                                    fn_constructor_kwargs={"stage": name, "seed": i, "rounds": stage_rounds(i, args),
                                                           "log": log})
            else:
                kw: dict[str, Any] = {"stage": name, "seed": i, "rounds": stage_rounds(i, args), "log": log}
                if i == TRITON_STAGE + 1:
                    kw["mix_probs"] = True
                ds = ds.map_batches(stages.work, batch_format="pyarrow", batch_size=B, num_cpus=1, fn_kwargs=kw)
        ds.write_parquet(str(out))
    except BaseException as exc:  # noqa: BLE001 - reported
        error = exc
    return {"wall_s": time.monotonic() - t0, "error": repr(error) if error else None}


# --------------------------------------------------------------------------- counting


def read_log(log: Path) -> list[tuple[str, int, str, int, float]]:
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        p = line.split()
        if len(p) == 5:
            rows.append((p[0], int(p[1]), p[2], int(p[3]), float(p[4])))
    return rows


def last_stage_stall(rows: list[tuple[str, int, str, int, float]], after: float | None = None) -> float:
    """The longest wait between two finished calls of the last stage (the bottleneck), or,
    with ``after`` (the removal's time), the wait from then to its next finished call: what
    the lost node cost the pipeline's slowest stage."""
    last = stage_name(N_STAGES)
    ends = sorted(ts for stage, _, event, _, ts in rows if stage == last and event == "end")
    if after is not None:
        return round(next((ts - after for ts in ends if ts > after), 0.0), 2)
    return round(max((b - a for a, b in zip(ends, ends[1:])), default=0.0), 2)


def progress_curve(rows: list[tuple[str, int, str, int, float]], t0_unix: float) -> list[float]:
    """Seconds from the run's start until 5 %, 10 %, ... 100 % of its calls had finished."""
    ends = sorted(ts for _, _, event, _, ts in rows if event == "end")
    if not ends:
        return []
    return [round(ends[max(0, -(-k * len(ends) // 20) - 1)] - t0_unix, 2) for k in range(1, 21)]


def fault_cost(clean: dict[str, Any], faulty: dict[str, Any]) -> float | None:
    """Seconds the fault added: the fault run's time from the removal to its end minus the
    clean run's time from the same progress to its end (so that a run that was slower
    before the fault, from other load on the machine, is not charged for it)."""
    curve, fault = clean.get("progress_s") or [], faulty["fault"]
    if len(curve) != 20 or fault is None:
        return None
    x = fault["progress"] * 20  # interpolate the clean run's time at the same progress
    k = min(max(int(x), 1), 19)
    t_clean = curve[k - 1] + (curve[k] - curve[k - 1]) * (x - k)
    return round((faulty["wall_s"] - fault["t_s"]) - (clean["wall_s"] - t_clean), 2)


def count_executions(rows: list[tuple[str, int, str, int, float]]) -> dict[str, dict[str, int]]:
    """Per stage: calls, distinct blocks, calls started after that (stage, block) had
    already finished once (``reran_after_done``), and other repeated calls (``retried``:
    a call cut short, run again)."""
    out: dict[str, dict[str, int]] = {}
    ended: set[tuple[str, int]] = set()
    seen: set[tuple[str, int]] = set()
    for stage, first, event, _, _ in rows:
        c = out.setdefault(stage, {"calls": 0, "blocks": 0, "reran_after_done": 0, "retried": 0})
        key = (stage, first)
        if event == "start":
            c["calls"] += 1
            if key in ended:
                c["reran_after_done"] += 1
            elif key in seen:
                c["retried"] += 1
            else:
                c["blocks"] += 1
            seen.add(key)
        elif event == "end":
            ended.add(key)
    return dict(sorted(out.items()))


def ends(log: Path) -> int:
    """Finished (stage, block) calls so far: the run's progress."""
    try:
        with open(log) as fh:
            return sum(1 for line in fh if " end " in line)
    except FileNotFoundError:
        return 0


def recent_outputs(log: Path, window_s: float = 10.0) -> dict[int, int]:
    """Per pid, stage calls it finished in the last ``window_s`` seconds: the blocks most
    likely still waiting for their next stage (in Ray Data, in that node's object store)."""
    now = time.time()
    out: dict[int, int] = {}
    for _, _, event, pid, ts in read_log(log):
        if event == "end" and now - ts <= window_s:
            out[pid] = out.get(pid, 0) + 1
    return out


def per_node(cluster: Any, weights: dict[int, int]) -> dict[Any, int]:
    """Sum of ``weights`` (pid -> n) over each worker node's processes."""
    import psutil

    counts: dict[Any, int] = {}
    for node in cluster.workers:
        for raylet in node.all_processes.get("raylet", []):
            try:
                kids = {p.pid for p in psutil.Process(raylet.process.pid).children(recursive=True)}
            except psutil.Error:
                continue
            counts[node] = counts.get(node, 0) + sum(n for pid, n in weights.items() if pid in kids)
    return counts


def check_output(out: Path, rows: int) -> tuple[dict[str, Any], pa.Table | None]:
    import pyarrow.dataset as pads

    try:
        t = pads.dataset(str(out), format="parquet").to_table()
    except (OSError, ValueError, pa.ArrowException) as exc:
        return {"ok": False, "error": str(exc)}, None
    res: dict[str, Any] = id_check(t["id"].to_numpy(), np.arange(rows))
    res["ok"] = res["lost"] == res["duplicated"] == res["unexpected"] == 0
    return res, t.sort_by("id")


def same_values(a: pa.Table | None, b: pa.Table | None) -> bool:
    if a is None or b is None:
        return False
    cols = sorted(set(a.column_names) & set(b.column_names))
    if len(cols) != len(a.column_names) or len(cols) != len(b.column_names):
        return False
    return all(a[c].combine_chunks().equals(b[c].combine_chunks().cast(a[c].type)) for c in cols)


# --------------------------------------------------------------------------- driver


def one_run(system: str, tag: str, fault: bool, work_dir: Path, data: Path, url: str, cluster: Any,
            args: argparse.Namespace, rows: int) -> dict[str, Any]:
    """One run of ``system``; with ``fault``, replace the busiest node at ``args.at`` progress."""
    import yaml

    log = work_dir / f"log-{system}-{tag}.txt"
    log.unlink(missing_ok=True)
    out = work_dir / f"out-{system}-{tag}"
    total = N_STAGES * -(-rows // args.block_rows)
    if system == "tierflow":
        doc = manifest_doc(f"rec-{tag}", data, out, work_dir / f"cache-{tag}", work_dir / f"durable-{tag}", url,
                           str(log), args)
        manifest = work_dir / f"rec-{tag}.yaml"
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        target: Any = lambda: run_tierflow(manifest)  # noqa: E731
    else:
        target = lambda: run_raydata(data, out, url, str(log), args)  # noqa: E731
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(target()), name=f"{system}-{tag}")
    t0, t0_unix = time.monotonic(), time.time()
    runner.start()
    fault_info: dict[str, Any] | None = None
    if fault:
        # the fault must be injected from the main thread (remove_node installs signal handlers)
        while runner.is_alive():
            done = ends(log)
            if done >= args.at * total:
                recent = recent_outputs(log)
                counts = per_node(cluster, recent)
                victim = max(cluster.workers, key=lambda n: counts.get(n, 0))
                fault_info = {"t_s": round(time.monotonic() - t0, 2), "at_unix": time.time(),
                              "progress": round(done / total, 3),
                              "recent_outputs_on_victim": counts.get(victim, 0),
                              "recent_outputs_total": sum(recent.values())}
                if args.fault == "join":  # control: the cost of a node joining, nothing lost
                    t_add = time.monotonic()
                    node = cluster.add_node()
                    fault_info.update(added=node.node_id[:12], add_s=round(time.monotonic() - t_add, 2))
                else:
                    fault_info.update(cluster.replace_node(victim, replace=args.fault == "replace"))
                break
            time.sleep(0.05)
    runner.join()
    wall = result.get("wall_s", time.monotonic() - t0)
    rows_log = read_log(log)
    counts = count_executions(rows_log)
    check, table = check_output(out, rows)
    res = {"system": system, "tag": tag, "fault": fault_info, "wall_s": round(wall, 2), "error": result.get("error"),
           "output": check, "executions": counts,
           "upstream_reexecutions": sum(c["reran_after_done"] for c in counts.values()),
           "inflight_retries": sum(c["retried"] for c in counts.values()),
           "last_stage_max_gap_s": last_stage_stall(rows_log), "progress_s": progress_curve(rows_log, t0_unix)}
    if fault_info is not None:
        res["last_stage_stall_after_fault_s"] = last_stage_stall(rows_log, fault_info["at_unix"])
    if "report" in result:
        res["report"] = result["report"]
        res["engine_reexecutions"] = sum(int(v.get("reexecutions") or 0) for v in result["report"].values())
        # tierflow's Triton stage runs the engine's own client, which logs nothing: its
        # recomputed committed blocks come from the engine's report instead
        triton = result["report"].get(stage_name(TRITON_STAGE), {})
        res["upstream_reexecutions"] += int(triton.get("reexecutions") or 0)
    res["_table"] = table
    return res


def wait_for_calm(max_load: float, max_wait_s: float) -> dict[str, Any]:
    """Wait (at most ``max_wait_s``) until the 1-minute load average is below ``max_load``:
    the machine is shared, and other users' bursts are the largest error in these times."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= max_load and time.monotonic() - t0 < max_wait_s:
        time.sleep(2.0)
    return {"waited_s": round(time.monotonic() - t0, 1), "load": round(os.getloadavg()[0], 1)}


def main() -> int:
    ap = parser(__doc__, "write the figures and every run here")
    ap.add_argument("--rows", type=int, default=150_000, help="input rows (150 blocks of 1,000: a ~30 s fused run here)")
    ap.add_argument("--block-rows", type=int, default=1_000)
    ap.add_argument("--work", type=int, default=2, help="rounds of the per-row layer in every stage")
    ap.add_argument("--last-factor", type=int, default=8, help="the last stage does this many times the work")
    ap.add_argument("--at", type=float, default=0.6, help="progress at which the node is removed")
    ap.add_argument("--fault", choices=("replace", "remove", "join"), default="replace",
                    help="replace: remove the node and add a fresh one at once (the default); remove: no "
                         "replacement (the next round gets it back, unmeasured); join: only add a node, nothing "
                         "lost (a control: what a node's start-up costs on these shared cores; one round)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus-per-node", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--task-concurrency", type=int, default=2)
    ap.add_argument("--triton-batch", type=int, default=256)
    ap.add_argument("--max-inflight", type=int, default=4)
    ap.add_argument("--fuse", action="store_true",
                    help="tierflow: fuse each run of task stages into the stage after it (fuse: true), as Ray Data does")
    ap.add_argument("--standby", type=int, default=0,
                    help="tierflow: spare actors per actor stage (standby: N); Ray Data has no equivalent")
    ap.add_argument("--speculate", action="store_true",
                    help="leave tierflow's speculative copies of stragglers on (off by default: Ray Data has none, "
                         "and their extra calls would be counted as repeated work)")
    ap.add_argument("--calm-load", type=float, default=6.0,
                    help="before each measured run, wait for the 1-min load average to drop below this")
    ap.add_argument("--calm-wait-s", type=float, default=60.0, help="... but no longer than this")
    ap.add_argument("--rounds", type=int, default=1, help="fault-free + fault runs of each system per round")
    ap.add_argument("--systems", default="tierflow,raydata")
    ap.add_argument("--dir", help="scratch directory (default: a temp dir, removed at the end)")
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.insert(0, str(TOOLS))
    import warnings

    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
    import chaos

    work_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    data, warm = work_dir / "data", work_dir / "warmup"
    write_data(data, args.rows, args.block_rows)
    write_data(warm, 4 * args.block_rows, args.block_rows, seed=12)
    report: dict[str, Any] = {"argv": sys.argv[1:], "rows": args.rows, "block_rows": args.block_rows,
                              "blocks": -(-args.rows // args.block_rows), "stages": N_STAGES, "work": args.work,
                              "last_factor": args.last_factor, "at": args.at, "fault": args.fault, "nodes": args.nodes,
                              "cpus_per_node": args.cpus_per_node, "replicas": args.replicas,
                              "speculate": args.speculate}
    t_all = time.monotonic()
    triton = chaos.RestartableTriton(ROOT / "triton_models", ["mlp_classifier"]).start()
    cluster = LocalCluster(args.nodes, args.cpus_per_node, [str(TOOLS)])
    runs: list[dict[str, Any]] = []
    tables: dict[str, pa.Table | None] = {}
    try:
        t = time.monotonic()
        cluster.start()
        raydata_context(v1_reader=False)  # as the committed figures were measured
        report["cluster_startup_s"] = round(time.monotonic() - t, 2)
        report["machine"] = machine()
        report["engine"] = engine_info()
        print(f"cluster: head (0 CPUs) + {args.nodes} nodes x {args.cpus_per_node} CPUs in "
              f"{report['cluster_startup_s']} s; {report['blocks']} blocks x {N_STAGES} stages; load "
              f"{report['machine']['loadavg_at_start']}", flush=True)
        t = time.monotonic()
        for system in systems:
            r = one_run(system, "warmup", False, work_dir, warm, triton.url, cluster, args, 4 * args.block_rows)
            print(f"  warm-up {system}: {r['wall_s']} s{' ERROR ' + r['error'] if r['error'] else ''}", flush=True)
        report["warmup_s"] = round(time.monotonic() - t, 1)
        changed = False  # a node was replaced since the last warm-up
        for rnd in range(args.rounds):
            order = systems if rnd % 2 == 0 else systems[::-1]
            for system in order:
                if changed:  # warm the replacement node for this system (unmeasured)
                    while len(cluster.workers) < args.nodes:  # --fault remove: the next round has them all
                        cluster.add_node()
                    one_run(system, "warmup", False, work_dir, warm, triton.url, cluster, args, 4 * args.block_rows)
                    changed = False
                for fault in (False, True):  # each system's two runs back to back
                    tag = f"{'fault' if fault else 'clean'}{rnd}"
                    calm = wait_for_calm(args.calm_load, args.calm_wait_s)
                    r = one_run(system, tag, fault, work_dir, data, triton.url, cluster, args, args.rows)
                    changed |= fault
                    tables.setdefault(system, r["_table"])
                    r.pop("_table")
                    r["round"], r["calm"], r["load_after"] = rnd, calm, round(os.getloadavg()[0], 1)
                    runs.append(r)
                    f = r["fault"]
                    print(f"  round {rnd} {system:8s} {'fault' if fault else 'clean'}: {r['wall_s']:7.1f} s  "
                          f"rows ok {r['output'].get('ok')}  calls repeated after finishing "
                          f"{r['upstream_reexecutions']}"
                          + (f" (engine: {r['engine_reexecutions']} committed blocks recomputed)"
                             if "engine_reexecutions" in r else "")
                          + f"  in-flight retries {r['inflight_retries']}  (load {calm['load']} -> {r['load_after']}"
                          f"{', waited %.0f s for it' % calm['waited_s'] if calm['waited_s'] >= 1 else ''})"
                          + (f"\n      node removed at {f['progress']:.0%} of calls, t={f['t_s']} s; "
                             f"{f['recent_outputs_on_victim']} of the {f['recent_outputs_total']} stage calls "
                             f"finished in the 10 s before were there; the last stage's next call "
                             f"finished {r['last_stage_stall_after_fault_s']} s after the removal" if f else "")
                          + f"\n      longest wait between two calls of the last stage: {r['last_stage_max_gap_s']} s"
                          + (f"  ERROR {r['error']}" if r["error"] else ""), flush=True)
    finally:
        cluster.shutdown()
        triton.stop()
    report["total_s"] = round(time.monotonic() - t_all, 1)
    report["runs"] = runs
    report["outputs_identical"] = same_values(tables.get("tierflow"), tables.get("raydata")) \
        if len(systems) == 2 else None
    for system in systems:
        clean = [r["wall_s"] for r in runs if r["system"] == system and r["fault"] is None]
        faulty = [r for r in runs if r["system"] == system and r["fault"] is not None]
        if not clean or not faulty:
            continue
        ratios = [f["wall_s"] / c for f, c in zip(faulty, clean)]
        report[f"{system}_time_ratio"] = round(statistics.median(ratios), 3)
        clean_runs = [r for r in runs if r["system"] == system and r["fault"] is None]
        costs = [c for c in (fault_cost(c, f) for c, f in zip(clean_runs, faulty)) if c is not None]
        if costs:
            report[f"{system}_fault_cost_s"] = round(statistics.median(costs), 2)
        if system == "tierflow":  # its own count: committed blocks recomputed (every copy lost)
            key = "engine_reexecutions"
            report["tierflow_calls_repeated_after_finishing"] = int(statistics.median(
                [r["upstream_reexecutions"] for r in faulty]))
        else:  # counted inside the stage functions
            key = "upstream_reexecutions"
        report[f"{system}_upstream_reexecutions"] = int(statistics.median([r[key] for r in faulty]))
        report[f"{system}_inflight_retries"] = int(statistics.median([r["inflight_retries"] for r in faulty]))
        report[f"{system}_all_ok"] = all(r["output"].get("ok") and not r["error"]
                                         for r in runs if r["system"] == system)
    print(f"\nrecovery from one lost node at {args.at:.0%} ({report['blocks']} blocks x {N_STAGES} stages, "
          f"{args.nodes} nodes; {report['total_s']} s in all)")
    print(f"  {'system':9s} {'fault-free':>10s} {'with fault':>10s} {'ratio':>6s} {'fault cost':>10s} "
          f"{'upstream re-exec':>17s} {'in-flight retries':>18s}  rows ok")
    for system in systems:
        if f"{system}_time_ratio" not in report:
            continue
        clean = [r for r in runs if r["system"] == system and r["fault"] is None]
        faulty = [r for r in runs if r["system"] == system and r["fault"] is not None]
        print(f"  {system:9s} {statistics.median([r['wall_s'] for r in clean]):9.1f}s "
              f"{statistics.median([r['wall_s'] for r in faulty]):9.1f}s {report[f'{system}_time_ratio']:6.2f} "
              f"{report.get(f'{system}_fault_cost_s', float('nan')):9.1f}s "
              f"{report[f'{system}_upstream_reexecutions']:>17d} {report[f'{system}_inflight_retries']:>18d}  "
              f"{report[f'{system}_all_ok']}")
    if report.get("outputs_identical") is not None:
        print(f"  outputs of the two systems identical: {report['outputs_identical']}")
    write_json(args.json, report)
    if not args.dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
