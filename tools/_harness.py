"""What the benchmarks and tools in this folder share, so each script holds only what it
measures.

* paths: importing this module puts the checkout on ``sys.path`` (after ``PYTHONPATH``, so
  an engine put there first is the one measured); ``worker_env()`` is the ``runtime_env``
  that gives Ray workers the same (``tools/`` for stage code, the checkout for tierflow);
  ``load_module()`` imports a file by path (an example script, a Triton ``model.py``).
* the record: ``parser()`` (description from the docstring, ``--json PATH``),
  ``write_json()``, ``machine()`` (the hardware and versions behind a figure),
  ``engine_info()`` (which tierflow ran), ``spread()`` (median / min / max).
* data: ``write_parquet_parts()`` (a generator per part, files named in order) and
  ``id_check()`` (lost / duplicated / unexpected ids of an output).
* the Ray Data baselines: ``raydata_context()`` (the reader and progress settings every
  comparison uses) and ``TritonUDF`` / ``infer_mlp()`` (the model stage a careful Ray Data
  user writes: a plain ``tritonclient`` with requests in flight).

A cluster on one machine for the multi-node benchmarks is ``tierflow.testing.LocalCluster``.

Nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: an engine put there first is the one measured

__all__ = [
    "ROOT", "TOOLS", "TritonUDF", "engine_info", "id_check", "infer_mlp", "load_module", "machine",
    "parser", "raydata_context", "spread", "worker_env", "write_json", "write_parquet_parts",
]


# --------------------------------------------------------------------------- paths


def worker_env(*extra: str) -> dict[str, Any]:
    """A Ray ``runtime_env`` whose workers import stage code from ``tools/`` (and ``extra``)
    and tierflow from this checkout; also sets this process's ``PYTHONPATH`` to match, for
    drivers started later (an embedded Ray reads it)."""
    path = os.pathsep.join(p for p in (*extra, str(TOOLS), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ["PYTHONPATH"] = path
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return {"env_vars": {"PYTHONPATH": path, "RAY_AUTH_MODE": "disabled"}}


def load_module(path: Path, name: str) -> ModuleType:
    """Import the file ``path`` as module ``name`` (not put in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- the record


def parser(doc: str | None, json_help: str = "write every figure here as JSON") -> argparse.ArgumentParser:
    """An ``ArgumentParser`` described by the first line of ``doc`` (the script's
    docstring, shown whole under ``--help``), with ``--json PATH`` (``args.json``)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help=json_help)
    return ap


def write_json(path: str | os.PathLike[str] | None, doc: Any) -> None:
    """Write ``doc`` to ``path`` (directories made; nothing when ``path`` is None)."""
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(**extra: Any) -> dict[str, Any]:
    """The machine and library versions behind a figure (no import of Ray: read from the
    installed metadata). ``extra`` adds fields (e.g. ``lmdb=lmdb.version()``)."""
    info: dict[str, Any] = {"host": platform.node(), "cpu": "?", "cores": os.cpu_count(),
                            "python": platform.python_version(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    for package in ("ray", "pyarrow", "numpy"):
        info[package] = _version(package)
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return {**info, **extra}


def engine_info(engine: Path = ROOT) -> dict[str, Any]:
    """Which tierflow ran: where it was imported from, and the commit of ``engine`` (and
    whether its ``tierflow/`` had uncommitted changes)."""
    import tierflow

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(engine), *args], check=False, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    where, checkout = Path(tierflow.__file__).resolve().parent, engine.resolve()
    # relative to the checkout: results are committed, and this machine's paths mean nothing elsewhere
    imported = where.relative_to(checkout).as_posix() if where.is_relative_to(checkout) else None
    info: dict[str, Any] = {"tierflow": imported or "a copy outside the checkout", "commit": git("rev-parse", "HEAD"),
                            "tierflow_dirty": bool(git("status", "--porcelain", "--", "tierflow"))}
    stamp = where.parent / "ENGINE_COMMIT"  # a copy made by `git archive <commit> tierflow`
    if where != (checkout / "tierflow").resolve() and stamp.exists():
        info["engine_commit"] = stamp.read_text().strip()
    return info


def spread(values: Iterable[float], digits: int = 3) -> dict[str, float]:
    """Median, min and max of ``values``, rounded (what every table here reports: the
    median of rounds with its range, never the mean)."""
    vals = list(values)
    return {"median": round(statistics.median(vals), digits), "min": round(min(vals), digits),
            "max": round(max(vals), digits)}


# --------------------------------------------------------------------------- data


def write_parquet_parts(out: Path, rows: int, rows_per_file: int,
                        make: Callable[[int, int, np.random.Generator], pa.Table], *, seed: int = 0,
                        row_group: int | None = None, digits: int = 3) -> list[Path]:
    """Write ids ``0..rows`` as Parquet files of ``rows_per_file`` rows, in order
    (``part-000.parquet``, ...); ``make(lo, hi, rng)`` builds the rows ``lo..hi`` of a file,
    from one generator seeded once (so the data depends on ``seed`` alone)."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for f, lo in enumerate(range(0, rows, rows_per_file)):
        path = out / f"part-{f:0{digits}d}.parquet"
        pq.write_table(make(lo, min(rows, lo + rows_per_file), rng), path, row_group_size=row_group)
        paths.append(path)
    return paths


def id_check(ids: Any, expected: Any) -> dict[str, int]:
    """``rows``, ``lost`` (expected ids missing), ``duplicated`` (extra copies) and
    ``unexpected`` (ids not expected) of an output's id column."""
    got = np.asarray(ids)
    want = np.unique(np.asarray(expected))
    uniq, counts = np.unique(got, return_counts=True)
    return {"rows": int(len(got)), "lost": int(len(np.setdiff1d(want, uniq))),
            "duplicated": int((counts - 1).sum()), "unexpected": int(len(np.setdiff1d(uniq, want)))}


# --------------------------------------------------------------------------- the Ray Data baselines


def raydata_context(v1_reader: bool = True, plan_banner: bool = False) -> Any:
    """Ray Data's ``DataContext`` as every comparison here runs it: no progress bars, no
    plan banner (unless ``plan_banner``: the executed plan is logged), and (``v1_reader``)
    the V1 Parquet reader.

    The V1 reader makes one read block per file (or per ``override_num_blocks``), like
    tierflow's blocks. Ray 2.60's default V2 reader ignores ``override_num_blocks`` and
    buckets small files together: one input was read as ONE block in one task, which
    serialised every stage behind it, not what is compared.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = plan_banner
    if v1_reader:
        ctx.use_datasource_v2 = False
    return ctx


def infer_mlp(g: Any, client: Any, model: str, feats: np.ndarray, batch_size: int,
              max_inflight: int) -> tuple[pa.Array, pa.Array]:
    """``mlp_classifier`` on ``feats`` (n x 16 float32) with a plain tritonclient (module
    ``g``): requests of ``batch_size`` rows, ``max_inflight`` of them in flight with
    ``async_infer``. Returns the PROBS (fixed_size_list<float>[4]) and LABEL columns."""
    n = len(feats)
    bounds = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    results: list[Any] = [None] * len(bounds)
    errors: list[Any] = []
    sem = threading.Semaphore(max_inflight)
    requested = [g.InferRequestedOutput("PROBS"), g.InferRequestedOutput("LABEL")]

    def done(i: int, result: Any, error: Any) -> None:
        if error is not None:
            errors.append(error)
        results[i] = result
        sem.release()

    for i, (lo, hi) in enumerate(bounds):
        sem.acquire()
        if errors:
            raise RuntimeError(errors[0])
        inp = g.InferInput("FEATURES", [hi - lo, 16], "FP32")
        inp.set_data_from_numpy(feats[lo:hi])
        client.async_infer(model, [inp], outputs=requested,
                           callback=lambda result, error, i=i: done(i, result, error))
    for _ in range(max_inflight):
        sem.acquire()
    if errors:
        raise RuntimeError(errors[0])
    probs = np.concatenate([r.as_numpy("PROBS") for r in results])
    label = np.concatenate([r.as_numpy("LABEL") for r in results]).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), 4), pa.array(label)


class TritonUDF:
    """Ray Data's model stage: a callable class holding a tritonclient gRPC client.

    Written the way a careful Ray Data user would: client built once per actor, the batch
    cut into ``batch_size``-row requests (<= the model's max_batch_size), ``max_inflight``
    of them in flight with ``async_infer``, inputs converted zero-copy from Arrow (column
    ``column``, float32[16]), outputs appended as Arrow columns ``probs`` and ``label``.
    """

    def __init__(self, url: str, model: str, batch_size: int, max_inflight: int, column: str = "features") -> None:
        import tritonclient.grpc as grpcclient

        self.g = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model, self.column = model, column
        cfg = self.client.get_model_config(model).config
        self.batch_size = min(batch_size, cfg.max_batch_size)
        self.max_inflight = max_inflight

    def __call__(self, table: pa.Table) -> pa.Table:
        col = table[self.column]
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        feats = np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), 16))
        probs, label = infer_mlp(self.g, self.client, self.model, feats, self.batch_size, self.max_inflight)
        return table.append_column("probs", probs).append_column("label", label)
