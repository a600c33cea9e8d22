"""The Triton stage alone against a plain async tritonclient loop, same model, same load.

Command behind the "Triton stage" section of ``docs/throughput-benchmarks.md``::

    /tmp/venv/bin/python tools/bench_triton.py --json /tmp/bench-triton.json

Options: ``--models mlp_classifier,text_embedder``, ``--points 64x1,64x2,...`` (request
rows x requests in flight), ``--rounds N`` (default 5), ``--instances K`` (serve a copy of
``triton_models/`` with ``count: K`` in every instance group; default: as configured, 1),
``--target-s S`` (rows per measurement: about S seconds of work for the fastest system, default
0.8), ``--scale F`` (multiplies the table sizes), ``--no-shm``, ``--quick`` (2 rounds, S/4).

One ``tritonserver`` (the bundled one, ``TritonServer``) serves both models for the whole
run. At every point (model, batch rows ``B``, in-flight ``F``) three systems push the same
Arrow table through the same model, one after the other in each round, the order rotated
from round to round so a drift of the (shared, noisy) machine hits each of them:

==============  ============================================================================
system          what it does with the table
==============  ============================================================================
tierflow        ``TritonStageClient(url, model, inputs, outputs, batch_size=B,
                max_inflight=F).infer_table(table)``: the exact code a tierflow Triton stage
                runs (checked chunks, retries, responses validated against the model
                config, output columns appended to the table)
plain           the perf_analyzer method, minimal: inputs converted zero-copy from Arrow to
                NumPy once, cut into ``B``-row views, ``async_infer`` with a semaphore that
                keeps ``F`` requests in flight, outputs ``as_numpy`` and concatenated; no
                Arrow output, no validation, no retry
plain_shm       ``plain`` with system shared memory for inputs and outputs: one region
                registered once, one slot per in-flight request; inputs are copied into the
                slot, outputs copied out of it in the callback
==============  ============================================================================

Ratios are per round (``tierflow / plain`` rows/s of that round), then the median over
rounds; rows/s are medians over rounds. ``triton_ratio`` (in ``--json``) is the median
over every point of the per-point median ratio, with ``triton_ratio_min`` the worst point.

Also measured, once each: the Arrow -> NumPy conversion of the input columns (zero-copy
vs a copy vs a Python round trip), a request of more than ``max_batch_size`` rows (Triton
rejects it; ``TritonStageClient`` caps its chunks at ``max_batch_size``), and the server's
achieved batch size per system (``inference_count / execution_count`` from the model
statistics).

Shared memory vs gRPC (``--shm``), the command behind BENCHMARKS.md's "Same-host shared
memory" section::

    python tools/bench_triton.py --shm --json docs/bench-triton-shm.json

One server serves an identity model (FP32 ``[256]`` per row: 1 KiB in and 1 KiB out per
row). For each request size (``--shm-sizes``, input bytes per request, default 16 KiB to
16 MiB) two ``TritonStageClient``\ s with ``batch_size`` = that many rows push the same
table of several requests (about ``--shm-mib`` MiB in all, 4 to 200 requests):
``shm`` (``shared_memory="auto"``, no size threshold: every request through system shared
memory) and ``grpc`` (``shared_memory="off"``). They alternate within each round, the one
that goes first swapped from round to round; figures are medians over ``--rounds`` rounds of
the time per request, and the ratio is ``grpc / shm`` per round, then the median. The CPU
time per request (this process + the server and its stub processes) is measured too: on a
shared machine it is the steadier figure. Outputs are checked equal to the input (and
between the two) before timing.

This is a script, not a test: it is never collected by pytest.
"""

from __future__ import annotations

import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, triton_to_np_dtype

from _harness import ROOT, machine, parser, spread, write_json
from tierflow.triton.client import TritonStageClient
from tierflow.triton.convert import column_to_tensor
from tierflow.triton.repository import spec_from_config
from tierflow.triton.server import TritonServer

MODELS: dict[str, dict[str, Any]] = {
    "mlp_classifier": {
        "inputs": {"features": "FEATURES"},
        "outputs": {"PROBS": "probs", "LABEL": "label"},
        "rows": 600_000,
    },
    "text_embedder": {
        "inputs": {"text": "TEXT"},
        "outputs": {"EMBEDDING": "embedding"},
        "rows": 30_000,
    },
}
DEFAULT_POINTS = "64x1,64x2,64x4,256x1,256x2,256x4"
SYSTEMS = ("tierflow", "plain", "plain_shm")

WORDS = (
    "battery screen fast slow great terrible cheap pricey light heavy loud quiet sturdy flimsy "
    "bright dim warm cold sharp blurry smooth rough happy broken works returned love hate "
    "shipping box cable charger case lens strap button app update price quality"
).split()


# --------------------------------------------------------------------------- data


def make_table(model: str, rows: int, seed: int = 7) -> pa.Table:
    """The model's input column as a one-chunk Arrow table (what a stage receives)."""
    rng = np.random.default_rng(seed)
    if model == "mlp_classifier":
        feats = rng.standard_normal((rows, 16)).astype(np.float32)
        return pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), 16)})
    lengths = rng.integers(3, 25, size=rows)
    words = rng.choice(np.array(WORDS, dtype=object), size=int(lengths.sum()))
    texts, pos = [], 0
    for k in lengths:
        texts.append(" ".join(words[pos : pos + k]))
        pos += k
    return pa.table({"text": pa.array(texts, pa.string())})


def repo_with_instances(count: int, tmp: Path) -> Path:
    """A copy of ``triton_models/`` whose instance groups have ``count`` instances."""
    dst = tmp / "triton_models"
    shutil.copytree(ROOT / "triton_models", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for cfg in dst.glob("*/config.pbtxt"):
        text = cfg.read_text()
        cfg.write_text(text.replace("count: 1", f"count: {count}"))
    return dst


# --------------------------------------------------------------------------- the plain loop


def arrow_to_numpy(column: pa.ChunkedArray, dtype: str, dims: tuple[int, ...]) -> np.ndarray:
    """Zero-copy for a one-chunk fixed-size-list/numeric column; ``bytes`` objects for text."""
    arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    n = len(arr)
    if dtype == "BYTES":
        return arr.cast(pa.binary()).to_numpy(zero_copy_only=False).reshape(n, 1)
    # flatten() of a fixed-size list is a zero-copy slice of its values (honours offsets).
    values = arr.flatten() if pa.types.is_fixed_size_list(arr.type) else arr
    out = values.to_numpy(zero_copy_only=True)
    return out.reshape((n, *dims))


class PlainLoop:
    """A minimal async tritonclient loop at ``inflight`` requests of ``batch`` rows."""

    def __init__(
        self, url: str, model: str, inputs: dict[str, str], outputs: dict[str, str],
        batch: int, inflight: int, use_shm: bool = False,
    ) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.model, self.inputs, self.outputs = model, inputs, list(outputs)
        self.spec = spec_from_config(self.client.get_model_config(model).config)
        self.batch = min(batch, self.spec.max_batch_size)
        self.inflight = inflight
        self.use_shm = use_shm
        self.region: Any = None
        if use_shm:
            self._setup_shm()

    # -- shared memory: one region, one slot per in-flight request
    def _setup_shm(self) -> None:
        self.in_bytes = {}
        for tensor in self.inputs.values():
            s = self.spec.inputs[tensor]
            # BYTES: generous room for the serialised texts of one request.
            per_row = 4096 if s.dtype == "BYTES" else int(np.prod(s.dims)) * np.dtype(triton_to_np_dtype(s.dtype)).itemsize
            self.in_bytes[tensor] = per_row * self.batch
        self.out_bytes = {
            t: int(np.prod(self.spec.outputs[t].dims)) * np.dtype(triton_to_np_dtype(self.spec.outputs[t].dtype)).itemsize * self.batch
            for t in self.outputs
        }
        self.slot_bytes = sum(self.in_bytes.values()) + sum(self.out_bytes.values())
        self.region_name = f"bench-{os.getpid()}-{self.model}-{id(self)}"
        total = self.slot_bytes * self.inflight
        self.region = shm.create_shared_memory_region(self.region_name, "/" + self.region_name, total)
        self.client.register_system_shared_memory(self.region_name, "/" + self.region_name, total)

    def close(self) -> None:
        if self.region is not None:
            self.client.unregister_system_shared_memory(self.region_name)
            shm.destroy_shared_memory_region(self.region)
            self.region = None
        self.client.close()

    def run(self, table: pa.Table) -> dict[str, np.ndarray]:
        arrays = {
            tensor: arrow_to_numpy(table.column(col), self.spec.inputs[tensor].dtype, self.spec.inputs[tensor].dims)
            for col, tensor in self.inputs.items()
        }
        n = table.num_rows
        bounds = [(lo, min(lo + self.batch, n)) for lo in range(0, n, self.batch)]
        if self.use_shm:
            return self._run_shm(arrays, bounds)
        results: list[Any] = [None] * len(bounds)
        errors: list[Any] = []
        sem = threading.Semaphore(self.inflight)
        requested = [grpcclient.InferRequestedOutput(t) for t in self.outputs]

        def callback(i: int, result: Any, error: Any) -> None:
            if error is not None:
                errors.append(error)
            results[i] = result
            sem.release()  # nothing above can raise; a lost release would hang the loop

        for i, (lo, hi) in enumerate(bounds):
            sem.acquire()
            if errors:
                raise errors[0]
            infer_inputs = []
            for tensor, array in arrays.items():
                part = array[lo:hi]
                inp = grpcclient.InferInput(tensor, list(part.shape), self.spec.inputs[tensor].dtype)
                inp.set_data_from_numpy(part)
                infer_inputs.append(inp)
            self.client.async_infer(self.model, infer_inputs, callback=lambda result, error, i=i: callback(i, result, error),
                                    outputs=requested)
        for _ in range(self.inflight):
            sem.acquire()
        if errors:
            raise errors[0]
        return {t: np.concatenate([r.as_numpy(t) for r in results]) for t in self.outputs}

    def _run_shm(self, arrays: dict[str, np.ndarray], bounds: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        parts: dict[str, list[Any]] = {t: [None] * len(bounds) for t in self.outputs}
        errors: list[Any] = []
        free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for s in range(self.inflight):
            free.put(s)
        out_dtypes = {t: np.dtype(triton_to_np_dtype(self.spec.outputs[t].dtype)) for t in self.outputs}
        out_dims = {t: self.spec.outputs[t].dims for t in self.outputs}

        def callback(i: int, slot: int, rows: int, offsets: dict[str, int], result: Any, error: Any) -> None:
            try:
                if error is not None:
                    errors.append(error)
                else:
                    for t in self.outputs:  # copy out before the slot is reused
                        parts[t][i] = np.array(shm.get_contents_as_numpy(
                            self.region, out_dtypes[t], [rows, *out_dims[t]], offset=offsets[t]))
            except Exception as exc:  # noqa: BLE001 - surfaced by the submitting thread
                errors.append(exc)
            finally:
                free.put(slot)

        for i, (lo, hi) in enumerate(bounds):
            slot = free.get()
            if errors:
                raise errors[0]
            base = slot * self.slot_bytes
            infer_inputs = []
            for tensor, array in arrays.items():
                part = array[lo:hi]
                data = serialize_byte_tensor(part) if part.dtype == np.object_ else part
                nbytes = len(data.item()) if data.dtype == np.object_ else data.nbytes
                if nbytes > self.in_bytes[tensor]:
                    raise ValueError(f"{tensor}: {nbytes} bytes do not fit the {self.in_bytes[tensor]}-byte slot")
                shm.set_shared_memory_region(self.region, [data], offset=base)
                inp = grpcclient.InferInput(tensor, list(part.shape), self.spec.inputs[tensor].dtype)
                inp.set_shared_memory(self.region_name, nbytes, offset=base)
                infer_inputs.append(inp)
                base += self.in_bytes[tensor]
            requested, offsets = [], {}
            for t in self.outputs:
                out = grpcclient.InferRequestedOutput(t)
                out.set_shared_memory(self.region_name, self.out_bytes[t], offset=base)
                offsets[t] = base
                base += self.out_bytes[t]
                requested.append(out)
            self.client.async_infer(
                self.model, infer_inputs, outputs=requested,
                callback=lambda result, error, i=i, slot=slot, rows=hi - lo, offsets=offsets: callback(
                    i, slot, rows, offsets, result, error),
            )
        for _ in range(self.inflight):
            free.get()
        if errors:
            raise errors[0]
        return {t: np.concatenate(parts[t]) for t in self.outputs}


# --------------------------------------------------------------------------- measurements


def server_batch(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def conversion_costs(tables: dict[str, pa.Table], url: str, repeat: int = 7) -> list[dict[str, Any]]:
    """Arrow -> NumPy of each model's input column: zero-copy vs copy vs Python objects."""
    out = []
    ctl = grpcclient.InferenceServerClient(url)
    for model, table in tables.items():
        spec = spec_from_config(ctl.get_model_config(model).config)
        col_name, tensor = next(iter(MODELS[model]["inputs"].items()))
        col = table.column(col_name)
        ts = spec.inputs[tensor]
        ways: dict[str, Callable[[], Any]] = {
            "tierflow column_to_tensor": lambda: column_to_tensor(col, ts, model, col_name),
            "zero-copy (plain loop)": lambda: arrow_to_numpy(col, ts.dtype, ts.dims),
        }
        if ts.dtype == "BYTES":
            ways["to_pylist + encode"] = lambda: np.array([s.encode() for s in col.to_pylist()], dtype=object)
        else:
            ways["combine_chunks + flatten (copies)"] = lambda: col.combine_chunks().flatten().to_numpy().reshape(len(col), -1)
            ways["to_pylist -> np.array"] = lambda: np.array(col.to_pylist(), dtype=np.float32)
        for name, fn in ways.items():
            fn()
            secs = statistics.median(timed(fn) for _ in range(repeat))
            out.append({"model": model, "conversion": name, "rows": table.num_rows,
                        "ms": round(secs * 1e3, 4), "ns_per_row": round(secs / table.num_rows * 1e9, 3)})
    ctl.close()
    return out


def oversize_request(url: str) -> str:
    """What Triton says to a request larger than max_batch_size (no client-side cap)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("FEATURES", [512, 16], "FP32")
        inp.set_data_from_numpy(np.zeros((512, 16), np.float32))
        client.infer("mlp_classifier", [inp])
        return "accepted (unexpected)"
    except InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"
    finally:
        client.close()


def bench_point(url: str, model: str, table: pa.Table, batch: int, inflight: int, rounds: int,
                systems: tuple[str, ...], target_s: float) -> dict[str, Any]:
    cfg = MODELS[model]
    runners: dict[str, Callable[[pa.Table], Any]] = {}
    closers = []
    if "tierflow" in systems:
        tf = TritonStageClient(url, model, cfg["inputs"], cfg["outputs"], batch_size=batch, max_inflight=inflight)
        runners["tierflow"] = tf.infer_table
        closers.append(tf.close)
    for name in ("plain", "plain_shm"):
        if name in systems:
            loop = PlainLoop(url, model, cfg["inputs"], cfg["outputs"], batch, inflight, use_shm=name == "plain_shm")
            runners[name] = loop.run
            closers.append(loop.close)
    ctl = grpcclient.InferenceServerClient(url)
    try:
        return _bench_point(ctl, runners, model, table, batch, inflight, rounds, target_s)
    finally:
        for c in closers:
            c()
        ctl.close()


def _bench_point(ctl: Any, runners: dict[str, Callable[[pa.Table], Any]], model: str, table: pa.Table,
                 batch: int, inflight: int, rounds: int, target_s: float) -> dict[str, Any]:
    cfg = MODELS[model]
    warm = table.slice(0, min(table.num_rows, batch * inflight * 8))
    for fn in runners.values():
        fn(warm)
    # Rows per measurement: about target_s of work for the fastest system at this point
    # (estimated from one more pass over the warm-up rows), at most the whole table.
    rate = max(warm.num_rows / timed(partial(fn, warm)) for fn in runners.values())
    table = table.slice(0, int(min(table.num_rows, max(warm.num_rows, rate * target_s))))
    # Correctness: every system returns the same outputs for the same rows.
    ref_table = runners["tierflow"](warm) if "tierflow" in runners else None
    checks = {}
    for name in ("plain", "plain_shm"):
        if name in runners and ref_table is not None:
            got = runners[name](warm)
            ok = True
            for t, col in cfg["outputs"].items():
                ref = column_to_tensor(ref_table.column(col), spec_from_config(ctl.get_model_config(model).config).outputs[t], model, col)
                ok &= bool(np.allclose(ref.reshape(got[t].shape), got[t], atol=1e-6))
            checks[name] = ok
    secs: dict[str, list[float]] = {s: [] for s in runners}
    batches: dict[str, list[float]] = {s: [] for s in runners}
    order = list(runners)
    for r in range(rounds):
        rot = order[r % len(order):] + order[: r % len(order)]
        for name in rot:
            before = server_batch(ctl, model)
            secs[name].append(timed(lambda: runners[name](table)))
            after = server_batch(ctl, model)
            execs = after[1] - before[1]
            batches[name].append((after[0] - before[0]) / execs if execs else float("nan"))
    n = table.num_rows
    res: dict[str, Any] = {"model": model, "batch": batch, "inflight": inflight, "rows": n, "rounds": rounds,
                           "outputs_match": checks, "systems": {}}
    for name in runners:
        rates = [n / s for s in secs[name]]
        res["systems"][name] = {
            "rows_per_s": round(statistics.median(rates)),
            "min": round(min(rates)), "max": round(max(rates)),
            "server_batch": round(statistics.median(batches[name]), 1),
        }
    for name in ("plain", "plain_shm"):
        if name in runners and "tierflow" in runners:
            res[f"ratio_vs_{name}"] = spread(secs[name][i] / secs["tierflow"][i] for i in range(rounds))
    if "plain" in runners and "plain_shm" in runners:
        res["shm_vs_plain"] = spread(secs["plain"][i] / secs["plain_shm"][i] for i in range(rounds))
    return res


# --------------------------------------------------------------------------- shm vs gRPC

IDENTITY_WIDTH = 256  # FP32 per row: 1 KiB
IDENTITY_CONFIG = f"""
name: "identity"
backend: "python"
max_batch_size: 16384
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ {IDENTITY_WIDTH} ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ {IDENTITY_WIDTH} ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""
IDENTITY_MODEL = """
import triton_python_backend_utils as pb


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb.InferenceResponse(output_tensors=[pb.Tensor("Y", pb.get_input_tensor_by_name(r, "X").as_numpy())])
            for r in requests
        ]
"""
DEFAULT_SHM_SIZES = "16K,64K,128K,256K,1M,4M,16M"


def parse_size(text: str) -> int:
    """``"64K"`` -> 65536, ``"4M"`` -> 4194304, ``"512"`` -> 512."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def human(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def cpu_seconds(server_pid: int | None) -> float:
    """CPU seconds so far of this process plus the server and its model stub processes."""
    import psutil

    procs = [psutil.Process()]
    if server_pid is not None:
        server = psutil.Process(server_pid)
        procs += [server, *server.children(recursive=True)]
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def bench_shm(sizes: list[int], inflights: list[int], rounds: int, total_mib: float) -> list[dict[str, Any]]:
    """Shared memory vs gRPC through ``TritonStageClient``, per request size and in-flight.

    Besides wall time, the CPU time of the client and the server (with its stub processes)
    per request: on a shared machine the wall time also measures the neighbours, the CPU
    time only the work each way costs."""
    row_bytes = IDENTITY_WIDTH * 4
    tmp = Path(tempfile.mkdtemp(prefix="bench-triton-shm-"))
    (tmp / "identity" / "1").mkdir(parents=True)
    (tmp / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG)
    (tmp / "identity" / "1" / "model.py").write_text(IDENTITY_MODEL)
    out: list[dict[str, Any]] = []
    try:
        with TritonServer(tmp) as server:
            url = server.grpc_url
            for size in sizes:
                rows = max(1, size // row_bytes)
                requests = max(4, min(200, int(total_mib * (1 << 20)) // (rows * row_bytes)))
                x = np.random.default_rng(size).standard_normal((rows * requests, IDENTITY_WIDTH)).astype(np.float32)
                table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), IDENTITY_WIDTH)})
                for inflight in inflights:
                    clients = {
                        way: TritonStageClient(
                            url, "identity", {"x": "X"}, {"Y": "y"}, batch_size=rows, max_inflight=inflight,
                            shared_memory="auto" if way == "shm" else "off", shared_memory_min_bytes=0,
                        )
                        for way in ("shm", "grpc")
                    }
                    try:
                        got = {way: c.infer_table(table) for way, c in clients.items()}  # warm-up + check
                        same = got["shm"].equals(got["grpc"]) and np.array_equal(
                            got["shm"].column("y").combine_chunks().flatten().to_numpy().reshape(x.shape), x)
                        used = len(clients["shm"].shared_memory_regions(url))
                        del got
                        secs: dict[str, list[float]] = {"shm": [], "grpc": []}
                        cpu: dict[str, list[float]] = {"shm": [], "grpc": []}
                        for r in range(rounds):
                            for way in (("shm", "grpc") if r % 2 == 0 else ("grpc", "shm")):
                                c0 = cpu_seconds(server.pid)
                                secs[way].append(timed(partial(clients[way].infer_table, table)))
                                cpu[way].append(cpu_seconds(server.pid) - c0)
                    finally:
                        for c in clients.values():
                            c.close()
                    ratios = [g / s for g, s in zip(secs["grpc"], secs["shm"], strict=True)]
                    cpu_ratios = [g / s for g, s in zip(cpu["grpc"], cpu["shm"], strict=True) if s > 0]
                    res: dict[str, Any] = {
                        "request_bytes": rows * row_bytes, "rows_per_request": rows, "requests": requests,
                        "inflight": inflight, "rounds": rounds, "outputs_match": bool(same), "shm_regions": used,
                        "ms_per_request": {w: round(statistics.median(v) / requests * 1e3, 3) for w, v in secs.items()},
                        "mib_per_s": {w: round(rows * row_bytes * requests / statistics.median(v) / (1 << 20), 1)
                                      for w, v in secs.items()},
                        "grpc_over_shm": spread(ratios, 2),
                        "cpu_ms_per_request": {w: round(statistics.median(v) / requests * 1e3, 3) for w, v in cpu.items()},
                        "cpu_grpc_over_shm": round(statistics.median(cpu_ratios), 2) if cpu_ratios else None,
                    }
                    out.append(res)
                    ms, mb, q = res["ms_per_request"], res["mib_per_s"], res["grpc_over_shm"]
                    cms = res["cpu_ms_per_request"]
                    print(f"{human(rows * row_bytes):>8s} F={inflight}  shm {ms['shm']:8.2f} ms ({mb['shm']:7.1f} MiB/s)"
                          f"  grpc {ms['grpc']:8.2f} ms ({mb['grpc']:7.1f} MiB/s)  grpc/shm {q['median']:5.2f}"
                          f" ({q['min']:.2f}-{q['max']:.2f})  cpu ms shm {cms['shm']:.2f} grpc {cms['grpc']:.2f}"
                          f" grpc/shm {res['cpu_grpc_over_shm']}  match {same}  regions {used}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = parser(__doc__, "write every figure and the ratios here")
    ap.add_argument("--models", default="mlp_classifier,text_embedder")
    ap.add_argument("--points", default=DEFAULT_POINTS, help="BATCHxINFLIGHT,...")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--instances", type=int, default=0, help="instance count per model (0 = as configured)")
    ap.add_argument("--target-s", type=float, default=0.8,
                    help="rows per measurement: about this many seconds of work (capped by the table)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the table sizes")
    ap.add_argument("--no-shm", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 rounds, a quarter of the rows")
    ap.add_argument("--shm", action="store_true",
                    help="instead: shared memory vs gRPC through TritonStageClient, per request size")
    ap.add_argument("--shm-sizes", default=DEFAULT_SHM_SIZES, help="input bytes per request, e.g. 1M,4M,16M")
    ap.add_argument("--shm-inflight", default="1,2", help="requests in flight, e.g. 1,2")
    ap.add_argument("--shm-mib", type=float, default=48.0, help="MiB of input per measurement (4 to 200 requests)")
    args = ap.parse_args()
    if args.shm:
        rounds = 2 if args.quick else args.rounds
        report_shm: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:]}
        t0 = time.perf_counter()
        report_shm["shm_vs_grpc"] = bench_shm(
            [parse_size(x) for x in args.shm_sizes.split(",") if x],
            [int(x) for x in args.shm_inflight.split(",") if x], rounds, args.shm_mib / (4 if args.quick else 1))
        report_shm["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_json(args.json, report_shm)
        return
    if args.quick:
        args.rounds, args.target_s = 2, args.target_s / 4
    models = [m for m in args.models.split(",") if m]
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",") if p]
    systems = tuple(s for s in SYSTEMS if not (args.no_shm and s == "plain_shm"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    repo = repo_with_instances(args.instances, tmp) if args.instances else ROOT / "triton_models"
    report: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:], "instances": args.instances or 1}
    t_start = time.perf_counter()
    try:
        with TritonServer(repo, models=models) as server:
            report["server_startup_s"] = round(server.startup_s or 0.0, 2)
            url = server.grpc_url
            tables = {m: make_table(m, max(1000, int(MODELS[m]["rows"] * args.scale))) for m in models}
            report["conversion"] = conversion_costs(tables, url)
            if "mlp_classifier" in models:
                report["oversize_request"] = oversize_request(url)
            report["points"] = []
            for model in models:
                for batch, inflight in points:
                    res = bench_point(url, model, tables[model], batch, inflight, args.rounds, systems,
                                              args.target_s)
                    report["points"].append(res)
                    s = res["systems"]
                    line = (f"{model:15s} B={batch:<4d} F={inflight:<2d} tierflow {s['tierflow']['rows_per_s']:>8,d} "
                            f"plain {s['plain']['rows_per_s']:>8,d}")
                    if "plain_shm" in s:
                        line += f" plain_shm {s['plain_shm']['rows_per_s']:>8,d}"
                    line += f"  tierflow/plain {res['ratio_vs_plain']['median']:.3f} ({res['ratio_vs_plain']['min']:.2f}-{res['ratio_vs_plain']['max']:.2f})"
                    if "shm_vs_plain" in res:
                        line += f"  shm/plain {res['shm_vs_plain']['median']:.3f}"
                    line += f"  server batch {s['tierflow']['server_batch']}/{s['plain']['server_batch']}"
                    print(line, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [p["ratio_vs_plain"]["median"] for p in report["points"]]
    report["triton_ratio"] = round(statistics.median(ratios), 3)
    report["triton_ratio_min"] = round(min(ratios), 3)
    shm_r = [p["shm_vs_plain"]["median"] for p in report["points"] if "shm_vs_plain" in p]
    if shm_r:
        report["shm_vs_plain_median"] = round(statistics.median(shm_r), 3)
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print(f"triton_ratio (median over points) {report['triton_ratio']:.3f}, worst point {report['triton_ratio_min']:.3f}"
          + (f"; shm/plain median {report['shm_vs_plain_median']:.3f}" if shm_r else ""))
    for c in report["conversion"]:
        print(f"  convert {c['model']:15s} {c['conversion']:36s} {c['ms']:>9.3f} ms for {c['rows']:,} rows")
    if "oversize_request" in report:
        print(f"  512-row request to mlp_classifier (max_batch_size 256): {report['oversize_request']}")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
