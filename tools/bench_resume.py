"""Resume after a killed driver: tierflow vs Ray Data's ``CheckpointConfig``, same pipeline,
same machine, same run.

Command behind ``docs/resume-benchmark.md``::

    RAY_AUTH_MODE=disabled /tmp/venv/bin/python tools/bench_resume.py --json docs/resume-benchmark.json

The pipeline: 64 Parquet files x 500 rows (id, float32[256] signal), generated
deterministically; five stages with real NumPy work per row (spectrum, a tanh projection,
an MLP embedding in a stateful class = an actor in both engines, nearest-centroid
assignment, quantile summary), ~4-6 CPU-s each; Parquet out. Every stage function takes
and returns a pyarrow Table, so both engines run exactly the same code on the same
batches (tierflow ``block_rows`` = Ray Data ``batch_size`` = 500 = rows per input file).

For each pass, four runs on fresh directories (the order is reversed every other pass, so
drifts of a shared machine hit both systems and both modes):

- **tierflow, uninterrupted**: ``python -m tierflow run --quiet manifest.yaml``.
- **tierflow, killed + resumed**: the same command, SIGKILLed (its whole process group,
  embedded Ray included) as soon as its journal says half of the sink parts are committed,
  then the same command again, which resumes.
- **Ray Data, uninterrupted** and **Ray Data, killed + resumed**: the same stages as
  ``map_batches`` reading the same Parquet and writing Parquet with
  ``DataContext.get_current().checkpoint_config = CheckpointConfig(id_column="id", ...)``;
  the driver is a subprocess of this script (``bench_resume.py _raydata RUNDIR``), killed
  the same way as soon as its committed checkpoint files hold half of the rows, then run
  again.

Both engines get the same number of logical CPUs (``--cpus``, default 3: what tierflow's
embedded Ray gives this pipeline on a 2-core machine, one for the actor stage plus task
slots). Every time is the wall clock of whole processes: Python start-up, planning, Ray
start-up and shut-down included. killed + resumed = time until the kill + time of the
resumed run; ratio = killed + resumed / uninterrupted of the same pass; the figure reported
is the median over passes. Each process's time is also cut at its first stage execution's
start and its last one's end (start-up / stages / tail).

Re-executions are counted outside both engines: every stage appends a line when it starts
and one when it ends (stage, the ids it processed, wall and thread-CPU time, pid) to a log
file, from inside the worker. Executions that ended before the kill belong to the killed
run, those that started after the resumed run began to the resumed run. Then:

- ``committed blocks redone`` (tierflow): resumed executions of a (stage, block) the
  journal at the kill said was committed (a block's later committed output, or its sink
  part, implies its earlier stages). Target 0. Committed part files are also checked for
  being rewritten (mtime).
- ``stage executions repeated`` (both): resumed executions over rows the same stage had
  finished before the kill, i.e. finished work thrown away. For Ray Data this is what its
  checkpoint cannot keep (it knows written rows only); for tierflow it is work finished but
  not yet journaled when the driver died. ``cut by the kill``: executions running when the
  driver died.
- ``committed rows redone`` (Ray Data): resumed executions over rows its checkpoint held.

Every output is checked: ids complete and unique, and every output of a pass equal (same
rows, same values) to tierflow's uninterrupted output.

Options: ``--passes N`` (default 3), ``--blocks N`` (64), ``--block-rows N`` (500),
``--cpus N`` (3), ``--systems tierflow,raydata``, ``--kill-fraction F`` (0.5),
``--standing-ray`` (start one Ray head for the whole benchmark, ``ray start --head
--block`` in its own process group, and have every driver join it, so no run pays Ray's
start-up and a kill takes only the driver: what a resume costs on a long-lived cluster),
``--engine DIR`` (the tierflow source tree to run, default this script's checkout; a clean
clone of HEAD keeps others' uncommitted edits out of the figures), ``--workdir DIR``
(default a temporary directory, deleted unless ``--keep``), ``--json PATH``.

``--json`` writes ``resume_time_ratio``, ``committed_blocks_redone`` (sum over passes),
``raydata_resume_time_ratio``, plus every per-run figure.

This is a script, not a test: it is never collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _harness import ROOT, engine_info, machine

PIPELINE = "resume_bench"
STAGES = ["spectrum", "project", "embed", "assign", "summarize"]
# Work per stage, in repetitions of its NumPy kernel: ~70-110 ms of CPU per 500-row block
# each on one core of the development machine (AMD EPYC), ~4-6 CPU-s per stage at 64 blocks.
REPS = {"spectrum": 216, "project": 216, "embed": 92, "assign": 30, "summarize": 36}
DIM = 256
RUN_TIMEOUT_S = 300.0

# The stage code, written next to each manifest (tierflow imports stage modules from the
# manifest's directory) and put on the Ray Data workers' PYTHONPATH.
STAGE_CODE = r'''
import os
import time

import numpy as np
import pyarrow as pa

DIM = @DIM@


def _runs(t):
    ids = t["id"].to_numpy()
    if not len(ids):
        return 0, "-"
    cut = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(ids)]]) - 1
    return len(ids), ",".join(f"{ids[a]}-{ids[b]}" for a, b in zip(starts, ends))


def _begin(log, stage, t):
    """Log the start of an execution: B stage rows t0 0 0 pid ids-as-runs."""
    n, runs = _runs(t)
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"B {stage} {n} {t0:.4f} 0 0 {os.getpid()} {runs}\n")
    return t0, time.thread_time()


def _end(log, stage, t, started):
    """Log the end: E stage rows t0 t1 thread-CPU-seconds pid ids-as-runs."""
    t0, c0 = started
    cpu = time.thread_time() - c0
    n, runs = _runs(t)
    with open(log, "a") as fh:
        fh.write(f"E {stage} {n} {t0:.4f} {time.time():.4f} {cpu:.4f} {os.getpid()} {runs}\n")


def _vecs(t, col, dim):
    arr = t[col].combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def _fixed(arr):
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])


def spectrum(t, log, reps):
    """Windowed log-magnitude spectrum of each row's signal (first 128 bins)."""
    started = _begin(log, "spectrum", t)
    x = _vecs(t, "signal", DIM).astype(np.float64)
    win = np.hanning(DIM)
    for _ in range(reps):
        x = x - x.mean(axis=1, keepdims=True)
        spec = np.log1p(np.abs(np.fft.rfft(x * win, axis=1)))
    out = t.append_column("spec", _fixed(spec[:, :128]))
    _end(log, "spectrum", out, started)
    return out


def project(t, log, reps):
    """A fixed random tanh network over the spectrum."""
    started = _begin(log, "project", t)
    w = np.random.default_rng(1).standard_normal((128, 128)) / 12
    h = _vecs(t, "spec", 128).astype(np.float64)
    for _ in range(reps):
        h = np.tanh(h @ w)
    out = t.append_column("proj", _fixed(h))
    _end(log, "project", out, started)
    return out


class Embedder:
    """The stateful stage (an actor in both engines, like a model stage): an MLP
    embedding, L2-normalised."""

    def __init__(self, log, reps):
        rng = np.random.default_rng(2)
        self.w1 = rng.standard_normal((128, 256)) / 12
        self.w2 = rng.standard_normal((256, 64)) / 16
        self.log, self.reps = log, reps

    def __call__(self, t):
        started = _begin(self.log, "embed", t)
        h = _vecs(t, "proj", 128).astype(np.float64)
        for _ in range(self.reps):
            e = np.maximum(h @ self.w1, 0) @ self.w2
        e /= np.linalg.norm(e, axis=1, keepdims=True) + 1e-9
        out = t.append_column("emb", _fixed(e))
        _end(self.log, "embed", out, started)
        return out


def assign(t, log, reps, k=64):
    """Nearest of k fixed centroids, with a softmax confidence."""
    started = _begin(log, "assign", t)
    c = np.random.default_rng(3).standard_normal((k, 64))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    e = _vecs(t, "emb", 64).astype(np.float64)
    for _ in range(reps):
        d = ((e[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
    p = np.exp(-d)
    p /= p.sum(axis=1, keepdims=True)
    out = t.append_column("cluster", pa.array(d.argmin(axis=1).astype(np.int32)))
    out = out.append_column("conf", pa.array(p.max(axis=1).astype(np.float32)))
    _end(log, "assign", out, started)
    return out


def summarize(t, log, reps):
    """Quantiles of each row's signal; keeps only the small output columns."""
    started = _begin(log, "summarize", t)
    x = _vecs(t, "signal", DIM)
    for _ in range(reps):
        q = np.quantile(x, [0.05, 0.5, 0.95], axis=1)
    out = t.select(["id", "cluster", "conf"])
    for name, row in zip(["q05", "q50", "q95"], q):
        out = out.append_column(name, pa.array(row.astype(np.float32)))
    _end(log, "summarize", out, started)
    return out
'''.replace("@DIM@", str(DIM))


# -- data and pipeline -----------------------------------------------------------------------


def make_data(d: Path, blocks: int, block_rows: int) -> None:
    """``blocks`` Parquet files of ``block_rows`` rows: id (int64, unique) and a noisy
    float32[256] sine, each file from its own seed (deterministic)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    t = np.arange(DIM) / DIM
    for b in range(blocks):
        rng = np.random.default_rng(1000 + b)
        n = block_rows
        freq = rng.uniform(2, 60, size=(n, 1))
        sig = np.sin(2 * np.pi * freq * t) + 0.5 * rng.standard_normal((n, DIM))
        table = pa.table({
            "id": np.arange(b * n, (b + 1) * n, dtype=np.int64),
            "signal": pa.FixedSizeListArray.from_arrays(pa.array(sig.astype(np.float32).ravel()), DIM),
        })
        pq.write_table(table, d / f"part-{b:05d}.parquet")


def stage_specs(run_dir: Path) -> list[dict[str, Any]]:
    """The pipeline's stages, as both engines are given them."""
    log = str(run_dir / "executions.log")
    out = []
    for name in STAGES:
        params = {"log": log, "reps": REPS[name]}
        if name == "embed":
            out.append({"name": name, "cls": "Embedder", "params": params, "concurrency": 1, "num_cpus": 1})
        else:
            out.append({"name": name, "fn": name, "params": params, "concurrency": 2, "num_cpus": 1})
    return out


def write_tierflow(run_dir: Path, data: Path, block_rows: int, cpus: int) -> Path:
    import yaml

    run_dir.mkdir(parents=True)
    (run_dir / "bench_stages.py").write_text(STAGE_CODE)
    stages = []
    for s in stage_specs(run_dir):
        st: dict[str, Any] = {"name": s["name"], "kind": "python", "params": s["params"],
                              "concurrency": s["concurrency"], "num_cpus": s["num_cpus"]}
        if "cls" in s:
            st["cls"] = f"bench_stages:{s['cls']}"
        else:
            st["fn"] = f"bench_stages:{s['fn']}"
        stages.append(st)
    doc = {
        "name": PIPELINE,
        "source": {"format": "parquet", "path": str(data), "block_rows": block_rows},
        "stages": stages,
        "sink": {"path": "out/", "mode": "error"},
        "ray": {"num_cpus": cpus},
    }
    path = run_dir / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_raydata(run_dir: Path, data: Path, a: argparse.Namespace) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "bench_stages.py").write_text(STAGE_CODE)
    cfg = {"data": str(data), "blocks": a.blocks, "batch_size": a.block_rows, "cpus": a.cpus,
           "address": a.address, "out": str(run_dir / "out"), "checkpoint": str(run_dir / "checkpoint"),
           "stages": stage_specs(run_dir)}
    path = run_dir / "raydata.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


# -- the Ray Data driver (run as a subprocess: ``bench_resume.py _raydata RUNDIR``) ----------


def raydata_driver(run_dir: Path) -> None:
    import logging

    import ray
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    cfg = json.loads((run_dir / "raydata.json").read_text())
    sys.path.insert(0, str(run_dir))
    import bench_stages  # written into the run directory

    kw: dict[str, Any] = {"address": cfg["address"]} if cfg["address"] else {
        "address": "local", "num_cpus": cfg["cpus"], "include_dashboard": False}
    ray.init(**kw, logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": str(run_dir)}})
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    # The V1 Parquet reader: one read task (one block) per file, like tierflow's blocks. The
    # default V2 reader buckets small files together (in a 16-file trial all rows became one
    # block and the whole pipeline one serial chain), which is not what is compared here.
    ctx.use_datasource_v2 = False
    ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=cfg["checkpoint"])
    ds = ray.data.read_parquet(cfg["data"], override_num_blocks=cfg["blocks"])
    for s in cfg["stages"]:
        if "cls" in s:
            ds = ds.map_batches(getattr(bench_stages, s["cls"]), fn_constructor_kwargs=s["params"],
                                batch_size=cfg["batch_size"], batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=s["concurrency"]), num_cpus=s["num_cpus"])
        else:
            ds = ds.map_batches(getattr(bench_stages, s["fn"]), fn_kwargs=s["params"],
                                batch_size=cfg["batch_size"], batch_format="pyarrow", num_cpus=s["num_cpus"])
    ds.write_parquet(cfg["out"])
    ray.shutdown()


# -- running and killing ---------------------------------------------------------------------


def _env(engine: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(engine), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": path}


def tierflow_cmd(manifest: Path, address: str | None) -> list[str]:
    extra = ["--address", address] if address else []
    return [sys.executable, "-m", "tierflow", "run", "--quiet", *extra, str(manifest)]


def raydata_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_raydata", str(run_dir)]


def _start(cmd: list[str], run_dir: Path, tag: str, engine: Path) -> tuple[subprocess.Popen[bytes], float, float]:
    with open(run_dir / f"{tag}.stdout", "w") as out, open(run_dir / f"{tag}.stderr", "w") as err:
        t_wall, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, env=_env(engine), cwd=run_dir, stdout=out, stderr=err,
                                start_new_session=True)
    return proc, t_wall, t0


def run_to_end(cmd: list[str], run_dir: Path, tag: str, engine: Path) -> tuple[float, float]:
    """Run ``cmd`` to completion; returns (start wall time, seconds). Raises on failure."""
    proc, t_wall, t0 = _start(cmd, run_dir, tag, engine)
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise RuntimeError(f"{tag} in {run_dir} ran past {RUN_TIMEOUT_S} s") from None
    seconds = time.perf_counter() - t0
    _wait_group_gone(proc.pid)
    if rc != 0:
        raise RuntimeError(f"{tag} in {run_dir} exited {rc}: {(run_dir / f'{tag}.stderr').read_text()[-3000:]}")
    return t_wall, seconds


def run_until(cmd: list[str], run_dir: Path, tag: str, engine: Path,
              reached: Callable[[], bool]) -> tuple[float, float, float]:
    """Start ``cmd``, SIGKILL its process group once ``reached()`` is true; returns
    (start wall time, seconds until the kill, wall time of the kill)."""
    proc, t_wall, t0 = _start(cmd, run_dir, tag, engine)
    while not reached():
        if proc.poll() is not None:
            raise RuntimeError(f"{tag} in {run_dir} ended (rc {proc.returncode}) before the kill point: "
                               f"{(run_dir / f'{tag}.stderr').read_text()[-3000:]}")
        if time.perf_counter() - t0 > RUN_TIMEOUT_S:
            _kill_group(proc)
            raise RuntimeError(f"{tag} in {run_dir}: kill point not reached in {RUN_TIMEOUT_S} s")
        time.sleep(0.05)
    seconds, kill_wall = time.perf_counter() - t0, time.time()
    _kill_group(proc)
    _wait_pids_gone({e["pid"] for e in read_log(run_dir, "B")})
    return t_wall, seconds, kill_wall


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_group_gone(proc.pid)


def _wait_group_gone(pgid: int, timeout_s: float = 60.0) -> None:
    """Wait until no process of the group is left (an embedded Ray's workers and daemons
    included), so a run never competes with the remains of the previous one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)  # stragglers of a run that has ended


def _wait_pids_gone(pids: set[int], timeout_s: float = 60.0) -> None:
    """Wait until the stage workers of a killed driver have exited. Ray's workers run in
    their own sessions, so the process group does not hold them: they exit when they lose
    their raylet (embedded Ray) or when the cluster reaps the dead driver's job."""
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pids.discard(pid)
            except PermissionError:
                pids.discard(pid)  # reused by another user's process: not ours any more
        time.sleep(0.05)


@contextlib.contextmanager
def standing_ray(cpus: int, work: Path) -> Iterator[str]:
    """One Ray head for the whole benchmark, in its own process group (killed by its pgid
    at the end; never ``ray stop``, which would stop every Ray on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with open(work / "ray-head.log", "w") as log:
        proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}",
             "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1"],
            env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        probe = [sys.executable, "-c", f"import ray; ray.init(address={address!r}); ray.shutdown()"]
        deadline = time.monotonic() + 120
        while subprocess.run(probe, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, check=False,
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not start: {(work / 'ray-head.log').read_text()[-2000:]}")
            time.sleep(1)
        yield address
    finally:
        _kill_group(proc)  # type: ignore[arg-type]


# -- reading what happened -------------------------------------------------------------------


def read_log(run_dir: Path, kind: str = "E") -> list[dict[str, Any]]:
    """Execution ends (kind E) or starts (kind B) in log order: stage, rows, t0, t1, cpu,
    pid, runs [(first id, last id)]."""
    try:
        text = (run_dir / "executions.log").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 8 or parts[0] != kind:
            continue  # the other kind, or a line torn by the kill
        _, stage, rows, t0, t1, cpu, pid, runs = parts
        spans = [] if runs == "-" else [(int(x), int(y)) for x, y in (r.split("-") for r in runs.split(","))]
        out.append({"stage": stage, "rows": int(rows), "t0": float(t0), "t1": float(t1), "cpu": float(cpu),
                    "pid": int(pid), "runs": spans})
    return out


def split_log(run_dir: Path, kill_wall: float, resume_wall: float) -> dict[str, Any]:
    """The killed run's finished executions, the resumed run's, and the ones the kill cut."""
    ends, starts = read_log(run_dir, "E"), read_log(run_dir, "B")
    before = [e for e in ends if e["t1"] <= kill_wall]
    after = [e for e in ends if e["t0"] >= resume_wall]
    finished = {(e["pid"], e["t0"]) for e in ends}
    cut = [b for b in starts if b["t0"] <= kill_wall and (b["pid"], b["t0"]) not in finished]
    stray = len(ends) - len(before) - len(after)  # ended after the kill, started before the resume
    return {"before": before, "after": after, "cut": cut, "stray": stray}


def _ids(execs: list[dict[str, Any]]) -> set[int]:
    out: set[int] = set()
    for e in execs:
        for a, b in e["runs"]:
            out.update(range(a, b + 1))
    return out


def repeated(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """Executions after the kill that processed rows the same stage had finished before it."""
    per_stage: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        done = _ids([e for e in before if e["stage"] == stage])
        execs = [e for e in after if e["stage"] == stage]
        hit = [(e, len(done & _ids([e]))) for e in execs]
        hit = [(e, n) for e, n in hit if n]
        per_stage[stage] = {"executions": len(execs), "repeated": len(hit),
                            "rows_repeated": sum(n for _, n in hit),
                            "cpu_s_repeated": round(sum(e["cpu"] for e, _ in hit), 2)}
    return {
        "stage_executions_repeated": sum(s["repeated"] for s in per_stage.values()),
        "rows_repeated": sum(s["rows_repeated"] for s in per_stage.values()),
        "cpu_s_repeated": round(sum(s["cpu_s_repeated"] for s in per_stage.values()), 2),
        "per_stage": per_stage,
    }


def phases(execs: list[dict[str, Any]], start_wall: float, seconds: float) -> dict[str, float]:
    """A process's wall time cut at its first stage execution's start and last one's end
    (for a killed run, the "tail" is the time between its last finished execution and the kill)."""
    if not execs:
        return {"startup_s": round(seconds, 2), "stages_s": 0.0, "tail_s": 0.0}
    first = min(e["t0"] for e in execs) - start_wall
    last = max(e["t1"] for e in execs) - start_wall
    return {"startup_s": round(first, 2), "stages_s": round(last - first, 2), "tail_s": round(seconds - last, 2)}


def duplicates(execs: list[dict[str, Any]]) -> int:
    """Executions of a (stage, rows) that the same run had already finished (speculative or
    retried copies)."""
    return len(execs) - len({(e["stage"], tuple(e["runs"])) for e in execs})


def cpu_s(execs: list[dict[str, Any]]) -> float:
    """CPU seconds spent inside the stage functions (thread CPU time, not wall time)."""
    return round(sum(e["cpu"] for e in execs), 2)


def tf_journal(run_dir: Path) -> dict[str, Any]:
    from tierflow.engine.journal import Journal

    try:
        return Journal.load(str(run_dir / ".tierflow" / "store" / "_journal" / PIPELINE)).document()
    except (OSError, ValueError):
        return {}


def tf_committed_pairs(journal: dict[str, Any]) -> set[tuple[str, int]]:
    """(stage, block) pairs the journal says were committed: a block's later committed
    output (or its sink part) implies its earlier stages were done."""
    reach: dict[int, int] = {}
    for i, name in enumerate(STAGES):
        for b in journal.get("stages", {}).get(name, {}).get("done", {}):
            reach[int(b)] = max(reach.get(int(b), -1), i)
    for b in journal.get("parts", {}):
        reach[int(b)] = len(STAGES)
    return {(STAGES[i], b) for b, r in reach.items() for i in range(min(r + 1, len(STAGES)))}


class RdProgress:
    """Rows in Ray Data's committed checkpoint files (``<id>.parquet``, renamed from
    ``<id>.pending.parquet`` once the data file is written), each file read once."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "checkpoint"
        self.seen: dict[str, int] = {}

    def rows(self) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.dir.is_dir():
            for f in self.dir.glob("*.parquet"):
                if f.name.endswith(".pending.parquet") or f.name in self.seen:
                    continue
                with contextlib.suppress(OSError, pa.ArrowInvalid):  # gone or not readable yet: next poll
                    self.seen[f.name] = pq.read_metadata(f).num_rows
        return sum(self.seen.values())

    def ids(self) -> set[int]:
        import pyarrow.parquet as pq

        out: set[int] = set()
        for f in self.dir.glob("*.parquet"):
            if not f.name.endswith(".pending.parquet"):
                out.update(pq.read_table(f).column(0).to_pylist())
        return out


def read_output(out: Path, tierflow: bool) -> Any:
    import pyarrow.dataset as pads

    if tierflow:
        success = json.loads((out / "_SUCCESS").read_text())
        files = [str(out / p["name"]) for p in success["parts"]]
    else:
        files = sorted(str(p) for p in out.glob("*.parquet"))
    return pads.dataset(files).to_table().sort_by("id")


def check_output(table: Any, total: int, reference: Any | None) -> dict[str, Any]:
    ids = table["id"].to_pylist()
    uniq = set(ids)
    res = {"rows": len(ids), "lost": total - len(uniq & set(range(total))), "duplicated": len(ids) - len(uniq),
           "unexpected": len(uniq - set(range(total)))}
    if reference is not None:
        res["equal_to_reference"] = bool(table.select(reference.column_names).equals(reference))
    return res


# -- the four runs ---------------------------------------------------------------------------


def _killed_common(d: Path, log: dict[str, Any], start1: float, to_kill: float, start2: float,
                   resumed: float) -> dict[str, Any]:
    before, after = log["before"], log["after"]
    return {
        "seconds": round(to_kill + resumed, 2), "to_kill_s": round(to_kill, 2), "resumed_s": round(resumed, 2),
        "killed_phases": phases(before, start1, to_kill), "resumed_phases": phases(after, start2, resumed),
        "executions_cut_by_kill": len(log["cut"]), "stray_executions": log["stray"],
        "duplicate_executions": duplicates(before) + duplicates(after),
        "stage_cpu_s_before_kill": cpu_s(before), "stage_cpu_s_resumed": cpu_s(after),
        **repeated(before, after),
    }


def tierflow_full(d: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    manifest = write_tierflow(d, data, a.block_rows, a.cpus)
    start, secs = run_to_end(tierflow_cmd(manifest, a.address), d, "run", a.engine)
    execs = read_log(d)
    rep = json.loads((d / ".tierflow" / PIPELINE / "report.json").read_text())
    return {"seconds": round(secs, 2), "executor_s": rep["elapsed_s"], "stage_cpu_s": cpu_s(execs),
            "duplicate_executions": duplicates(execs), **phases(execs, start, secs)}


def tierflow_killed(d: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    manifest = write_tierflow(d, data, a.block_rows, a.cpus)
    need = int(a.blocks * a.kill_fraction)
    cmd = tierflow_cmd(manifest, a.address)
    start1, to_kill, kill_wall = run_until(cmd, d, "killed", a.engine,
                                           lambda: len(tf_journal(d).get("parts", {})) >= need)
    at_kill = tf_journal(d)
    committed = tf_committed_pairs(at_kill)
    out = d / "out"
    part_files = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} if out.is_dir() else {}
    journaled_parts = {v[0] for v in at_kill.get("parts", {}).values()}
    start2, resumed = run_to_end(cmd, d, "resumed", a.engine)
    log = split_log(d, kill_wall, start2)
    redone = sorted({(e["stage"], e["runs"][0][0] // a.block_rows) for e in log["after"]
                     if (e["stage"], e["runs"][0][0] // a.block_rows) in committed})
    rewritten = sorted(n for n in journaled_parts
                       if n in part_files and (out / n).stat().st_mtime_ns != part_files[n])
    rep = json.loads((d / ".tierflow" / PIPELINE / "report.json").read_text())
    return {
        **_killed_common(d, log, start1, to_kill, start2, resumed),
        "resumed_executor_s": rep["elapsed_s"],
        "at_kill": {"parts_journaled": len(at_kill.get("parts", {})), "part_files": len(part_files),
                    "stage_blocks_held": {s: len(at_kill.get("stages", {}).get(s, {}).get("done", {}))
                                          for s in STAGES},
                    "committed_stage_blocks": len(committed)},
        "committed_blocks_redone": len(redone), "redone": [list(r) for r in redone],
        "committed_parts_rewritten": len(rewritten),
        "report_reexecutions": sum(s["reexecutions"] for s in rep["stages"]),
        "report": {s["name"]: {"executions": s["executions"], "reused": s["reused"]} for s in rep["stages"]},
    }


def raydata_full(d: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    write_raydata(d, data, a)
    start, secs = run_to_end(raydata_cmd(d), d, "run", a.engine)
    execs = read_log(d)
    return {"seconds": round(secs, 2), "stage_cpu_s": cpu_s(execs), "duplicate_executions": duplicates(execs),
            **phases(execs, start, secs)}


def raydata_killed(d: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    write_raydata(d, data, a)
    need = int(a.blocks * a.block_rows * a.kill_fraction)
    progress = RdProgress(d)
    start1, to_kill, kill_wall = run_until(raydata_cmd(d), d, "killed", a.engine, lambda: progress.rows() >= need)
    rows_at_kill = progress.rows()
    ids_at_kill = progress.ids()
    start2, resumed = run_to_end(raydata_cmd(d), d, "resumed", a.engine)
    log = split_log(d, kill_wall, start2)
    return {
        **_killed_common(d, log, start1, to_kill, start2, resumed),
        "at_kill": {"rows_committed": rows_at_kill, "ids_committed": len(ids_at_kill)},
        "committed_rows_redone": sum(len(ids_at_kill & _ids([e])) for e in log["after"]),
    }


# -- summary ---------------------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3) if xs else float("nan")


def summarize(passes: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in systems:
        full = [p[f"{s}_full"] for p in passes]
        k = [p[f"{s}_killed"] for p in passes]
        out[s] = {
            "uninterrupted_s": _med([x["seconds"] for x in full]),
            "killed_resumed_s": _med([x["seconds"] for x in k]),
            "to_kill_s": _med([x["to_kill_s"] for x in k]), "resumed_s": _med([x["resumed_s"] for x in k]),
            "uninterrupted_startup_s": _med([x["startup_s"] for x in full]),
            "uninterrupted_stages_s": _med([x["stages_s"] for x in full]),
            "uninterrupted_tail_s": _med([x["tail_s"] for x in full]),
            "killed_startup_s": _med([x["killed_phases"]["startup_s"] for x in k]),
            "killed_stages_s": _med([x["killed_phases"]["stages_s"] for x in k]),
            "killed_tail_s": _med([x["killed_phases"]["tail_s"] for x in k]),
            "resumed_startup_s": _med([x["resumed_phases"]["startup_s"] for x in k]),
            "resumed_stages_s": _med([x["resumed_phases"]["stages_s"] for x in k]),
            "resumed_tail_s": _med([x["resumed_phases"]["tail_s"] for x in k]),
            "ratio_median": _med([p[f"{s}_ratio"] for p in passes]),
            "ratios": [p[f"{s}_ratio"] for p in passes],
            "ratio_of_medians": round(_med([x["seconds"] for x in k]) / _med([x["seconds"] for x in full]), 3),
            "kill_at_fraction_of_uninterrupted": [round(x["to_kill_s"] / f["seconds"], 2) for x, f in zip(k, full)],
            "stage_cpu_s_uninterrupted": _med([x["stage_cpu_s"] for x in full]),
            "stage_cpu_s_killed_resumed": _med([x["stage_cpu_s_before_kill"] + x["stage_cpu_s_resumed"] for x in k]),
            "stage_executions_repeated": [x["stage_executions_repeated"] for x in k],
            "cpu_s_repeated": [x["cpu_s_repeated"] for x in k],
            "executions_cut_by_kill": [x["executions_cut_by_kill"] for x in k],
            "duplicate_executions": [x["duplicate_executions"] for x in full + k],
            "outputs_ok": all(
                x["output"]["lost"] == x["output"]["duplicated"] == x["output"]["unexpected"] == 0
                and x["output"].get("equal_to_reference", True) for x in full + k),
        }
        if s == "tierflow":
            out[s]["committed_blocks_redone"] = [x["committed_blocks_redone"] for x in k]
            out[s]["committed_parts_rewritten"] = [x["committed_parts_rewritten"] for x in k]
            out[s]["parts_journaled_at_kill"] = [x["at_kill"]["parts_journaled"] for x in k]
        else:
            out[s]["committed_rows_redone"] = [x["committed_rows_redone"] for x in k]
            out[s]["rows_committed_at_kill"] = [x["at_kill"]["rows_committed"] for x in k]
    if "tierflow" in out:
        out["resume_time_ratio"] = out["tierflow"]["ratio_median"]
        out["committed_blocks_redone"] = sum(out["tierflow"]["committed_blocks_redone"])
    if "raydata" in out:
        out["raydata_resume_time_ratio"] = out["raydata"]["ratio_median"]
    return out


def print_table(summary: dict[str, Any], systems: list[str]) -> None:
    print()
    print(f"{'system':9s} {'uninterrupted s':>15s} {'killed+resumed s':>16s} {'(to kill + resumed)':>20s} "
          f"{'ratio':>6s}  {'committed redone':>16s}  stage executions repeated")
    for s in systems:
        x = summary[s]
        committed = x.get("committed_blocks_redone", x.get("committed_rows_redone", []))
        unit = "blocks" if s == "tierflow" else "rows"
        split = f"({x['to_kill_s']:.1f} + {x['resumed_s']:.1f})"
        print(f"{s:9s} {x['uninterrupted_s']:15.1f} {x['killed_resumed_s']:16.1f} {split:>20s} "
              f"{x['ratio_median']:6.2f}  {f'{sum(committed)} {unit}':>16s}  {x['stage_executions_repeated']} per pass")
    print()
    for s in systems:
        x = summary[s]
        print(f"{s}: ratios per pass {x['ratios']}, killed at {x['kill_at_fraction_of_uninterrupted']} of the "
              f"uninterrupted time")
        print(f"  uninterrupted  = start-up {x['uninterrupted_startup_s']:.1f} + stages "
              f"{x['uninterrupted_stages_s']:.1f} + tail {x['uninterrupted_tail_s']:.1f} s")
        print(f"  killed         = start-up {x['killed_startup_s']:.1f} + stages {x['killed_stages_s']:.1f} + "
              f"until the kill {x['killed_tail_s']:.1f} s")
        print(f"  resumed        = start-up {x['resumed_startup_s']:.1f} + stages {x['resumed_stages_s']:.1f} + "
              f"tail {x['resumed_tail_s']:.1f} s")
        print(f"  stage CPU-s {x['stage_cpu_s_uninterrupted']:.1f} uninterrupted vs "
              f"{x['stage_cpu_s_killed_resumed']:.1f} killed+resumed; CPU-s redone {x['cpu_s_repeated']}; "
              f"executions cut by the kill {x['executions_cut_by_kill']}; outputs ok: {x['outputs_ok']}")
    if "tierflow" in summary:
        print(f"resume_time_ratio {summary['resume_time_ratio']} (target <= 1.10), committed_blocks_redone "
              f"{summary['committed_blocks_redone']} (target 0)")
    if "raydata" in summary:
        print(f"raydata_resume_time_ratio {summary['raydata_resume_time_ratio']}")
    print(f"whole benchmark: {summary['wall_s']:.0f} s")


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_raydata":
        raydata_driver(Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--block-rows", type=int, default=500)
    ap.add_argument("--cpus", type=int, default=3)
    ap.add_argument("--kill-fraction", type=float, default=0.5)
    ap.add_argument("--systems", default="tierflow,raydata")
    ap.add_argument("--standing-ray", action="store_true", help="every driver joins one long-lived Ray head")
    ap.add_argument("--engine", type=Path, default=ROOT, help="tierflow source tree to run")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.engine = a.engine.resolve()
    a.address = None
    systems = [s for s in a.systems.split(",") if s]
    os.environ["RAY_AUTH_MODE"] = "disabled"

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    used = subprocess.run([sys.executable, "-c", "import tierflow; print(tierflow.__file__)"], env=_env(a.engine),
                          cwd=work, capture_output=True, text=True, check=True).stdout.strip()
    if not used.startswith(str(a.engine) + os.sep):
        raise SystemExit(f"the runs would import tierflow from {used}, not from --engine {a.engine}")
    data = work / "data"
    make_data(data, a.blocks, a.block_rows)
    total = a.blocks * a.block_rows
    print(f"data: {a.blocks} files x {a.block_rows} rows in {data}; engine {a.engine}; {a.cpus} logical CPUs "
          f"per Ray on {os.cpu_count()} cores; {'one standing Ray head' if a.standing_ray else 'embedded Ray'}",
          flush=True)

    runs = {"tierflow": {"full": tierflow_full, "killed": tierflow_killed},
            "raydata": {"full": raydata_full, "killed": raydata_killed}}
    order = [(s, m) for s in systems for m in ("full", "killed")]
    passes: list[dict[str, Any]] = []
    try:
        with standing_ray(a.cpus, work) if a.standing_ray else contextlib.nullcontext() as address:
            a.address = address
            for p in range(a.passes):
                res: dict[str, Any] = {}
                for system, mode in (order if p % 2 == 0 else order[::-1]):
                    d = work / f"p{p}-{system}-{mode}"
                    t0, load0 = time.perf_counter(), os.getloadavg()[0]
                    r = runs[system][mode](d, data, a)
                    r["loadavg_1min"] = [round(load0, 1), round(os.getloadavg()[0], 1)]  # at start, at end
                    r["output"] = read_output(d / "out", system == "tierflow")
                    res[f"{system}_{mode}"] = r
                    split = f" (to kill {r['to_kill_s']:.1f} + resumed {r['resumed_s']:.1f})" if mode == "killed" else ""
                    print(f"pass {p} {system:8s} {mode:6s} {r['seconds']:6.1f} s{split}  "
                          f"[{time.perf_counter() - t0:.0f} s, load {r['loadavg_1min']}]", flush=True)
                reference = res["tierflow_full" if "tierflow_full" in res else f"{systems[0]}_full"]["output"]
                for r in res.values():
                    r["output"] = check_output(r["output"], total, reference)
                for system in systems:
                    res[f"{system}_ratio"] = round(res[f"{system}_killed"]["seconds"] / res[f"{system}_full"]["seconds"], 3)
                passes.append(res)
                if not a.keep:
                    for d in work.glob(f"p{p}-*"):
                        shutil.rmtree(d, ignore_errors=True)
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(passes, systems)
    summary["wall_s"] = round(time.perf_counter() - began, 1)
    print_table(summary, systems)
    if a.json:
        doc = {**summary, "passes": passes, "config": {
            "blocks": a.blocks, "block_rows": a.block_rows, "rows": total, "stages": STAGES, "reps": REPS,
            "cpus": a.cpus, "kill_fraction": a.kill_fraction, "passes": a.passes, "standing_ray": a.standing_ray},
            "machine": machine(), "engine": engine_info(a.engine),
            "command": " ".join(["tools/bench_resume.py", *sys.argv[1:]])}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
