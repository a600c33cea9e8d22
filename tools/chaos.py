"""Chaos run: a manifest on a 3-node Ray cluster while workers die, a node is replaced and
Triton restarts; then the oracle.

Usage::

    /tmp/venv/bin/python tools/chaos.py                       # the built-in demo pipeline
    /tmp/venv/bin/python tools/chaos.py path/to/manifest.yaml --id-column id
    /tmp/venv/bin/python tools/chaos.py --schedule kill@0.2,node@0.5,triton@0.7 --json out.json

What happens:

1. A ``ray.cluster_utils.Cluster`` starts on this machine: a head with 0 CPUs (the driver
   runs there) and ``--nodes`` worker nodes of ``--cpus-per-node`` logical CPUs, with fast
   node-death detection (health checks every 200 ms, dead after 5 misses).
2. If the manifest has Triton stages, a bundled ``tritonserver`` is started on fixed ports
   from the manifest's model repository and the manifest is pointed at it (``triton.url``).
3. **Golden run**: the manifest, fault-free, on that cluster (its own cache, durable store
   and output directory).
4. **Chaos run**: the same manifest again (fresh cache, store and output), while a fault
   thread follows its progress in the journal (fraction of block-steps committed) and
   injects each fault of ``--schedule`` (``fault@fraction``, comma separated) once the run
   has got that far:

   * ``kill``   -- SIGKILL one Ray worker process that is running a stage step at that
     moment (process title ``ray::run_task``, ``ray::StageActor.run`` or
     ``ray::sink_task``; only processes under this cluster's raylets are considered).
     This is what Ray's ``WorkerKillerActor`` does with the state API; the title is used
     here because the state API needs the full dashboard.
   * ``node``   -- ``Cluster.remove_node`` of the worker node running the most stage steps
     (every process of that node dies, its LMDB copies become unreachable), then a fresh
     replacement node is added.
   * ``lose``   -- the same removal, and no node takes its place (the run finishes on
     what is left).
   * ``triton`` -- stop the Triton server (SIGTERM, reaped) and start a new one on the
     same ports; ``--triton-down-s`` seconds pass between the two.

5. **Oracle** (Jepsen's total-queue vocabulary, ``shared/notes/reliability.md`` section 7):
   the chaos output must have ``_SUCCESS``; ``lost`` (input ids missing from the output),
   ``duplicated`` (ids present more than once) and ``unexpected`` (ids not in the input)
   must all be 0; and the output, sorted by the id column, must equal the golden output
   cell for cell. Every scheduled fault must have been injected, and after the run every
   logical CPU of the cluster must be free again (no leaked actors or tasks).

The summary also gives, per stage, executions, retries and the engine's re-executions
(from the run report) and, for the demo pipeline, what the stage functions themselves
logged: how many steps started again after the same step had already finished once
(``reran_after_done``, what lineage recomputation would look like). Exit status: 0 when
the oracle holds, 1 when it fails, 2 for a bad invocation.

The demo pipeline (``--rows``, ``--block-rows``; stage code in this file)::

    parquet (id, text) -> features (task: per-row NumPy -> float32[16])
                       -> normalize (actor)
                       -> classify  (Triton mlp_classifier: FEATURES -> PROBS, LABEL)
                       -> summarize (task) -> parquet

A user manifest: its source, stages and sink stay as written; the chaos tool overrides the
sink path (a directory per run, ``mode: overwrite``), the cache (``dir`` with ``{node}``,
a ``file://`` durable store per run, ``replicas`` from ``--replicas``) and, when it has
Triton stages, ``triton`` (the chaos-managed server). Its stage modules must be importable
from the manifest's directory. ``--id-column`` names a unique, stable row id that every
stage keeps.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from _harness import ROOT, TOOLS, id_check, parser, write_json, write_parquet_parts
from tierflow.testing import BackgroundRun, LocalCluster

DEFAULT_SCHEDULE = "kill@0.10,kill@0.25,node@0.40,kill@0.55,triton@0.65,kill@0.80"

# --------------------------------------------------------------------------- demo stages
# Deterministic, row-independent functions of the input, so the output does not depend on
# how rows were grouped or how often a step ran. Each one appends "<stage> <first id>
# <event> <pid>" lines to ``log`` (``start`` on entry, ``end`` before returning).


def _log(log: str | None, stage: str, table: pa.Table, event: str) -> None:
    if log:
        first = table["id"][0].as_py() if table.num_rows else -1
        with open(log, "a") as fh:  # one short O_APPEND write per line: lines never interleave
            fh.write(f"{stage} {first} {event} {os.getpid()}\n")


def features(table: pa.Table, log: str | None = None, delay_s: float = 0.0, work: int = 2) -> pa.Table:
    """Per row: a 16-dim vector from the id and text length, pushed through ``work``
    rounds of a fixed 16x16 tanh layer (one small NumPy matvec per row and round)."""
    _log(log, "features", table, "start")
    ids = table["id"].to_numpy()
    lens = pc.utf8_length(table["text"]).to_numpy(zero_copy_only=False)
    w = np.random.default_rng(16).standard_normal((16, 16)).astype(np.float32) / 4.0
    phase = np.arange(16, dtype=np.float32)
    out = np.empty((len(ids), 16), dtype=np.float32)
    for i, (rid, n) in enumerate(zip(ids.tolist(), lens.tolist())):
        v = np.sin(phase * (rid % 997) / 97.0 + n / 10.0).astype(np.float32)
        for _ in range(work):
            v = np.tanh(w @ v)
        out[i] = v
    time.sleep(delay_s)
    _log(log, "features", table, "end")
    return table.append_column("features", pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), 16))


class Normalize:
    """Stateful stage (an actor pool in tierflow): scales each feature vector to unit norm."""

    def __init__(self, log: str | None = None, delay_s: float = 0.0) -> None:
        self.log, self.delay_s = log, delay_s

    def __call__(self, table: pa.Table) -> pa.Table:
        _log(self.log, "normalize", table, "start")
        col = table["features"].combine_chunks()
        x = col.flatten().to_numpy().reshape(len(col), 16)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
        time.sleep(self.delay_s)
        _log(self.log, "normalize", table, "end")
        i = table.schema.get_field_index("features")
        return table.set_column(i, "features", pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), 16))


def summarize(table: pa.Table, log: str | None = None, delay_s: float = 0.0) -> pa.Table:
    """Confidence and a per-row digest of the model output (of the first 4 features when
    the pipeline has no model stage); drops the wide columns."""
    _log(log, "summarize", table, "start")
    if "probs" in table.column_names:
        probs = table["probs"].combine_chunks()
        p = probs.flatten().to_numpy().reshape(len(probs), -1)
        label = table["label"]
    else:
        f = table["features"].combine_chunks()
        z = f.flatten().to_numpy().reshape(len(f), 16)[:, :4].astype(np.float64)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        label = pa.array(p.argmax(axis=1).astype(np.int64))
    time.sleep(delay_s)
    out = pa.table({"id": table["id"], "label": label,
                    "confidence": pa.array(p.max(axis=1).astype(np.float32)),
                    "digest": pa.array(np.round(p @ np.arange(1, p.shape[1] + 1), 5))})
    _log(log, "summarize", table, "end")
    return out


def write_demo_data(out: Path, rows: int, files: int = 4, seed: int = 3) -> None:
    words = np.array("alpha beta gamma delta epsilon zeta eta theta iota kappa".split(), dtype=object)

    def make(lo: int, hi: int, rng: np.random.Generator) -> pa.Table:
        texts = [" ".join(words[rng.integers(0, len(words), size=k)]) for k in rng.integers(1, 12, size=hi - lo)]
        return pa.table({"id": pa.array(np.arange(lo, hi, dtype=np.int64)), "text": texts})

    write_parquet_parts(out, rows, -(-rows // files), make, seed=seed)


def demo_expected(data: Path) -> pa.Table:
    """The demo pipeline without its model stage, applied in this process to all of
    ``data`` at once: what a correct run must output (the functions are row-independent)."""
    import pyarrow.dataset as pads

    table = pads.dataset(str(data), format="parquet").to_table()
    return summarize(Normalize()(features(table)))


def demo_manifest(work: Path, rows: int, block_rows: int, delay_s: float, triton: bool = True,
                  standby: int = 0) -> Path:
    """Write the demo data and manifest into ``work``; returns the manifest path.
    ``standby``: spare actors for each actor stage."""
    import yaml

    write_demo_data(work / "data", rows)
    log = str(work / "executions.log")
    doc = {
        "name": "chaos-demo",
        "source": {"format": "parquet", "path": "data/", "block_rows": block_rows},
        "stages": [
            {"name": "features", "kind": "python", "fn": "chaos:features", "concurrency": 3,
             "params": {"log": log, "delay_s": delay_s}, "requires": ["id", "text"],
             "produces": {"features": "float32[16]"}},
            {"name": "normalize", "kind": "python", "cls": "chaos:Normalize", "concurrency": 2, "num_cpus": 0.5,
             "params": {"log": log, "delay_s": delay_s / 2}, "requires": ["features"]},
            {"name": "classify", "kind": "triton", "model": "mlp_classifier", "inputs": {"features": "FEATURES"},
             "outputs": {"PROBS": "probs", "LABEL": "label"}, "batch_size": 128, "max_inflight": 2,
             "concurrency": 1, "num_cpus": 0.5},
            {"name": "summarize", "kind": "python", "fn": "chaos:summarize", "concurrency": 2,
             "params": {"log": log, "delay_s": delay_s / 2}, "requires": ["id", "probs", "label"],
             "produces": {"confidence": "float32", "digest": "float64"}},
        ],
        "sink": {"path": "out/", "mode": "overwrite"},
        "triton": {"launch": True, "repository": str(ROOT / "triton_models")},
    }
    if not triton:
        doc["stages"] = [st for st in doc["stages"] if st["kind"] != "triton"]
        doc["stages"][-1]["requires"] = ["id", "features"]
        del doc["triton"]
    for st in doc["stages"]:
        if standby and (st["kind"] == "triton" or "cls" in st):
            st["standby"] = standby
    path = work / "chaos-demo.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------- Triton


class RestartableTriton:
    """The bundled tritonserver on fixed ports, restartable on the same ports."""

    def __init__(self, repo: Path, models: list[str]) -> None:
        self.repo, self.models = Path(repo), models
        self.server: Any = None
        self.ports: tuple[int, int, int] | None = None

    def start(self) -> RestartableTriton:
        from tierflow.triton.server import TritonServer

        if self.ports is None:
            self.server = TritonServer(self.repo, models=self.models, startup_timeout_s=180.0).start()
            g, h = self.server.grpc_url, self.server.http_url
            m = self.server.metrics_url
            self.ports = (int(g.rsplit(":", 1)[1]), int(h.rsplit(":", 1)[1]), int(m.rsplit(":", 1)[1].split("/")[0]))
        else:
            grpc, http, metrics = self.ports
            self.server = TritonServer(self.repo, grpc_port=grpc, http_port=http, metrics_port=metrics,
                                       models=self.models, startup_timeout_s=180.0).start()
        return self

    @property
    def url(self) -> str:
        return str(self.server.grpc_url)

    def restart(self, down_s: float = 0.0, crash: bool = False) -> dict[str, Any]:
        """Stop the server (SIGTERM, or SIGKILL when ``crash``), wait ``down_s``, start a new
        one on the same ports; returns timings."""
        t0 = time.monotonic()
        if crash and self.server.pid is not None:
            os.kill(self.server.pid, signal.SIGKILL)
        self.server.stop()
        stopped = time.monotonic() - t0
        time.sleep(down_s)
        self.start()
        return {"how": "SIGKILL" if crash else "SIGTERM", "stop_s": round(stopped, 2),
                "down_s": round(time.monotonic() - t0, 2), "url": self.url}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# --------------------------------------------------------------------------- progress and faults


def journal_progress(journal: Path, n_stages: int) -> float:
    """Fraction of block-steps (stages + sink) committed, from the journal in directory
    ``journal`` (0 when absent).

    A block counts as far as its furthest committed step: the journal forgets a consumed
    intermediate once the next stage has committed, so the furthest step is what is left.
    """
    from tierflow.engine.journal import Journal

    try:
        doc = Journal.load(str(journal)).document()
    except (OSError, ValueError):
        return 0.0
    blocks = int(doc.get("blocks") or 0)
    if not blocks:
        return 0.0
    reached = {int(b): n_stages + 1 for b in doc.get("parts", {})}
    for i, stage in enumerate(doc.get("stages", {}).values()):
        for b in stage.get("done", {}):
            reached[int(b)] = max(reached.get(int(b), 0), i + 1)
    return sum(reached.values()) / (blocks * (n_stages + 1))


def parse_schedule(text: str) -> list[tuple[str, float]]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, frac = item.partition("@")
        if name not in ("kill", "node", "lose", "triton") or not frac:
            raise ValueError(f"bad fault {item!r}: want kill@F, node@F, lose@F or triton@F with F in [0, 1)")
        f = float(frac)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"bad fraction in {item!r}")
        out.append((name, f))
    return sorted(out, key=lambda x: x[1])


@dataclass
class FaultInjector:
    """Injects the schedule's faults as the run's progress passes each fraction.

    Runs in the main thread (``Cluster.remove_node`` installs signal handlers, which
    Python allows only there) while the pipeline runs in another thread.
    """

    schedule: list[tuple[str, float]]
    progress: Any  # () -> float
    cluster: LocalCluster
    triton: RestartableTriton | None
    triton_down_s: float = 0.0
    seed: int = 0
    triton_crash: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)

    def run_while(self, run: BackgroundRun, t0: float) -> None:
        """Inject faults until the schedule is done or ``run`` has finished."""
        rng = random.Random(self.seed)
        pending = list(self.schedule)
        while pending and run.alive:
            p = self.progress()
            if p < pending[0][1]:
                time.sleep(0.05)
                continue
            name, frac = pending.pop(0)
            event: dict[str, Any] = {"fault": name, "scheduled_at": frac, "progress": round(p, 3),
                                     "t_s": round(time.monotonic() - t0, 2)}
            try:
                if name == "kill":
                    detail = self.cluster.kill_step_worker(rng)
                    event["injected"] = detail is not None
                    event["detail"] = detail or "no worker was running a step"
                elif name in ("node", "lose"):  # lose: no node takes its place
                    event["detail"] = self.cluster.replace_node(replace=name == "node")
                    event["injected"] = True
                elif self.triton is None:
                    event["injected"], event["detail"] = False, "the pipeline has no Triton stage"
                else:
                    event["detail"] = self.triton.restart(self.triton_down_s, self.triton_crash)
                    event["injected"] = True
            except Exception as exc:  # noqa: BLE001 - the summary names it
                event["injected"], event["detail"] = False, f"{type(exc).__name__}: {exc}"
            self.events.append(event)
            print(f"  fault {name:6s} at {event['progress']:5.1%} (t={event['t_s']:.1f}s): {event['detail']}",
                  flush=True)
        for name, frac in pending:
            self.events.append({"fault": name, "scheduled_at": frac, "injected": False,
                                "detail": "the run ended before this point"})


# --------------------------------------------------------------------------- running and checking


@dataclass
class Prepared:
    manifest: Path
    name: str
    id_column: str
    n_stages: int
    triton_models: list[str]
    triton_repo: Path
    base_dir: str
    source_path: str
    source_format: str
    exec_log: Path | None


def prepare(manifest_path: Path, id_column: str, exec_log: Path | None = None) -> Prepared:
    from tierflow.manifest import TritonStage, load_manifest

    m = load_manifest(manifest_path)
    models = sorted({s.model for s in m.stages if isinstance(s, TritonStage)})
    return Prepared(manifest_path, m.name, id_column, len(m.stages), models,
                    Path(m.resolve(m.triton.repository)), m.base_dir, m.resolve(m.source.path), m.source.format,
                    exec_log)


def variant(p: Prepared, work: Path, tag: str, replicas: int, triton_url: str | None) -> tuple[Path, Path, Path]:
    """A copy of the manifest for one run: its own sink, cache and durable store.

    Returns (manifest, output dir, journal directory)."""
    import yaml

    doc = yaml.safe_load(p.manifest.read_text())
    doc["source"]["path"] = p.source_path
    out = work / f"out-{tag}"
    doc["sink"] = {**doc["sink"], "path": str(out), "mode": "overwrite"}
    durable = work / f"durable-{tag}"
    doc["cache"] = {**{k: v for k, v in (doc.get("cache") or {}).items() if k not in ("storage_options",)},
                    "dir": str(work / f"cache-{tag}-{{node}}"), "remote_url": f"file://{durable}",
                    "replicas": replicas}
    if p.triton_models:
        doc["triton"] = {"url": triton_url, "repository": str(p.triton_repo)}
    doc.pop("ray", None)
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, out, durable / "_journal" / p.name


class FailureLog:
    """Records every failed step attempt the driver sees (full error text), from the run's
    ``block_failed`` events. Diagnostics only."""

    def __init__(self) -> None:
        self.failures: list[dict[str, Any]] = []

    def __call__(self, event: Any) -> None:
        if event.kind == "block_failed":
            self.failures.append({"t": time.time(), "stage": event.stage, "block": event.block,
                                  "attempt": event.attempt, "node": event.node, "retryable": event.retryable,
                                  "error": (event.error or "")[-4000:]})


def run_once(manifest: Path, on_event: Any = None) -> tuple[dict[str, Any] | None, BaseException | None, float]:
    from tierflow.driver import run_pipeline

    t0 = time.monotonic()
    try:
        report = run_pipeline(manifest, fresh=True, progress_out=None, on_event=on_event)
        error = None
    except BaseException as exc:  # noqa: BLE001 - reported
        report, error = None, exc
    return report, error, time.monotonic() - t0


def read_source_ids(p: Prepared) -> np.ndarray:
    import pyarrow.dataset as pads

    fmt = "json" if p.source_format == "jsonl" else p.source_format
    return pads.dataset(p.source_path, format=fmt).to_table(columns=[p.id_column])[p.id_column].to_numpy()


def read_output(out: Path) -> tuple[pa.Table | None, list[str]]:
    """The committed output (the parts ``_SUCCESS`` lists) and stray files in the directory."""
    import pyarrow.parquet as pq

    from tierflow.io.sink import read_success

    success = read_success(str(out))
    names = {e.name for e in out.iterdir()} if out.exists() else set()
    if success is None:
        return None, []
    parts = [p["name"] for p in success["parts"]]  # type: ignore[index,union-attr]
    stray = sorted(n for n in names - set(parts) if n != "_SUCCESS")
    tables = [pq.read_table(out / n) for n in parts]
    return (pa.concat_tables(tables, promote_options="default") if tables else None), stray


def oracle(ids_in: np.ndarray, chaos: pa.Table | None, golden: pa.Table | None, id_column: str) -> dict[str, Any]:
    """lost / duplicated / unexpected ids, and cell-for-cell equality with the golden run."""
    if chaos is None:
        return {"committed": False, "lost": int(len(np.unique(ids_in))), "duplicated": 0, "unexpected": 0,
                "rows": 0, "identical_to_golden": False, "differing_rows": None}
    res: dict[str, Any] = {"committed": True, **id_check(chaos[id_column].to_numpy(), ids_in)}
    if golden is None:
        res["identical_to_golden"], res["differing_rows"] = False, None
        return res
    a = chaos.sort_by(id_column)
    b = golden.sort_by(id_column).select(a.column_names) if set(golden.column_names) == set(a.column_names) else None
    if b is None:
        res["identical_to_golden"], res["differing_rows"] = False, f"columns differ: {golden.column_names}"
        return res
    same = a.equals(b)
    res["identical_to_golden"] = bool(same)
    if not same and a.num_rows == b.num_rows:
        diff = np.zeros(a.num_rows, dtype=bool)
        for name in a.column_names:
            diff |= ~np.array([x == y for x, y in zip(a[name].to_pylist(), b[name].to_pylist())])
        res["differing_rows"] = int(diff.sum())
    else:
        res["differing_rows"] = None if same else "row counts differ"
    return res


def log_counts(log: Path | None, after_line: int = 0) -> dict[str, dict[str, int]]:
    """Per stage, from the stage functions' own log (lines from ``after_line`` on): steps
    started, distinct blocks, and starts of a block whose same step had already ended once."""
    if log is None or not log.exists():
        return {}
    lines = log.read_text().splitlines()[after_line:]
    out: dict[str, dict[str, int]] = {}
    ended: set[tuple[str, str]] = set()
    blocks: dict[str, set[str]] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        stage, first, event = parts[0], parts[1], parts[2]
        c = out.setdefault(stage, {"starts": 0, "blocks": 0, "reran_after_done": 0})
        if event == "start":
            c["starts"] += 1
            if (stage, first) in ended:
                c["reran_after_done"] += 1
            blocks.setdefault(stage, set()).add(first)
        elif event == "end":
            ended.add((stage, first))
    for stage, c in out.items():
        c["blocks"] = len(blocks.get(stage, ()))
    return out


def stage_table(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not report:
        return []
    return [{k: s.get(k) for k in ("name", "blocks", "executions", "retries", "reexecutions", "rows_out")}
            for s in report["stages"]]


def run_chaos(manifest: Path | None = None, *, id_column: str = "id", schedule: str = DEFAULT_SCHEDULE,
              nodes: int = 3, cpus_per_node: int = 2, replicas: int = 2, triton_down_s: float = 0.0,
              work: Path | None = None, rows: int = 6000, block_rows: int = 100, delay_s: float = 0.15,
              seed: int = 0, golden: bool | str = True, quiet: bool = False,
              triton_crash: bool = False, demo_triton: bool = True, standby: int = 0) -> dict[str, Any]:
    """Golden run + chaos run + oracle; returns the summary (``summary["ok"]``).

    ``golden``: True runs the manifest fault-free first and compares with its output;
    ``"local"`` (demo pipeline without Triton only) compares with the demo functions applied
    in this process; False compares ids only."""
    if golden == "local" and (manifest is not None or demo_triton):
        raise ValueError('golden="local" needs the demo pipeline without its Triton stage')
    plan = parse_schedule(schedule)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="tierflow-chaos-")) if work is None else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    exec_log = None
    if manifest is None:
        manifest = demo_manifest(work, rows, block_rows, delay_s, demo_triton, standby)
        exec_log = work / "executions.log"
    prepared = prepare(Path(manifest), id_column, exec_log)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    import tierflow

    summary: dict[str, Any] = {"manifest": str(manifest), "pipeline": prepared.name, "schedule": schedule,
                               "nodes": nodes, "cpus_per_node": cpus_per_node, "replicas": replicas,
                               "work": str(work), "engine": str(Path(tierflow.__file__).parent)}
    triton: RestartableTriton | None = None
    cluster = LocalCluster(nodes, cpus_per_node, [prepared.base_dir, str(TOOLS)])
    t_all = time.monotonic()
    try:
        if prepared.triton_models:
            t = time.monotonic()
            triton = RestartableTriton(prepared.triton_repo, prepared.triton_models).start()
            summary["triton_startup_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        cluster.start()
        summary["cluster_startup_s"] = round(time.monotonic() - t, 2)
        say(f"cluster: head (0 CPUs) + {nodes} nodes x {cpus_per_node} CPUs up in {summary['cluster_startup_s']} s"
            + (f"; triton at {triton.url}" if triton else ""))
        url = triton.url if triton else None

        golden_table = None
        if golden == "local":
            golden_table = demo_expected(work / "data")
        elif golden:
            g_manifest, g_out, _ = variant(prepared, work, "golden", replicas, url)
            report, error, elapsed = run_once(g_manifest)
            summary["golden"] = {"elapsed_s": round(elapsed, 2), "error": repr(error) if error else None,
                                 "stages": stage_table(report)}
            say(f"golden run: {elapsed:.1f} s" + (f", FAILED: {error!r}" if error else ""))
            golden_table, _ = read_output(g_out)

        log_mark = len(exec_log.read_text().splitlines()) if exec_log and exec_log.exists() else 0
        c_manifest, c_out, journal = variant(prepared, work, "chaos", replicas, url)
        faults = FaultInjector(plan, lambda: journal_progress(journal, prepared.n_stages), cluster, triton,
                               triton_down_s, seed, triton_crash)
        failures = FailureLog()
        t0 = time.monotonic()
        run = BackgroundRun(c_manifest, fresh=True, on_event=failures)
        faults.run_while(run, t0)
        run.join()
        report, error, elapsed = (None, run.error, run.elapsed_s) if run.error else (run.report(), None, run.elapsed_s)
        say(f"chaos run: {elapsed:.1f} s" + (f", FAILED: {error!r}" if error else ""))
        chaos_table, stray = read_output(c_out)
        leaked = cluster.cpus_leaked()
        res = oracle(read_source_ids(prepared), chaos_table, golden_table if golden else None, id_column)
        if not golden:
            res.pop("identical_to_golden"), res.pop("differing_rows")
        summary["chaos"] = {"elapsed_s": round(elapsed, 2), "error": repr(error) if error else None,
                            "stages": stage_table(report), "faults": faults.events,
                            "stage_log": log_counts(exec_log, log_mark), "stray_files": stray,
                            "failed_steps": failures.failures}
        summary["oracle"] = res
        summary["cpus_leaked"] = leaked
        checks = {
            "run succeeded": error is None,
            "output committed (_SUCCESS)": res["committed"],
            "lost == 0": res["lost"] == 0,
            "duplicated == 0": res["duplicated"] == 0,
            "unexpected == 0": res["unexpected"] == 0,
            "every fault injected": all(e.get("injected") for e in faults.events),
            "no CPU leaked": leaked == 0,
        }
        if golden:
            checks["identical to golden"] = bool(res.get("identical_to_golden"))
        summary["checks"] = checks
        summary["ok"] = all(checks.values())
    finally:
        cluster.shutdown()
        if triton is not None:
            triton.stop()
        summary["total_s"] = round(time.monotonic() - t_all, 1)
        if own_work and summary.get("ok"):
            shutil.rmtree(work, ignore_errors=True)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print()
    print(f"chaos summary: pipeline {s['pipeline']}, {s['nodes']} nodes x {s['cpus_per_node']} CPUs, "
          f"replicas {s['replicas']}, schedule {s['schedule']}")
    c = s.get("chaos", {})
    if "golden" in s:
        print(f"  golden run {s['golden']['elapsed_s']} s; chaos run {c.get('elapsed_s')} s")
    for e in c.get("faults", []):
        mark = "ok " if e.get("injected") else "NOT"
        print(f"  [{mark}] {e['fault']:6s} @ {e.get('progress', e['scheduled_at'])}: {e['detail']}")
    if c.get("stages"):
        print(f"  {'stage':12s} {'blocks':>6s} {'execs':>6s} {'retries':>7s} {'re-exec':>7s}"
              + ("  log: starts  reran-after-done" if c.get("stage_log") else ""))
        for st in c["stages"]:
            lg = c.get("stage_log", {}).get(st["name"])
            extra = f"  {lg['starts']:>11d}  {lg['reran_after_done']:>16d}" if lg else ""
            print(f"  {st['name']:12s} {st['blocks']:>6d} {st['executions']:>6d} {st['retries']:>7d} "
                  f"{st['reexecutions']:>7d}{extra}")
    o = s.get("oracle", {})
    if o:
        print(f"  rows {o.get('rows')}: lost {o['lost']}, duplicated {o['duplicated']}, unexpected {o['unexpected']}"
              + (f", identical to golden: {o['identical_to_golden']}" if "identical_to_golden" in o else "")
              + (f" (differing rows: {o['differing_rows']})" if o.get("differing_rows") else ""))
    if c.get("stray_files"):
        print(f"  stray files in the output directory (not in _SUCCESS): {c['stray_files'][:5]}")
    fails = c.get("failed_steps", [])
    if fails:
        print(f"  failed step outcomes seen by the driver: {len(fails)} (retryable: "
              f"{sum(bool(f['retryable']) for f in fails)}); first lines:")
        seen: dict[str, int] = {}
        for f in fails:
            head = f["error"].strip().splitlines()[0][:160] if f["error"].strip() else "?"
            seen[head] = seen.get(head, 0) + 1
        for head, n in seen.items():
            print(f"    {n} x {head}")
    if c.get("error"):
        print(f"  run error: {c['error']}")
    for name, passed in s.get("checks", {}).items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    print(f"ORACLE {'PASSED' if s.get('ok') else 'FAILED'} ({s.get('total_s')} s in all)")


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "write the summary here")
    ap.add_argument("manifest", nargs="?", help="manifest to run (default: the built-in demo pipeline)")
    ap.add_argument("--id-column", default="id", help="unique, stable row id kept by every stage")
    ap.add_argument("--schedule", default=DEFAULT_SCHEDULE, help="faults as fault@fraction,... (kill, node, lose, triton)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus-per-node", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--triton-down-s", type=float, default=0.0, help="seconds Triton stays down when restarted")
    ap.add_argument("--triton-crash", action="store_true", help="restart Triton by SIGKILL instead of SIGTERM")
    ap.add_argument("--rows", type=int, default=6000, help="demo pipeline: rows")
    ap.add_argument("--block-rows", type=int, default=100, help="demo pipeline: rows per block")
    ap.add_argument("--delay-s", type=float, default=0.15, help="demo pipeline: extra seconds per block and stage")
    ap.add_argument("--no-triton", action="store_true", help="demo pipeline: leave out the Triton stage")
    ap.add_argument("--standby", type=int, default=0, help="demo pipeline: spare actors per actor stage")
    ap.add_argument("--seed", type=int, default=0, help="picks which running worker each kill hits")
    ap.add_argument("--no-golden", action="store_true", help="skip the fault-free run (no content comparison)")
    ap.add_argument("--local-golden", action="store_true",
                    help="demo without Triton: compare with the stage functions applied in-process, no golden run")
    ap.add_argument("--work", help="scratch directory (default: a temp dir, removed when the oracle passes)")
    args = ap.parse_args(argv)
    try:
        parse_schedule(args.schedule)
    except ValueError as exc:
        ap.error(str(exc))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    summary = run_chaos(Path(args.manifest).resolve() if args.manifest else None, id_column=args.id_column,
                        schedule=args.schedule, nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                        replicas=args.replicas, triton_down_s=args.triton_down_s,
                        work=Path(args.work) if args.work else None, rows=args.rows, block_rows=args.block_rows,
                        delay_s=args.delay_s, seed=args.seed, golden="local" if args.local_golden else not args.no_golden,
                        triton_crash=args.triton_crash, demo_triton=not args.no_triton, standby=args.standby)
    print_summary(summary)
    write_json(args.json, summary)
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
