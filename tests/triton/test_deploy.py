"""Triton deployed on the Ray cluster by tierflow (``tierflow.triton.deploy``).

The pure parts (where servers go, which endpoints a client uses) are tested without Ray.
The rest runs on one real 3-node ``ray.cluster_utils.Cluster`` for the whole module: a head
holding no CPU, GPU or ``triton_node``, and two workers declaring ``num_gpus=1`` and
``triton_node: 1``, serving the real ``triton_models/`` with the bundled tritonserver.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from tierflow.triton.deploy import (
    DeployedEndpoints,
    DeploymentError,
    DeploySpec,
    NodeView,
    check_reusable,
    eligible_nodes,
    placements,
    resource_report,
)
from tierflow.retry import RetryPolicy
from tierflow.triton.endpoints import EndpointPool

ROOT = Path(__file__).resolve().parents[2]
REPO = str(ROOT / "triton_models")
ROWS, BLOCK_ROWS = 2000, 100
FREE_BLOCKS = 6  # blocks that pass the gate before the test opens it


# --------------------------------------------------------------------------- pure logic


def spec(**kw: Any) -> DeploySpec:
    return DeploySpec("d", "/models", ("mlp_classifier",), **{"num_cpus": 0.0, **kw})


def node(node_id: str, total: dict[str, float], available: dict[str, float] | None = None,
         alive: bool = True) -> NodeView:
    return NodeView(node_id, "10.0.0.1", alive, total, total if available is None else available)


HEAD = node("head", {"CPU": 0})
GPU_A = node("a", {"CPU": 2, "GPU": 1, "triton_node": 1})
GPU_B = node("b", {"CPU": 2, "GPU": 1, "triton_node": 1})


def test_only_nodes_holding_every_resource_are_eligible() -> None:
    dead = node("c", {"GPU": 1}, alive=False)
    assert [n.node_id for n in eligible_nodes(spec(num_gpus=1), [HEAD, GPU_B, dead, GPU_A])] == ["a", "b"]
    assert eligible_nodes(spec(resources={"triton_node": 2}), [HEAD, GPU_A]) == []
    assert eligible_nodes(spec(num_cpus=4.0, num_gpus=1), [GPU_A]) == []  # CPUs count too


def test_per_node_fills_each_eligible_node_without_a_server() -> None:
    s = spec(replicas="per_node", resources={"triton_node": 1})
    assert placements(s, [HEAD, GPU_A, GPU_B], active=[]) == ["a", "b"]
    assert placements(s, [HEAD, GPU_A, GPU_B], active=["b"]) == ["a"]
    assert placements(s, [HEAD, GPU_A, GPU_B], active=["a", "b"]) == []
    # a server still unplaced (None) does not hold a node
    assert placements(s, [GPU_A], active=[None]) == ["a"]


def test_replicas_replace_only_what_is_missing_spread_over_nodes() -> None:
    s = spec(replicas=3, num_gpus=0.5)
    half_free = node("b", {"GPU": 1}, {"GPU": 0.5})
    assert placements(s, [HEAD, GPU_A, half_free], active=[]) == ["a", "b", "a"]
    # one of three lost: one replacement, on the node with fewer servers
    assert placements(s, [GPU_A, GPU_B], active=["a", "a"]) == ["b"]
    assert placements(s, [GPU_A, GPU_B], active=["a", "b", "a"]) == []
    # ties in count: the node that still has the demand free goes first
    busy_a = node("a", {"GPU": 1}, {"GPU": 0.0})
    assert placements(spec(replicas=1, num_gpus=0.5), [busy_a, GPU_B], active=[]) == ["b"]


def test_a_lost_node_is_not_chosen_and_a_failing_node_is_left_out() -> None:
    s = spec(replicas="per_node", num_gpus=1)
    lost_a = node("a", {"GPU": 1}, alive=False)
    assert placements(s, [lost_a, GPU_B], active=["b"]) == []  # only the survivor, which has one
    assert placements(s, [GPU_A, GPU_B], active=[], excluded={"a"}) == ["b"]
    assert placements(s, [GPU_A], active=[], excluded={"a"}) == []


def test_resource_report_names_each_node_and_what_it_has() -> None:
    report = resource_report(spec(resources={"triton_node": 1}), [HEAD, node("a", {"triton_node": 1}, {})])
    assert report.splitlines() == [
        "node a (10.0.0.1): triton_node 0 of 1 free",
        "node head (10.0.0.1): triton_node 0 of 0 free",
    ]
    assert spec(num_gpus=0.5, resources={"x": 1}).describe_demand() == "{GPU: 0.5, x: 1}"


def test_reuse_needs_same_repository_and_every_model() -> None:
    running = DeploySpec("d", "/models", ("mlp_classifier", "text_embedder"))
    check_reusable(DeploySpec("d", "/models", ("text_embedder",)), running)
    with pytest.raises(DeploymentError, match="does not load other"):
        check_reusable(DeploySpec("d", "/models", ("other",)), running)
    with pytest.raises(DeploymentError, match="serves /models, this run needs /elsewhere"):
        check_reusable(DeploySpec("d", "/elsewhere", ("text_embedder",)), running)


def test_deployed_endpoints_are_a_tuple_that_keeps_its_deployment_across_pickling() -> None:
    urls = pickle.loads(pickle.dumps(DeployedEndpoints(["h:1", "h:2"], "dep")))
    assert urls == ("h:1", "h:2") and urls.deployment == "dep"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pool_replace_keeps_health_of_endpoints_that_stay_and_prefers_local() -> None:
    clock = Clock()
    pool = EndpointPool(("a:1", "b:1"), factory=lambda url: object(), policy=RetryPolicy(), clock=clock)
    ep, epoch = pool.acquire()  # type: ignore[misc]
    pool.failed(ep, epoch, "UNAVAILABLE: gone")  # one strike: out for 1 s
    out = ep.url
    kept = "b:1" if out == "a:1" else "a:1"
    assert pool.replace([out, "c:1"], preferred=["c:1"])
    stats = {s.url: s for s in pool.stats()}
    assert set(stats) == {out, "c:1"}
    assert stats[out].state == "out" and stats[out].removals == 1  # its health stayed
    assert stats["c:1"].state == "healthy" and stats["c:1"].preferred
    # the preferred endpoint takes every call while it is available, even when busier
    picks = [pool.acquire() for _ in range(3)]
    assert [p[0].url for p in picks if p] == ["c:1"] * 3
    clock.now = 5.0  # cool-down over: still the preferred one first
    assert pool.acquire()[0].url == "c:1"  # type: ignore[index]
    assert not pool.replace([out, "c:1"], preferred=["c:1"])  # nothing changed
    assert kept not in {s.url for s in pool.stats()}
    assert pool.replace([], preferred=[]) and pool.acquire() is None and pool.all_out()


def test_client_set_endpoints_and_all_out_hook_bring_in_replacements() -> None:
    """A client whose only endpoint died asks its hook, which hands it the replacement."""
    from tierflow.triton.client import TritonStageClient

    calls: list[str] = []

    class Dead:
        def __init__(self, url: str) -> None:
            self.url = url

        def get_model_config(self, *a: Any, **k: Any) -> Any:
            calls.append(self.url)
            if self.url == "old:1":
                from tritonclient.utils import InferenceServerException

                raise InferenceServerException("connect failed", status="StatusCode.UNAVAILABLE")
            return "config"

        def close(self) -> None:
            pass

    client = TritonStageClient("old:1", "m", {"x": "X"}, {"Y": "y"}, client_factory=Dead,
                               retry=RetryPolicy(max_attempts=3, jitter=0.0), sleep=lambda s: None)
    client.on_all_out = lambda: client.set_endpoints(["new:1"])
    assert client._call(lambda c: c.get_model_config()) == "config"
    assert calls == ["old:1", "new:1"] and client.urls == ("new:1",)


def test_manifest_deploy_section_is_exclusive_and_checked() -> None:
    from tierflow.errors import ManifestError
    from tierflow.manifest import parse_manifest

    base = {"name": "p", "source": {"format": "parquet", "path": "d/"}, "sink": {"path": "o/"},
            "stages": [{"name": "s", "kind": "python", "fn": "m:f"}]}

    def problems(triton: dict[str, Any]) -> str:
        with pytest.raises(ManifestError) as info:
            parse_manifest({**base, "triton": triton})
        return str(info.value)

    assert "not both url and deploy" in problems({"url": "h:1", "deploy": {"num_gpus": 1}})
    assert "not both launch and deploy" in problems({"launch": True, "deploy": {}})
    assert "per_node needs 'resources' or 'num_gpus'" in problems({"deploy": {"replicas": "per_node"}})
    assert "replicas must be a positive integer or 'per_node', got 0" in problems({"deploy": {"replicas": 0}})
    assert "num_gpus / num_cpus" in problems({"deploy": {"resources": {"GPU": 1}}})
    assert "model repository once" in problems({"repository": "a", "deploy": {"repository": "b"}})
    m = parse_manifest({**base, "triton": {"deploy": {"replicas": "per_node", "num_gpus": 0.5,
                                                      "repository": "models"}}})
    assert m.triton.repository == "models" and m.triton.deploy and m.triton.deploy.num_gpus == 0.5


# --------------------------------------------------------------------------- on a cluster


STEPS = '''
import os
import time


def hold(t, gate, free_rows):
    """Blocks past ``free_rows`` wait until the test opens the gate."""
    deadline = time.monotonic() + 240
    while t["id"][0].as_py() >= free_rows and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return t
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, list[Any], Path]]:
    """``(ray Cluster, its worker nodes, the stage code's directory)``."""
    pytest.importorskip("ray")
    from tierflow.testing import LocalCluster

    code = tmp_path_factory.mktemp("code")
    (code / "deploy_steps.py").write_text(STEPS)
    gpu_node = {"num_gpus": 1, "resources": {"triton_node": 1}}
    with LocalCluster(nodes=2, cpus_per_node=2, pythonpath=[str(code)], node_args=gpu_node) as lc:
        yield lc.cluster, lc.workers, code


def pipeline(d: Path, name: str, deploy: dict[str, Any], gate: Path | None = None) -> Path:
    """A manifest (and its data) sending ``features`` through ``mlp_classifier``."""
    d.mkdir(parents=True)
    (d / "data").mkdir()
    rng = np.random.default_rng(7)
    features = rng.standard_normal((ROWS, 16), dtype=np.float32)
    table = pa.table({"id": pa.array(np.arange(ROWS, dtype=np.int64)),
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), 16)})
    pq.write_table(table, d / "data" / "part.parquet")
    stages: list[dict[str, Any]] = [
        {"name": "classify", "kind": "triton", "model": "mlp_classifier", "inputs": {"features": "FEATURES"},
         "outputs": {"PROBS": "probs", "LABEL": "label"}, "batch_size": 50, "concurrency": 2, "num_cpus": 0.25},
    ]
    if gate is not None:
        (d / "deploy_steps.py").write_text(STEPS)  # checked on the driver; workers import the module's copy
        stages.insert(0, {"name": "hold", "kind": "python", "fn": "deploy_steps:hold", "num_cpus": 0.25,
                          "concurrency": 4, "params": {"gate": str(gate), "free_rows": FREE_BLOCKS * BLOCK_ROWS}})
    doc = {
        "name": name,
        "source": {"format": "parquet", "path": "data/", "block_rows": BLOCK_ROWS},
        "stages": stages,
        "sink": {"path": "out/", "mode": "error"},
        "cache": {"dir": str(d / "cache-{node}"), "remote_url": f"file://{d}/durable", "replicas": 2},
        "triton": {"repository": REPO, "deploy": deploy},
    }
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def assert_output_is_the_models(d: Path, reference: Any) -> None:
    """Every row exactly once, with what the model's own forward() gives (a fault-free run)."""
    got = ds.dataset(d / "out", format="parquet", exclude_invalid_files=True).to_table().sort_by("id")
    ids = got["id"].to_pylist()
    assert ids == list(range(ROWS)), "missing, extra or duplicated rows"
    feats = got["features"].combine_chunks().values.to_numpy().reshape(ROWS, 16)
    want = reference("mlp_classifier").forward(feats)
    probs = got["probs"].combine_chunks().values.to_numpy().reshape(ROWS, 4)
    np.testing.assert_array_equal(probs, want["PROBS"])
    assert got["label"].to_pylist() == want["LABEL"].reshape(-1).tolist()


def pid_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.ray
@pytest.mark.triton
def test_a_resource_no_node_has_fails_fast_naming_it(cluster: Any) -> None:
    from tierflow.triton.deploy import find_deployment, start_deployment

    c, workers, _ = cluster
    t0 = time.monotonic()
    with pytest.raises(DeploymentError) as info:
        start_deployment(DeploySpec("nowhere", REPO, ("mlp_classifier",), resources={"tpu_pod": 1}))
    assert time.monotonic() - t0 < 5.0
    message = str(info.value)
    assert "no alive node holds {CPU: 1, tpu_pod: 1}" in message
    for n in [c.head_node, *workers]:  # every node it looked at, with what it has
        assert f"node {n.node_id[:12]} " in message
    assert "tpu_pod 0 of 0 free" in message
    assert find_deployment("nowhere") is None


BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise ValueError("weights file mlp.safetensors is missing")

    def execute(self, requests):
        return []
"""


@pytest.mark.ray
@pytest.mark.triton
def test_a_model_that_fails_to_load_is_named_with_tritons_reason(cluster: Any, tmp_path: Path) -> None:
    """Each server that could not load the model is left out (its node too: the same files
    fail there again); with none left, the deployment fails with Triton's own reason."""
    import shutil

    from tierflow.triton.deploy import find_deployment, start_deployment

    _, workers, _ = cluster
    repo = tmp_path / "models"
    (repo / "broken" / "1").mkdir(parents=True)
    config = (ROOT / "triton_models" / "mlp_classifier" / "config.pbtxt").read_text()
    (repo / "broken" / "config.pbtxt").write_text(config.replace('name: "mlp_classifier"', 'name: "broken"'))
    (repo / "broken" / "1" / "model.py").write_text(BROKEN_MODEL)
    shutil.copytree(ROOT / "triton_models" / "mlp_classifier", repo / "mlp_classifier")
    with pytest.raises(DeploymentError) as info:
        start_deployment(DeploySpec("broken", str(repo), ("mlp_classifier", "broken"), replicas=1,
                                    resources={"triton_node": 1}, num_cpus=0, startup_timeout_s=60))
    message = str(info.value)
    assert "model 'broken': failed to load" in message and "weights file mlp.safetensors is missing" in message
    # one try per node, then each node is left out
    assert "server 1: " in message and "server 2: " in message and "server 3: " not in message, message
    assert "left out after failed starts" in message
    assert all(w.node_id[:12] in message for w in workers)
    assert find_deployment("broken") is None


@pytest.mark.ray
@pytest.mark.triton
def test_cli_deployment_lands_on_resource_nodes_and_a_run_reuses_it(
    cluster: Any, tmp_path: Path, reference: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``tierflow triton deploy`` puts one server on each ``triton_node`` (not the head); a
    run naming the deployment uses those warm servers (none started, none lost) and
    leaves them running; ``undeploy`` stops them."""
    from click.testing import CliRunner

    from tierflow.cli import main
    from tierflow.driver import run_pipeline
    from tierflow.triton.deploy import find_deployment

    c, workers, _ = cluster
    manifest = pipeline(tmp_path / "p", "reuse", {"replicas": "per_node", "resources": {"triton_node": 1},
                                                   "num_cpus": 0, "num_gpus": 0.5, "name": "warm"})
    runner = CliRunner()
    res = runner.invoke(main, ["triton", "deploy", "-m", str(manifest)])
    assert res.exit_code == 0, res.output
    assert "deployment warm (detached): 2 of 2 server(s) ready" in res.output
    assert "CUDA_VISIBLE_DEVICES=0" in res.output  # the actor's GPU, inherited by its server
    deployment = find_deployment("warm")
    assert deployment is not None
    before = deployment.status()
    servers = before["servers"]
    assert sorted(s["node_id"] for s in servers) == sorted(w.node_id for w in workers)

    # A Triton stage's client, built on a worker from a stale URL list, takes the
    # deployment's endpoints at once and prefers the server on its own node.
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def client_view(path: str) -> list[tuple[str, bool]]:
        from tierflow.engine.runners import make_transform
        from tierflow.manifest import TritonStage, load_manifest

        m = load_manifest(path)
        stage = next(s for s in m.stages if isinstance(s, TritonStage))
        transform = make_transform([stage], DeployedEndpoints(["127.0.0.1:9"], "warm"))
        return [(e.url, e.preferred) for e in transform.__self__.endpoint_stats()]  # type: ignore[attr-defined]

    here = NodeAffinitySchedulingStrategy(workers[1].node_id, soft=False)
    seen = ray.get(ray.remote(client_view).options(num_cpus=0, scheduling_strategy=here).remote(str(manifest)))
    local = next(s["url"] for s in servers if s["node_id"] == workers[1].node_id)
    assert sorted(seen) == sorted((s["url"], s["url"] == local) for s in servers)

    caplog.set_level(logging.INFO, logger="tierflow.triton.deploy")
    report = run_pipeline(manifest, progress_out=None)
    assert report["rows_out"] == ROWS
    assert_output_is_the_models(tmp_path / "p", reference)
    assert "reusing 2 running server(s)" in caplog.text and "starting servers" not in caplog.text
    after = deployment.status()
    assert [(s["id"], s["pid"], s["url"]) for s in after["servers"]] == [
        (s["id"], s["pid"], s["url"]) for s in servers
    ] and after["ended"] == []  # the same warm servers, no model loaded again

    res = runner.invoke(main, ["triton", "status", "-m", str(manifest)])
    assert res.exit_code == 0 and "2 of 2 server(s) ready" in res.output, res.output
    res = runner.invoke(main, ["triton", "undeploy", "-m", str(manifest)])
    assert res.exit_code == 0 and "deployment warm stopped" in res.output, res.output
    assert find_deployment("warm") is None
    assert all(pid_gone(s["pid"]) for s in servers)
    res = runner.invoke(main, ["triton", "status", "-m", str(manifest)])
    assert res.exit_code == 1 and "Triton deployment 'warm': not running" in res.output


@pytest.mark.ray
@pytest.mark.triton
def test_a_node_lost_mid_run_gets_its_server_replaced_and_the_output_is_unchanged(
    cluster: Any, tmp_path: Path, reference: Any
) -> None:
    """Servers on both GPU nodes; one node is removed while the run is held at a gate and a
    fresh GPU node joins. The controller takes the lost server out and starts one on the new
    node; the run finishes with every row once and the model's exact outputs, reports the
    lost server as a ``server_restarted`` fault, and its run-owned deployment is gone afterwards."""
    from tierflow.testing import BackgroundRun
    from tierflow.triton.deploy import find_deployment

    c, workers, _ = cluster
    gate = tmp_path / "go"
    d = tmp_path / "p"
    manifest = pipeline(d, "loss", {"replicas": "per_node", "num_gpus": 1, "num_cpus": 0}, gate=gate)
    run = BackgroundRun(manifest)
    try:
        # Wait for the blocks before the gate to reach the sink (one part file each).
        out = d / "out"
        started = run.wait_for(lambda: len(list(out.glob("*.parquet"))) >= FREE_BLOCKS // 2, timeout_s=120)
        assert started, "classify never ran"
        deployment = find_deployment("triton-loss")  # the default name: triton-<pipeline>
        assert deployment is not None and not deployment.status()["detached"]
        servers = deployment.status()["servers"]
        assert sorted(s["node_id"] for s in servers) == sorted(w.node_id for w in workers)

        victim = workers.pop(0)
        lost = next(s for s in servers if s["node_id"] == victim.node_id)
        c.remove_node(victim)
        fresh = c.add_node(num_cpus=2, num_gpus=1, resources={"triton_node": 1})
        workers.append(fresh)  # the module's cluster keeps two GPU nodes
        deadline = time.monotonic() + 90
        status = deployment.status()
        while time.monotonic() < deadline:
            status = deployment.status()
            ready = {s["node_id"] for s in status["servers"] if s["state"] == "ready"}
            if fresh.node_id in ready:
                break
            time.sleep(0.2)
        ended = {s["id"]: s for s in status["ended"]}
        assert ended[lost["id"]]["state"] == "lost", status
        assert {s["node_id"] for s in status["servers"] if s["state"] == "ready"} == {
            fresh.node_id, workers[0].node_id
        }, status
        assert pid_gone(lost["pid"])  # its tritonserver died with its node (PDEATHSIG)
    finally:
        gate.touch()
    report = run.report(timeout_s=240)
    assert_output_is_the_models(d, reference)
    assert find_deployment("triton-loss") is None  # run-owned: torn down with the run
    # the lost server is a fault of the run, with its time: report.json, the page's markers, metrics
    faults = report["telemetry"]["faults"]
    replaced = [f for f in faults if f["kind"] == "server_restarted" and f["detail"] == f"triton:{victim.node_id}"]
    assert len(replaced) == 1, faults
    triton = [r["server"] for r in report["servers_restarted"] if r["server"].startswith("triton:")]
    assert triton == [f"triton:{victim.node_id}"]
    lost_at = next(f["t"] for f in faults if f["kind"] == "node_lost" and f["detail"] == victim.node_id)
    assert abs(replaced[0]["t"] - lost_at) < 30
