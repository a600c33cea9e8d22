"""The run report end to end: a real pipeline on a real local Ray records telemetry into
report.json, serves it as Prometheus metrics while it runs, and ``tierflow report``
renders it into a page that headless Chromium draws (checked on the screenshot's pixels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from example_copy import make_example
from s3_endpoint import free_port
from tierflow.report import STAGE_COLORS, TIER_COLORS

ROWS, BLOCK_ROWS = 1200, 100
BLOCKS = ROWS // BLOCK_ROWS
CHROMIUM = "/usr/bin/chromium"

ALLOC_MIB = 200  # what each step of the slow stage holds while it runs
CODE = '''
import time

import numpy as np


def slow(t, seconds, alloc_mib):
    held = np.ones(alloc_mib * 2**20 // 8)  # every page written: resident
    time.sleep(seconds)
    del held
    return t


class Double:
    def __call__(self, t):
        return t.set_column(0, "id", t["id"])
'''

METRIC_NAMES = (
    "tierflow_stage_blocks", "tierflow_stage_blocks_done", "tierflow_stage_blocks_inflight",
    "tierflow_stage_blocks_queued", "tierflow_stage_rows_out_total", "tierflow_stage_executions_total",
    "tierflow_stage_retries_total", "tierflow_stage_reexecutions_total", "tierflow_stage_cpus_in_use",
    "tierflow_stage_gpus_in_use", "tierflow_cache_reads_total", "tierflow_cache_writes_total",
    "tierflow_cache_written_bytes_total", "tierflow_faults_total", "tierflow_workers_memory_bytes",
    "tierflow_driver_memory_bytes", "tierflow_run_elapsed_seconds", "tierflow_stage_backpressured",
    "tierflow_stage_workers", "tierflow_stage_memory_bytes", "tierflow_stage_memory_peak_bytes",
    "tierflow_stage_step_memory_peak_bytes", "tierflow_cache_read_bytes_total", "tierflow_cache_held_bytes",
    "tierflow_cache_spilled_bytes_total", "tierflow_cache_evicted_bytes_total",
)
MEMORY_TIER_BYTES = 4096  # a block's frame is ~1.1 KB: the workers' memory tiers evict after 3


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample of metric ``name`` with exactly these labels, from the exposition text."""
    want = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"  # as exposed: sorted
    for line in text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@dataclass
class Run:
    manifest: Path
    report: dict  # type: ignore[type-arg]
    scrapes: list[str]
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One real run of a 2-stage pipeline (a slow task stage kept as a checkpoint, an actor
    stage) with metrics on, scraped every 50 ms while it lasts; memory tiers small enough to
    evict."""
    ex = make_example(tmp_path_factory.mktemp("report") / "ex", rows=ROWS)
    (ex / "tele.py").write_text(CODE)
    port = free_port()
    doc = {
        "name": "tele",
        "source": {"format": "parquet", "path": "data/", "block_rows": BLOCK_ROWS, "columns": ["id"]},
        "stages": [
            {"name": "slow", "kind": "python", "fn": "tele:slow", "params": {"seconds": 0.3, "alloc_mib": ALLOC_MIB},
             "checkpoint": True},
            {"name": "double", "kind": "python", "cls": "tele:Double", "concurrency": 1},
        ],
        "sink": {"path": "out/", "mode": "overwrite"},
        "metrics": {"port": port, "host": "127.0.0.1"},
        "cache": {"memory_bytes": MEMORY_TIER_BYTES},
    }
    manifest = ex / "tele.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierflow", "run", "--quiet", str(manifest)],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    scrapes: list[str] = []
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        text = scrape(port)
        if text is not None:
            scrapes.append(text)
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=60)
    report = json.loads((ex / ".tierflow" / "tele" / "report.json").read_text())
    return Run(manifest, report, scrapes, proc.returncode, stderr)


@pytest.mark.ray
def test_report_timelines_end_at_the_committed_blocks(run: Run) -> None:
    assert run.returncode == 0, run.stderr
    tel = run.report["telemetry"]
    names = [s["name"] for s in tel["steps"]]
    assert names == ["slow", "double", "sink"] == [s["name"] for s in run.report["stages"]]
    for step, stage in zip(tel["steps"], run.report["stages"]):
        assert stage["blocks_done"] == BLOCKS
        assert step["done"][-1] == stage["blocks_done"], step["name"]
        assert step["rows_out"][-1] == stage["rows_out"] == ROWS
        assert len(step["t"]) == len(step["done"]) == len(step["cpus"]) >= 2
        assert step["t"] == sorted(step["t"]) and step["done"] == sorted(step["done"])
    slow, double, sink = tel["steps"]
    assert max(slow["cpus"]) > 0  # the slow stage was seen running
    assert slow["reads"] == {"source": BLOCKS}
    assert sum(double["reads"].values()) == sum(sink["reads"].values()) == BLOCKS
    # measured in the workers: one node, so every cache read is served on it (another
    # process wrote the block, so it comes from the node's LMDB rather than memory)
    assert set(double["reads"]) | set(sink["reads"]) <= {"memory", "local"}
    assert sum(double["read_bytes"].values()) > 0
    assert sum(w["count"] for w in slow["writes"].values()) >= BLOCKS
    assert sink["writes"]["sink"]["count"] == BLOCKS and sink["writes"]["sink"]["bytes"] > 0
    # held: the checkpoint's blocks stay (every copy written), the others were consumed
    assert slow["held"] == {"local": slow["writes"]["local"]["bytes"]} and slow["held"]["local"] > 0
    assert set(double["held"].values()) == {0} and double["spilled"] == 0
    # the actor read and wrote every block through a memory tier that holds three
    assert double["evicted"]["memory"] > 0 and "held_back" in double
    mem = tel["memory"]
    assert mem["t"] and min(mem["workers"]) >= 1 and min(mem["workers_rss"]) > 0 and min(mem["driver_rss"]) > 0


@pytest.mark.ray
def test_a_stage_holding_200_mib_per_step_shows_that_peak(run: Run) -> None:
    """The step's peak is measured in its worker: the most its RSS rose above where the step
    started (``step_memory_peak``), within 20 % of the 200 MiB the stage holds."""
    assert run.returncode == 0, run.stderr
    slow, double, _ = run.report["telemetry"]["steps"]
    want = ALLOC_MIB * 2**20
    assert 0.8 * want <= slow["step_memory_peak"] <= 1.2 * want, slow["step_memory_peak"] / 2**20
    assert slow["rss_peak"] >= slow["step_memory_peak"] + 20 * 2**20  # a worker's own baseline is on top
    assert double["step_memory_peak"] < 0.2 * want  # the stage that allocates nothing shows nothing like it
    # the actor's process is the double stage's to the end; the slow stage's task workers go
    # on to run sink steps and count there then, so only its sampled memory is checked
    assert double["workers"] >= 1 and max(slow["rss"]) > 0


@pytest.mark.ray
def test_metrics_endpoint_serves_the_documented_metrics_during_the_run(run: Run) -> None:
    assert run.returncode == 0, run.stderr
    assert run.report["telemetry"]["metrics_port"] is not None
    sampled = [s for s in run.scrapes if "tierflow_stage_blocks_done{" in s]
    assert sampled, f"no scrape with figures in {len(run.scrapes)} scrapes"
    last = sampled[-1]
    for name in METRIC_NAMES:
        assert f"\n{name}{{" in last or last.startswith(f"{name}{{"), name
    assert value(last, "tierflow_stage_blocks", pipeline="tele", stage="slow") == BLOCKS
    assert value(last, "tierflow_cache_reads_total", pipeline="tele", stage="slow", tier="source") is not None
    assert value(last, "tierflow_faults_total", pipeline="tele", kind="node_lost") == 0  # exported from 0
    # the figures added with the resource and cache tables, real and non-zero
    final = run.report["telemetry"]["steps"]
    slow = {"pipeline": "tele", "stage": "slow"}
    double = {"pipeline": "tele", "stage": "double"}

    def highest(name: str, **labels: str) -> float:
        return max(value(s, name, **labels) or 0.0 for s in sampled)

    assert highest("tierflow_stage_workers", **slow) >= 1
    assert highest("tierflow_stage_memory_bytes", **slow) > 20 * 2**20  # a Python worker's RSS, at least
    assert value(last, "tierflow_stage_memory_peak_bytes", **slow) >= ALLOC_MIB * 2**20
    assert 0.8 * ALLOC_MIB * 2**20 <= (value(last, "tierflow_stage_step_memory_peak_bytes", **slow) or 0)
    read = [value(last, "tierflow_cache_read_bytes_total", **double, tier=t) or 0.0 for t in ("memory", "local")]
    assert sum(read) > 0 and value(last, "tierflow_cache_read_bytes_total", **slow, tier="source")
    assert 0 < highest("tierflow_cache_held_bytes", **slow, tier="local") <= final[0]["held"]["local"]
    assert value(last, "tierflow_cache_held_bytes", **slow, tier="remote") == 0  # every tier exported
    assert value(last, "tierflow_cache_spilled_bytes_total", **slow) == 0  # one node, room on its LMDB
    assert 0 < highest("tierflow_cache_evicted_bytes_total", **double, tier="memory") <= final[1]["evicted"]["memory"]
    assert value(last, "tierflow_stage_backpressured", **slow) in (0, 1)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in METRIC_NAMES:
        assert name in readme, f"{name} is not documented in README.md"
    # what was served rose during the run and never passed the plan
    done = [value(s, "tierflow_stage_blocks_done", pipeline="tele", stage="sink") for s in sampled]
    assert all(d is not None and 0 <= d <= BLOCKS for d in done) and done == sorted(done)  # type: ignore[type-var]


@pytest.mark.ray
def test_report_command_renders_a_page_chromium_draws(run: Run, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "run.html"
    res = subprocess.run([sys.executable, "-m", "tierflow", "report", str(run.manifest), "-o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    png = screenshot(out, tmp_path)
    check_plots(png, [STAGE_COLORS[0], STAGE_COLORS[1], STAGE_COLORS[2]], [TIER_COLORS["source"]])


def test_report_of_a_synthetic_run_with_faults_draws_them(tmp_path: Path) -> None:
    """Without Ray: a report with a lost node and re-replications, three stages, memory."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    t = [float(i) for i in range(21)]
    steps = []
    for i, name in enumerate(("parse", "embed", "sink")):
        done = [min(20, max(0, k - 2 * i)) for k in range(21)]
        steps.append({
            "name": name, "t": t, "done": done, "rows_out": [d * 100 for d in done], "inflight": [2] * 21,
            "queued": [0] * 21, "cpus": [2.0 - i * 0.5] * 21, "gpus": [0.0] * 21,
            "held_bytes": [0] * 21 if name == "sink" else [2**20 * min(k, 25 - k) for k in range(21)],
            "evicted_bytes": [0] * 21 if name == "sink" else [2**19 * max(0, k - 10) for k in range(21)],
            "reads": {"source": 20} if i == 0 else {"local": 15, "peer": 4, "remote": 1},
            "writes": {"sink": {"count": 20, "bytes": 2**21}} if name == "sink" else
                      {"local": {"count": 20, "bytes": 2**22}, "peer": {"count": 20, "bytes": 2**22}},
        })
    report = {
        "pipeline": "synthetic", "status": "succeeded", "elapsed_s": 20.0, "blocks": 20, "rows_in": 2000,
        "rows_out": 2000, "nodes_lost": [{"node": "n2", "at_s": 8.0}],
        "stages": [{"name": s["name"], "blocks": 20, "blocks_done": 20} for s in steps],
        "telemetry": {
            "version": 1, "interval_s": 1.0, "steps": steps,
            "faults": [{"t": 8.0, "kind": "node_lost", "detail": "n2"},
                       {"t": 9.0, "kind": "rereplicated", "detail": "parse block 3"}],
            "fault_counts": {"node_lost": 1, "rereplicated": 1},
            "memory": {"scope": "driver host", "t": t[::5], "workers_rss": [2**28] * 5, "workers": [3] * 5,
                       "max_worker_rss": [2**27] * 5, "driver_rss": [2**27] * 5},
        },
    }
    src = tmp_path / "report.json"
    src.write_text(json.dumps(report))
    out = tmp_path / "page.html"
    res = subprocess.run([sys.executable, "-m", "tierflow", "report", str(src), "-o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    png = screenshot(out, tmp_path)
    check_plots(png, list(STAGE_COLORS[:3]), [TIER_COLORS[k] for k in ("source", "local", "peer", "remote")],
                held=True)
    # the lost node's dashed line and marker are drawn in the progress plot (top left)
    assert near(png[110:530, :590], "#D62728") > 20


def test_report_command_exit_codes(tmp_path: Path) -> None:
    missing = subprocess.run([sys.executable, "-m", "tierflow", "report", str(tmp_path / "nope.json")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.startswith("Error:") and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [\n")
    res = subprocess.run([sys.executable, "-m", "tierflow", "report", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr


# -- the screenshot --------------------------------------------------------------------


def screenshot(page: Path, tmp: Path) -> np.ndarray:
    """Headless Chromium's rendering of ``page`` (1200 x 1600), as an RGB array."""
    png = tmp / "shot.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}", f"--screenshot={png}", "--window-size=1200,1600",
        "--hide-scrollbars", "--virtual-time-budget=10000", page.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot: {res.stderr[-2000:]}"
    with Image.open(png) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def near(pixels: np.ndarray, color: str, tol: int = 12) -> int:
    """Pixels within ``tol`` of ``color`` in every channel."""
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(pixels - rgb).max(axis=-1) <= tol).sum())


def check_plots(img: np.ndarray, stage_colors: list[str], tier_colors: list[str], held: bool = False) -> None:
    """Each of the four plots (2 x 2 below the 110 px header) is drawn: many coloured
    (not white, not grey) pixels in each cell, every stage's colour in the top row, the
    tiers' colours in the cache plot; with ``held``, the fifth plot (held and evicted
    bytes, below the four) too, in the stages' colours."""
    assert img.shape[:2] == (1600, 1200)
    saturation = img.max(axis=-1) - img.min(axis=-1)
    cells = {
        "progress": (slice(110, 530), slice(0, 590)), "throughput": (slice(110, 530), slice(600, 1190)),
        "cache": (slice(530, 950), slice(0, 590)), "resources": (slice(530, 950), slice(600, 1190)),
    }
    if held:
        cells["held"] = (slice(950, 1370), slice(0, 590))
        for color in stage_colors[:2]:  # the sink holds nothing
            assert near(img[cells["held"]], color) > 100, f"stage colour {color} missing in the held-bytes plot"
    for name, (ys, xs) in cells.items():
        coloured = int((saturation[ys, xs] > 60).sum())
        assert coloured > 1500, f"{name} plot: {coloured} coloured pixels: not drawn?"
    for color in stage_colors:  # lines and legends of progress and throughput (lines may overlap)
        assert near(img[110:530], color) > 30, f"stage colour {color} missing in the progress/throughput plots"
    ys, xs = cells["cache"]
    for color in tier_colors:
        assert near(img[ys, xs], color) > 100, f"tier colour {color} missing in the cache plot"
    assert (saturation[1370:] > 60).sum() < (saturation[110:950] > 60).sum()  # the plots hold the colour
