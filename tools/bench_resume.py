"""Resume after a killed driver: tierflow vs Ray Data's ``CheckpointConfig``, same pipeline,
same machine, same run.

Command behind ``docs/resume-benchmark.md``::

    RAY_AUTH_MODE=disabled /tmp/venv/bin/python tools/bench_resume.py --json docs/resume-benchmark.json

For each pass, four runs on fresh directories (the order is reversed every other pass so
drifts of a shared machine hit both systems and both modes):

- **tierflow, uninterrupted**: ``python -m tierflow run --quiet manifest.yaml``.
- **tierflow, killed + resumed**: the same command, SIGKILLed (its whole process group,
  embedded Ray included) as soon as the journal says half of the sink parts are committed,
  then the same command again, which resumes.
- **Ray Data, uninterrupted** and **Ray Data, killed + resumed**: the same stage functions
  as ``map_batches`` (same batch size, same actor stage, same logical CPUs), reading the
  same Parquet and writing Parquet with
  ``DataContext.get_current().checkpoint_config = CheckpointConfig(id_column="id", ...)``;
  the driver is a subprocess of this script (``bench_resume.py _raydata RUNDIR``), killed
  the same way as soon as the committed checkpoint files hold half of the rows, then run
  again.

Every time is wall clock of whole processes: Python start-up, planning, Ray start-up and
shut-down are included. killed + resumed = time until the kill + time of the resumed run;
ratio = killed + resumed / uninterrupted of the same pass; the figure reported is the
median over passes.

Re-executions are counted outside both engines: every stage appends one line per
execution (stage, the ids it processed, start/end time, pid) to a log file from inside the
worker. After the resumed run:

- ``committed blocks redone`` (tierflow): executions after the kill of a (stage, block)
  the journal at the kill said was committed (a block's later committed output implies its
  earlier stages). Target 0.
- ``stage executions repeated`` (both): executions after the kill that processed rows the
  same stage had already finished processing before the kill, i.e. work thrown away.
  For Ray Data this is what it must redo (its checkpoint only knows written rows); for
  tierflow it is work finished but not yet journaled when the driver died.

Every output is checked: ids complete and unique, and all four outputs of a pass equal
(same rows, same values) to tierflow's uninterrupted output.

Options: ``--passes N`` (default 3), ``--blocks N`` (default 64), ``--block-rows N``
(default 500), ``--cpus N`` (logical CPUs of both embedded Rays, default 3 = what
tierflow's embedded Ray gives this pipeline on a 2-core machine), ``--systems
tierflow,raydata``, ``--kill-fraction F`` (default 0.5), ``--engine DIR`` (the tierflow
source tree to run, default this script's checkout), ``--workdir DIR`` (default a temp
dir, deleted unless ``--keep``), ``--json PATH``.

``--json`` writes ``resume_time_ratio``, ``committed_blocks_redone`` (sum over passes),
``raydata_resume_time_ratio``, plus every per-run figure.

This is a script, not a test: it is never collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "resume_bench"
STAGES = ["spectrum", "project", "embed", "assign", "summarize"]
# Work per stage, in repetitions of its NumPy kernel: ~60-80 ms of CPU per 500-row block
# each on one core of the development machine (AMD EPYC), ~4-5 CPU-s per stage at 64 blocks.
REPS = {"spectrum": 160, "project": 160, "embed": 68, "assign": 22, "summarize": 27}
DIM = 256
RUN_TIMEOUT_S = 300.0

# The stage code, written next to each manifest (tierflow imports stage modules from the
# manifest's directory) and put on the Ray Data workers' PYTHONPATH. Every function takes
# and returns a pyarrow Table, so both engines call exactly the same code.
STAGE_CODE = r'''
import os
import time

import numpy as np
import pyarrow as pa

DIM = @DIM@


def _vecs(t, col, dim):
    arr = t[col].combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def _fixed(arr):
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])


def _log(log, stage, t, t0, c0):
    """One line per execution: stage, rows, start, end, CPU seconds of this thread, pid,
    the ids as runs a-b."""
    ids = t["id"].to_numpy()
    if len(ids):
        cut = np.flatnonzero(np.diff(ids) != 1) + 1
        starts = np.concatenate([[0], cut])
        ends = np.concatenate([cut, [len(ids)]]) - 1
        runs = ",".join(f"{ids[a]}-{ids[b]}" for a, b in zip(starts, ends))
    else:
        runs = "-"
    cpu = time.thread_time() - c0
    line = f"{stage} {len(ids)} {t0:.4f} {time.time():.4f} {cpu:.4f} {os.getpid()} {runs}\n"
    with open(log, "a") as fh:
        fh.write(line)


def spectrum(t, log, reps):
    """Windowed log-magnitude spectrum of each row's signal (first 128 bins)."""
    t0, c0 = time.time(), time.thread_time()
    x = _vecs(t, "signal", DIM).astype(np.float64)
    win = np.hanning(DIM)
    for _ in range(reps):
        x = x - x.mean(axis=1, keepdims=True)
        spec = np.log1p(np.abs(np.fft.rfft(x * win, axis=1)))
    out = t.append_column("spec", _fixed(spec[:, :128]))
    _log(log, "spectrum", out, t0, c0)
    return out


def project(t, log, reps):
    """A fixed random tanh network over the spectrum."""
    t0, c0 = time.time(), time.thread_time()
    w = np.random.default_rng(1).standard_normal((128, 128)) / 12
    h = _vecs(t, "spec", 128).astype(np.float64)
    for _ in range(reps):
        h = np.tanh(h @ w)
    out = t.append_column("proj", _fixed(h))
    _log(log, "project", out, t0, c0)
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
        t0, c0 = time.time(), time.thread_time()
        h = _vecs(t, "proj", 128).astype(np.float64)
        for _ in range(self.reps):
            e = np.maximum(h @ self.w1, 0) @ self.w2
        e /= np.linalg.norm(e, axis=1, keepdims=True) + 1e-9
        out = t.append_column("emb", _fixed(e))
        _log(self.log, "embed", out, t0, c0)
        return out


def assign(t, log, reps, k=64):
    """Nearest of k fixed centroids, with a softmax confidence."""
    t0, c0 = time.time(), time.thread_time()
    c = np.random.default_rng(3).standard_normal((k, 64))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    e = _vecs(t, "emb", 64).astype(np.float64)
    for _ in range(reps):
        d = ((e[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
    p = np.exp(-d)
    p /= p.sum(axis=1, keepdims=True)
    out = t.append_column("cluster", pa.array(d.argmin(axis=1).astype(np.int32)))
    out = out.append_column("conf", pa.array(p.max(axis=1).astype(np.float32)))
    _log(log, "assign", out, t0, c0)
    return out


def summarize(t, log, reps):
    """Quantiles of each row's signal; keeps only the small output columns."""
    t0, c0 = time.time(), time.thread_time()
    x = _vecs(t, "signal", DIM)
    for _ in range(reps):
        q = np.quantile(x, [0.05, 0.5, 0.95], axis=1)
    out = t.select(["id", "cluster", "conf"])
    for name, row in zip(["q05", "q50", "q95"], q):
        out = out.append_column(name, pa.array(row.astype(np.float32)))
    _log(log, "summarize", out, t0, c0)
    return out
'''.replace("@DIM@", str(DIM))


# -- data and pipeline -----------------------------------------------------------------------


def make_data(d: Path, blocks: int, block_rows: int) -> None:
    """``blocks`` Parquet files of ``block_rows`` rows: id (int64, unique) and a noisy
    float32[256] signal, each file from its own seed (deterministic)."""
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
        ids = np.arange(b * n, (b + 1) * n, dtype=np.int64)
        table = pa.table({
            "id": ids,
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


def write_raydata(run_dir: Path, data: Path, blocks: int, block_rows: int, cpus: int) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "bench_stages.py").write_text(STAGE_CODE)
    cfg = {"data": str(data), "blocks": blocks, "batch_size": block_rows, "cpus": cpus,
           "out": str(run_dir / "out"), "checkpoint": str(run_dir / "checkpoint"),
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

    ray.init(address="local", num_cpus=cfg["cpus"], include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(run_dir)}})
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    # The V1 Parquet reader: one read task (one block) per file, like tierflow's blocks. The
    # default V2 reader buckets small files together (16 files became one 8,000-row block
    # and the whole pipeline one serial chain), which is not what is compared here.
    ctx.use_datasource_v2 = False
    ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=cfg["checkpoint"])
    ds = ray.data.read_parquet(cfg["data"], override_num_blocks=cfg["blocks"])
    for s in cfg["stages"]:
        if "cls" in s:
            ds = ds.map_batches(getattr(bench_stages, s["cls"]), fn_constructor_kwargs=s["params"],
                                batch_size=cfg["batch_size"], batch_format="pyarrow",
                                concurrency=s["concurrency"], num_cpus=s["num_cpus"])
        else:
            ds = ds.map_batches(getattr(bench_stages, s["fn"]), fn_kwargs=s["params"],
                                batch_size=cfg["batch_size"], batch_format="pyarrow", num_cpus=s["num_cpus"])
    ds.write_parquet(cfg["out"])
    ray.shutdown()


# -- running and killing ---------------------------------------------------------------------


def _env(engine: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(engine), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": path}


def tierflow_cmd(manifest: Path) -> list[str]:
    return [sys.executable, "-m", "tierflow", "run", "--quiet", str(manifest)]


def raydata_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_raydata", str(run_dir)]


def run_to_end(cmd: list[str], run_dir: Path, tag: str, engine: Path) -> tuple[float, float]:
    """Run ``cmd`` to completion; returns (start wall time, seconds). Raises on failure."""
    with open(run_dir / f"{tag}.stdout", "w") as out, open(run_dir / f"{tag}.stderr", "w") as err:
        t0_wall, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, env=_env(engine), cwd=run_dir, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RuntimeError(f"{tag} in {run_dir} ran past {RUN_TIMEOUT_S} s") from None
        seconds = time.perf_counter() - t0
    _wait_group_gone(proc.pid)
    if rc != 0:
        raise RuntimeError(f"{tag} in {run_dir} exited {rc}: {(run_dir / f'{tag}.stderr').read_text()[-3000:]}")
    return t0_wall, seconds


def run_until(cmd: list[str], run_dir: Path, tag: str, engine: Path, reached: Any) -> tuple[float, float]:
    """Start ``cmd``, SIGKILL its process group once ``reached()`` is true; returns
    (start wall time, seconds until the kill)."""
    with open(run_dir / f"{tag}.stdout", "w") as out, open(run_dir / f"{tag}.stderr", "w") as err:
        t0_wall, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, env=_env(engine), cwd=run_dir, stdout=out, stderr=err,
                                start_new_session=True)
        deadline = t0 + RUN_TIMEOUT_S
        while not reached():
            if proc.poll() is not None:
                raise RuntimeError(f"{tag} in {run_dir} ended (rc {proc.returncode}) before the kill point: "
                                   f"{(run_dir / f'{tag}.stderr').read_text()[-3000:]}")
            if time.perf_counter() > deadline:
                _kill_group(proc)
                raise RuntimeError(f"{tag} in {run_dir}: kill point not reached in {RUN_TIMEOUT_S} s")
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        _kill_group(proc)
    return t0_wall, seconds


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _wait_group_gone(proc.pid)


def _wait_group_gone(pgid: int, timeout_s: float = 60.0) -> None:
    """Wait until no process of the group is left (Ray's workers and daemons included),
    so a run never competes with the remains of the previous one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)  # stragglers of a run that has ended
    except ProcessLookupError:
        pass


# -- reading what happened -------------------------------------------------------------------


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """Executions in log order: stage, rows, t0, t1, pid, runs [(first id, last id)]."""
    try:
        text = (run_dir / "executions.log").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 7:
            continue  # a line torn by the kill
        stage, rows, t0, t1, cpu, pid, runs = parts
        spans = [] if runs == "-" else [tuple(int(x) for x in r.split("-")) for r in runs.split(",")]
        out.append({"stage": stage, "rows": int(rows), "t0": float(t0), "t1": float(t1), "cpu": float(cpu),
                    "pid": int(pid),
                    "runs": spans})
    return out


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
        hit = [e for e in execs if any(i in done for a, b in e["runs"] for i in range(a, b + 1))]
        rows = sum(len(done & _ids([e])) for e in hit)
        per_stage[stage] = {"executions": len(execs), "repeated": len(hit), "rows_repeated": rows,
                            "cpu_s_repeated": round(sum(e["cpu"] for e in hit), 2)}
    return {
        "stage_executions_repeated": sum(s["repeated"] for s in per_stage.values()),
        "rows_repeated": sum(s["rows_repeated"] for s in per_stage.values()),
        "cpu_s_repeated": round(sum(s["cpu_s_repeated"] for s in per_stage.values()), 2),
        "per_stage": per_stage,
    }


def phases(execs: list[dict[str, Any]], start_wall: float, seconds: float) -> dict[str, float]:
    """A process's wall time cut at its first stage execution's start and last one's end."""
    if not execs:
        return {"startup_s": round(seconds, 2), "stages_s": 0.0, "tail_s": 0.0}
    first = min(e["t0"] for e in execs) - start_wall
    last = max(e["t1"] for e in execs) - start_wall
    return {"startup_s": round(first, 2), "stages_s": round(last - first, 2), "tail_s": round(seconds - last, 2)}


def cpu_s(execs: list[dict[str, Any]]) -> float:
    """CPU seconds spent inside the stage functions (thread CPU time, not wall time)."""
    return round(sum(e["cpu"] for e in execs), 2)


def tf_journal(run_dir: Path) -> dict[str, Any]:
    try:
        path = run_dir / ".tierflow" / "store" / "_journal" / PIPELINE / "journal.json"
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, ValueError):
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


def rd_committed(run_dir: Path) -> tuple[int, set[int]]:
    """Rows (and their ids) in Ray Data's committed checkpoint files."""
    import pyarrow.parquet as pq

    ids: set[int] = set()
    rows = 0
    ckpt = run_dir / "checkpoint"
    if not ckpt.is_dir():
        return 0, ids
    for f in ckpt.glob("*.parquet"):
        if f.name.endswith(".pending.parquet"):
            continue
        t = pq.read_table(f)  # committed files are complete: renamed into place
        rows += t.num_rows
        ids.update(t.column(0).to_pylist())
    return rows, ids


class _RdProgress:
    """Committed checkpoint rows, reading each committed file once."""

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


def tierflow_full(d: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    manifest = write_tierflow(d, data, a.block_rows, a.cpus)
    start, secs = run_to_end(tierflow_cmd(manifest), d, "run", a.engine)
    execs = read_log(d)
    rep = json.loads((d / ".tierflow" / PIPELINE / "report.json").read_text())
    return {"seconds": round(secs, 2), "executor_s": rep["elapsed_s"], "stage_cpu_s": cpu_s(execs),
            **phases(execs, start, secs)}


def tierflow_killed(d: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    manifest = write_tierflow(d, data, a.block_rows, a.cpus)
    need = int(a.blocks * a.kill_fraction)
    start1, to_kill = run_until(tierflow_cmd(manifest), d, "killed", a.engine,
                                lambda: len(tf_journal(d).get("parts", {})) >= need)
    at_kill = tf_journal(d)
    before = read_log(d)
    committed = tf_committed_pairs(at_kill)
    out = d / "out"
    part_files = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} if out.is_dir() else {}
    journaled_parts = {v[0] for v in at_kill.get("parts", {}).values()}
    start2, resumed = run_to_end(tierflow_cmd(manifest), d, "resumed", a.engine)
    after = read_log(d)[len(before):]
    redone = sorted({(e["stage"], e["runs"][0][0] // a.block_rows) for e in after
                     if (e["stage"], e["runs"][0][0] // a.block_rows) in committed})
    rewritten = sorted(n for n in journaled_parts
                       if n in part_files and (out / n).stat().st_mtime_ns != part_files[n])
    rep = json.loads((d / ".tierflow" / PIPELINE / "report.json").read_text())
    return {
        "seconds": round(to_kill + resumed, 2), "to_kill_s": round(to_kill, 2), "resumed_s": round(resumed, 2),
        "killed_phases": phases(before, start1, to_kill), "resumed_phases": phases(after, start2, resumed),
        "resumed_executor_s": rep["elapsed_s"],
        "at_kill": {"parts_journaled": len(at_kill.get("parts", {})), "part_files": len(part_files),
                    "stage_blocks_held": {s: len(at_kill.get("stages", {}).get(s, {}).get("done", {}))
                                          for s in STAGES},
                    "committed_stage_blocks": len(committed)},
        "committed_blocks_redone": len(redone), "redone": [list(r) for r in redone],
        "committed_parts_rewritten": len(rewritten),
        "report_reexecutions": sum(s["reexecutions"] for s in rep["stages"]),
        "report": {s["name"]: {"executions": s["executions"], "reused": s["reused"]} for s in rep["stages"]},
        "stage_cpu_s_before_kill": cpu_s(before), "stage_cpu_s_resumed": cpu_s(after),
        **repeated(before, after),
    }


def raydata_full(d: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    write_raydata(d, data, a.blocks, a.block_rows, a.cpus)
    start, secs = run_to_end(raydata_cmd(d), d, "run", a.engine)
    execs = read_log(d)
    return {"seconds": round(secs, 2), "stage_cpu_s": cpu_s(execs), **phases(execs, start, secs)}


def raydata_killed(d: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    write_raydata(d, data, a.blocks, a.block_rows, a.cpus)
    need = int(a.blocks * a.block_rows * a.kill_fraction)
    progress = _RdProgress(d)
    start1, to_kill = run_until(raydata_cmd(d), d, "killed", a.engine, lambda: progress.rows() >= need)
    before = read_log(d)
    rows_at_kill, ids_at_kill = rd_committed(d)
    start2, resumed = run_to_end(raydata_cmd(d), d, "resumed", a.engine)
    after = read_log(d)[len(before):]
    committed_redone = sum(len(ids_at_kill & _ids([e])) for e in after)
    return {
        "seconds": round(to_kill + resumed, 2), "to_kill_s": round(to_kill, 2), "resumed_s": round(resumed, 2),
        "killed_phases": phases(before, start1, to_kill), "resumed_phases": phases(after, start2, resumed),
        "at_kill": {"rows_committed": rows_at_kill},
        "committed_rows_redone": committed_redone,
        "stage_cpu_s_before_kill": cpu_s(before), "stage_cpu_s_resumed": cpu_s(after),
        **repeated(before, after),
    }


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3) if xs else float("nan")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_raydata":
        raydata_driver(Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--block-rows", type=int, default=500)
    ap.add_argument("--cpus", type=int, default=3)
    ap.add_argument("--kill-fraction", type=float, default=0.5)
    ap.add_argument("--systems", default="tierflow,raydata")
    ap.add_argument("--engine", type=Path, default=ROOT, help="tierflow source tree to run")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.engine = a.engine.resolve()
    systems = [s for s in a.systems.split(",") if s]
    os.environ["RAY_AUTH_MODE"] = "disabled"

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data = work / "data"
    make_data(data, a.blocks, a.block_rows)
    total = a.blocks * a.block_rows
    used = subprocess.run([sys.executable, "-c", "import tierflow; print(tierflow.__file__)"], env=_env(a.engine),
                          cwd=work, capture_output=True, text=True, check=True).stdout.strip()
    if not used.startswith(str(a.engine) + os.sep):
        raise SystemExit(f"the runs would import tierflow from {used}, not from --engine {a.engine}")
    print(f"data: {a.blocks} files x {a.block_rows} rows in {data}; engine {a.engine}; "
          f"{a.cpus} logical CPUs per Ray on {os.cpu_count()} cores", flush=True)

    runs = {"tierflow": {"full": tierflow_full, "killed": tierflow_killed},
            "raydata": {"full": raydata_full, "killed": raydata_killed}}
    order = [(s, m) for s in systems for m in ("full", "killed")]
    passes: list[dict[str, Any]] = []
    try:
        for p in range(a.passes):
            res: dict[str, Any] = {}
            reference = None
            for system, mode in (order if p % 2 == 0 else order[::-1]):
                d = work / f"p{p}-{system}-{mode}"
                t0 = time.perf_counter()
                r = runs[system][mode](d, data, a)
                r["output"] = read_output(d / "out", system == "tierflow")
                res[f"{system}_{mode}"] = r
                print(f"pass {p} {system:8s} {mode:6s} {r['seconds']:6.1f} s"
                      + (f" (to kill {r['to_kill_s']:.1f} + resumed {r['resumed_s']:.1f})" if mode == "killed" else "")
                      + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
            ref_key = "tierflow_full" if "tierflow_full" in res else next(iter(res))
            reference = res[ref_key]["output"]
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
            "cpus": a.cpus, "kill_fraction": a.kill_fraction, "passes": a.passes},
            "machine": machine(), "engine": engine_info(a.engine),
            "command": " ".join(["tools/bench_resume.py", *sys.argv[1:]])}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.json}")


def summarize(passes: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in systems:
        full = [p[f"{s}_full"]["seconds"] for p in passes]
        killed = [p[f"{s}_killed"]["seconds"] for p in passes]
        ratios = [p[f"{s}_ratio"] for p in passes]
        k = [p[f"{s}_killed"] for p in passes]
        out[s] = {
            "uninterrupted_s": _med(full), "killed_resumed_s": _med(killed),
            "to_kill_s": _med([x["to_kill_s"] for x in k]), "resumed_s": _med([x["resumed_s"] for x in k]),
            "resumed_startup_s": _med([x["resumed_phases"]["startup_s"] for x in k]),
            "resumed_stages_s": _med([x["resumed_phases"]["stages_s"] for x in k]),
            "resumed_tail_s": _med([x["resumed_phases"]["tail_s"] for x in k]),
            "uninterrupted_startup_s": _med([p[f"{s}_full"]["startup_s"] for p in passes]),
            "ratio_median": _med(ratios), "ratios": ratios,
            "kill_at_fraction_of_uninterrupted": [round(x["to_kill_s"] / p[f"{s}_full"]["seconds"], 2)
                                                  for x, p in zip(k, passes)],
            "stage_cpu_s_uninterrupted": _med([p[f"{s}_full"]["stage_cpu_s"] for p in passes]),
            "stage_cpu_s_killed_resumed": _med([x["stage_cpu_s_before_kill"] + x["stage_cpu_s_resumed"] for x in k]),
            "ratio_of_medians": round(_med(killed) / _med(full), 3),
            "stage_executions_repeated": [x["stage_executions_repeated"] for x in k],
            "cpu_s_repeated": [x["cpu_s_repeated"] for x in k],
            "outputs_ok": all(
                r["output"]["lost"] == r["output"]["duplicated"] == r["output"]["unexpected"] == 0
                and r["output"].get("equal_to_reference", True)
                for p in passes for key, r in p.items() if key.startswith(s) and isinstance(r, dict)),
        }
        if s == "tierflow":
            out[s]["committed_blocks_redone"] = [x["committed_blocks_redone"] for x in k]
            out[s]["committed_parts_rewritten"] = [x["committed_parts_rewritten"] for x in k]
        else:
            out[s]["committed_rows_redone"] = [x["committed_rows_redone"] for x in k]
    if "tierflow" in out:
        out["resume_time_ratio"] = out["tierflow"]["ratio_median"]
        out["committed_blocks_redone"] = sum(out["tierflow"]["committed_blocks_redone"])
    if "raydata" in out:
        out["raydata_resume_time_ratio"] = out["raydata"]["ratio_median"]
    return out


def print_table(summary: dict[str, Any], systems: list[str]) -> None:
    print()
    print(f"{'system':10s} {'uninterrupted s':>15s} {'killed+resumed s':>16s} {'(to kill + resumed)':>20s} "
          f"{'ratio':>6s}  {'committed redone':>16s}  {'stage execs repeated':>20s}")
    for s in systems:
        x = summary[s]
        committed = x.get("committed_blocks_redone", x.get("committed_rows_redone"))
        unit = "blocks" if s == "tierflow" else "rows"
        print(f"{s:10s} {x['uninterrupted_s']:15.1f} {x['killed_resumed_s']:16.1f} "
              f"{'(' + format(x['to_kill_s'], '.1f') + ' + ' + format(x['resumed_s'], '.1f') + ')':>20s} "
              f"{x['ratio_median']:6.2f}  {str(sum(committed)) + ' ' + unit:>16s}  "
              f"{x['stage_executions_repeated']!s:>20s}")
    print()
    for s in systems:
        x = summary[s]
        print(f"{s}: per-pass ratios {x['ratios']}; resumed run = start-up {x['resumed_startup_s']:.1f} s + "
              f"stages {x['resumed_stages_s']:.1f} s + tail {x['resumed_tail_s']:.1f} s; uninterrupted start-up "
              f"{x['uninterrupted_startup_s']:.1f} s; killed at {x['kill_at_fraction_of_uninterrupted']} of "
              f"the uninterrupted time; stage CPU-s {x['stage_cpu_s_uninterrupted']:.1f} uninterrupted vs "
              f"{x['stage_cpu_s_killed_resumed']:.1f} killed+resumed, of it redone {x['cpu_s_repeated']}; "
              f"outputs ok: {x['outputs_ok']}")
    if "tierflow" in summary:
        print(f"resume_time_ratio {summary['resume_time_ratio']} (target <= 1.10), committed_blocks_redone "
              f"{summary['committed_blocks_redone']} (target 0)")
    if "raydata" in summary:
        print(f"raydata_resume_time_ratio {summary['raydata_resume_time_ratio']}")
    print(f"whole benchmark: {summary['wall_s']:.0f} s")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    import numpy
    import pyarrow
    import ray

    info.update({"ray": ray.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__})
    return info


def engine_info(engine: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(engine), *args], check=False, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"path": str(engine), "commit": git("rev-parse", "HEAD"),
            "tierflow_dirty": bool(git("status", "--porcelain", "--", "tierflow"))}


if __name__ == "__main__":
    main()
