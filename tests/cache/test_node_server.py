"""Per-node cache servers and peer replicas on a real multi-node Ray cluster
(``ray.cluster_utils.Cluster``: a head and two worker nodes on this machine)."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from tierflow.cache import codec
from tierflow.cache.node_server import rendezvous
from tierflow.cache.settings import CacheSettings

KEY = "demo/3f9a1c0e/clean/000007"


def test_rendezvous_is_stable_and_spreads() -> None:
    nodes = [f"n{i}" for i in range(5)]
    assert rendezvous(KEY, nodes) == rendezvous(KEY, list(reversed(nodes)))
    firsts = {rendezvous(f"demo/f/s/{i:06d}", nodes)[0] for i in range(200)}
    assert firsts == set(nodes)
    # Removing a node only moves the keys that were placed on it.
    for i in range(100):
        k = f"demo/f/s/{i:06d}"
        before = [n for n in rendezvous(k, nodes) if n != "n3"]
        assert before == rendezvous(k, [n for n in nodes if n != "n3"])


def test_cache_server_verifies_and_drops_bad_copies(tmp_path: Path) -> None:
    """The actor's class, used in-process: what arrives damaged is refused, what rots on
    disk is dropped (so it gets re-replicated rather than served)."""
    from tierflow.cache import codec
    from tierflow.cache.node_server import CacheServer
    from tierflow.errors import CorruptObject

    settings = CacheSettings(root=str(tmp_path / "{node}"), remote_url=f"file://{tmp_path}/store",
                             lmdb_map_size=1 << 30)
    server = CacheServer(settings, "node-b")
    frame = codec.encode_table(table())
    assert server.put(KEY, frame, pinned=True) == "lmdb:node-b"
    assert server.tier.is_pending(KEY) and server.get(KEY) == frame
    assert (tmp_path / "node-b" / "lmdb" / "data.mdb").exists()
    damaged = bytearray(frame)
    damaged[len(damaged) // 2] ^= 1
    with pytest.raises(CorruptObject):
        server.put(KEY, bytes(damaged), pinned=False)
    server.tier.put(KEY, bytes(damaged))  # rot behind the server's back
    assert server.get(KEY) is None and not server.tier.contains(KEY)  # dropped, not kept
    server.tier.close()


def test_cache_server_store_returns_what_it_evicted_for_the_copy(tmp_path: Path) -> None:
    """The writer learns the bytes a peer evicted to make room for its copy (its step's
    evictions, on another node): exact per write, whatever else the server does meanwhile."""
    from tierflow.cache.node_server import CacheServer

    frame = codec.encode_table(table())
    settings = CacheSettings(root=str(tmp_path / "{node}"), remote_url=f"file://{tmp_path}/store",
                             lmdb_bytes=2 * len(frame) + 100, lmdb_map_size=1 << 30)
    server = CacheServer(settings, "node-b")
    keys = [f"demo/3f9a1c0e/clean/{i:06d}" for i in range(3)]
    assert [server.store(k, frame, False) for k in keys[:2]] == [("lmdb:node-b", 0)] * 2
    assert server.store(keys[2], frame, False) == ("lmdb:node-b", len(frame))  # the oldest made room
    assert server.tier.stats().bytes_evicted == len(frame)
    server.tier.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    import sys

    # The tasks below are defined in this test package, which Ray workers cannot import:
    # ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address)
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


def table() -> pa.Table:
    return pa.table({"id": np.arange(50_000), "x": np.linspace(0, 1, 50_000)})


@pytest.mark.ray
def test_peer_replicas_survive_the_loss_of_the_writer_node(cluster: Any, tmp_path: Path) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tierflow.cache.node_server import start_cache_servers

    c, workers = cluster
    settings = CacheSettings(
        root=str(tmp_path / "{node}"), remote_url=f"file://{tmp_path}/store",
        replicas=2, lmdb_map_size=1 << 30,
    )
    servers = start_cache_servers(settings)
    assert len(servers) == 3

    @ray.remote(num_cpus=1, max_retries=0)
    def write(settings: CacheSettings) -> Any:
        from tierflow.cache import get_cache

        cache = get_cache(settings)
        meta = cache.put_table(KEY, table(), durable=False)
        return meta, cache.node_id

    @ray.remote(num_cpus=1, max_retries=0)
    def read(settings: CacheSettings, locations: tuple[str, ...]) -> Any:
        from tierflow.cache import get_cache

        cache = get_cache(settings)
        return cache.get_table(KEY, locations=locations), cache.node_id, dict(cache.stats().counters)

    writer_node = workers[0].node_id
    pin = lambda n: NodeAffinitySchedulingStrategy(n, soft=False)  # noqa: E731
    meta, node = ray.get(write.options(scheduling_strategy=pin(writer_node)).remote(settings))
    assert node == writer_node
    assert meta.locations[0] == f"lmdb:{writer_node}" and len(meta.locations) == 2
    peer = meta.locations[1].split(":", 1)[1]
    assert peer != writer_node
    assert not (tmp_path / "store").exists()  # durable=False: no remote copy at all

    c.remove_node(workers[0])  # the writer's node is gone, with its LMDB copy
    survivors = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert writer_node not in survivors and peer in survivors
    reader_node = next(n for n in survivors if n != peer)
    got, node, counters = ray.get(
        read.options(scheduling_strategy=pin(reader_node)).remote(settings, meta.locations)
    )
    assert node == reader_node
    assert got.equals(table())
    assert counters.get("hits_peer") == 1  # read from the other node's copy, no recompute
    # And the reader promoted it into its own node's LMDB.
    got2, _, counters2 = ray.get(
        read.options(scheduling_strategy=pin(reader_node)).remote(settings, ())
    )
    assert got2.equals(table())
    assert counters2.get("hits_lmdb", 0) + counters2.get("hits_memory", 0) >= 1
    assert counters2.get("hits_peer", 0) <= 1  # the second read did not go to the peer


@pytest.mark.ray
def test_durable_put_places_replicas_minus_one_copies_and_delete_reaches_peers(
    cluster: Any, tmp_path: Path
) -> None:
    import ray

    from tierflow.cache.node_server import server_name, start_cache_servers, NAMESPACE

    settings = CacheSettings(
        root=str(tmp_path / "{node}"), remote_url=f"file://{tmp_path}/store",
        replicas=3, lmdb_map_size=1 << 30,
    )
    servers = start_cache_servers(settings, wait=False)  # returns before they run (the driver's way)
    assert {n: ray.get(h.node.remote()) for n, h in servers.items()} == {n: n for n in servers}

    @ray.remote(num_cpus=1, max_retries=0)
    def put_then_delete(settings: CacheSettings) -> Any:
        from tierflow.cache import get_cache

        cache = get_cache(settings)
        meta = cache.put_table(KEY, table())
        held = [loc for loc in meta.locations if loc.startswith("lmdb:")]
        existed = cache.delete(KEY)
        return meta, held, existed, cache.contains(KEY)

    meta, held, existed, still = ray.get(put_then_delete.remote(settings))
    assert meta.locations[-1] == "remote" and len(meta.locations) == 3
    assert len(set(held)) == 2 and existed and not still
    peer = held[1].split(":", 1)[1]
    server = ray.get_actor(server_name(peer, settings), namespace=NAMESPACE)
    assert ray.get(server.get.remote(KEY)) is None


@pytest.mark.ray
def test_rereplicate_restores_the_copies_a_lost_node_held(cluster: Any, tmp_path: Path) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tierflow.cache.node_server import alive_nodes, start_cache_servers

    c, _ = cluster
    a, b, d = (c.add_node(num_cpus=1) for _ in range(3))
    c.wait_for_nodes()
    settings = CacheSettings(root=str(tmp_path / "{node}"), remote_url=f"file://{tmp_path}/store",
                             replicas=2, lmdb_map_size=1 << 30)
    start_cache_servers(settings)
    # a key whose first peer from a's point of view is one of this test's nodes (b or d),
    # not the head or a node another test uses
    peers_of_a = [n for n in alive_nodes() if n != a.node_id]
    key = next(k for k in (f"demo/3f9a1c0e/clean/{i:06d}" for i in range(1000))
               if rendezvous(k, peers_of_a)[0] in (b.node_id, d.node_id))
    pin = lambda n: NodeAffinitySchedulingStrategy(n, soft=False)  # noqa: E731

    @ray.remote(num_cpus=0, max_retries=0)
    def write(settings: CacheSettings, key: str) -> Any:
        from tierflow.cache import get_cache

        return get_cache(settings).put_table(key, table(), durable=False).locations

    @ray.remote(num_cpus=0, max_retries=0)
    def rereplicate(settings: CacheSettings, key: str, left: tuple[str, ...]) -> Any:
        from tierflow.cache import get_cache

        return get_cache(settings).rereplicate(key, left)

    @ray.remote(num_cpus=0, max_retries=0)
    def read(settings: CacheSettings, key: str, locations: tuple[str, ...]) -> Any:
        from tierflow.cache import get_cache

        return get_cache(settings).get_table(key, locations=locations)

    locations = ray.get(write.options(scheduling_strategy=pin(a.node_id)).remote(settings, key))
    assert locations[0] == f"lmdb:{a.node_id}" and len(locations) == 2
    lost = locations[1].split(":", 1)[1]
    victim = next(n for n in (b, d) if n.node_id == lost)
    c.remove_node(victim)  # one copy gone with its node

    left = (locations[0],)
    added = ray.get(rereplicate.options(scheduling_strategy=pin(a.node_id)).remote(settings, key, left))
    assert len(added) == 1 and added[0] not in locations  # a new node, never the dead one
    assert ray.get(rereplicate.options(scheduling_strategy=pin(a.node_id)).remote(
        settings, key, (*left, *added))) == []  # back to 2 copies: nothing more to do

    c.remove_node(a)  # now the writer's copy goes too: the new copy alone serves the block
    new_home = added[0].split(":", 1)[1]
    reader = next(n for n in alive_nodes() if n != new_home)
    got = ray.get(read.options(scheduling_strategy=pin(reader)).remote(settings, key, tuple(added)))
    assert got.equals(table())


@pytest.mark.ray
def test_a_dead_server_on_a_live_node_is_started_again(cluster: Any, tmp_path: Path) -> None:
    import ray

    from tierflow.cache.node_server import start_cache_servers, started_server
    from tierflow.engine.nodes import NodeWatcher

    c, _ = cluster
    node = c.add_node(num_cpus=1).node_id  # the module's first nodes may be gone by now
    c.wait_for_nodes()
    settings = CacheSettings(root=str(tmp_path / "{node}"), remote_url=f"file://{tmp_path}/store", replicas=2,
                             lmdb_map_size=1 << 30)
    start_cache_servers(settings)
    ray.get(started_server(node, settings).put.remote("demo/3f9a1c0e/clean/000001", codec.encode_table(table()), False))
    watcher = NodeWatcher(settings)
    watcher.nodes = {node}
    watcher.check_servers()  # probes sent
    dead = started_server(node, settings)
    ray.kill(dead, no_restart=True)  # as Ray's own crash of a server mid-call does
    deadline = time.monotonic() + 30
    while node not in watcher.restart and time.monotonic() < deadline:  # each call reads answers, probes again
        watcher.check_servers()
        time.sleep(0.2)
    assert node in watcher.restart and started_server(node, settings) is None
    assert node in watcher.nodes  # still known alive: were it lost now, lost() would report it
    watcher.serve_joined()
    assert node not in watcher.restart and watcher.restarted == 1
    assert watcher.restarted_servers() == [node] and watcher.restarted_servers() == []  # each told once
    fresh = started_server(node, settings)
    assert fresh is not None and fresh is not dead
    assert ray.get(fresh.node.remote(), timeout=60) == node
    assert ray.get(fresh.get.remote("demo/3f9a1c0e/clean/000001")) is not None  # the node's copies, served again


@pytest.mark.ray
def test_the_final_flush_skips_a_node_gone_since_the_node_table_was_read(
    cluster: Any, tmp_path: Path
) -> None:
    import ray

    from tierflow.engine.nodes import NodeWatcher, read_node_table
    from tierflow.engine.ray_backend import RayBackend

    settings = CacheSettings(root=str(tmp_path / "{node}"), remote_url=f"file://{tmp_path}/store", replicas=1,
                             lmdb_map_size=1 << 30)
    be = RayBackend()
    be._settings_ref = ray.put(settings)
    gone = "ab" * 28  # a node removed at the very end of a run (the chaos smoke test met it)
    be._watcher = NodeWatcher(settings, read_table=lambda: {**read_node_table(), gone: {"CPU": 1.0}})
    assert be.flush("demo/") == 0  # the live nodes flushed; the lost one is not a failure


@pytest.mark.ray
def test_each_run_replicates_into_its_own_cache_dir_and_stops_its_servers(cluster: Any, tmp_path: Path) -> None:
    """Two runs in one Ray session, each with its own ``cache.dir``: the second run's peer
    copies land in its own directories (a server left by the first run would put them in
    the first run's), and no cache server outlives either run."""
    import pyarrow.parquet as pq
    import ray
    import yaml

    from tierflow.cache.node_server import stop_cache_servers
    from tierflow.cache.tiers.lmdb import LmdbTier
    from tierflow.driver import run_pipeline

    stop_cache_servers()  # the earlier tests' servers

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": np.arange(400)}), tmp_path / "data" / "a.parquet")

    def run(name: str) -> None:
        doc = {"name": name, "source": {"format": "parquet", "path": "data/", "block_rows": 100},
               "stages": [{"name": "s", "kind": "python", "fn": "pyarrow:Table.flatten", "checkpoint": True}],
               "sink": {"path": f"out-{name}/"},
               "cache": {"dir": str(tmp_path / f"{name}-{{node}}"), "remote_url": f"file://{tmp_path}/durable",
                         "replicas": 3}}  # the writer, a peer and the checkpoint
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        run_pipeline(tmp_path / f"{name}.yaml", progress_out=None)
        left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("tierflow-cache-")]
        assert left == [], f"cache servers outlived run {name!r}: {left}"

    def keys(name: str, pipeline: str) -> list[str]:
        found = []
        for env in sorted(tmp_path.glob(f"{name}-*/lmdb")):
            tier = LmdbTier(str(env), capacity_bytes=1 << 30, map_size=1 << 30)
            found += list(tier.list(pipeline + "/"))
            tier.close()
        return found

    run("one")
    run("two")
    assert keys("one", "two") == []  # nothing of the second run in the first run's environments
    # 4 blocks of stage s, each on its writer and a peer (a third copy when the driver topped
    # up a block whose peer write failed under load: never fewer)
    copies = Counter(keys("two", "two"))
    assert len(copies) == 4 and all(n >= 2 for n in copies.values()), copies


@pytest.mark.ray
def test_a_writer_counts_the_bytes_its_peer_copies_evicted(cluster: Any, tmp_path: Path) -> None:
    import ray

    from tierflow.cache.node_server import start_cache_servers

    frame_bytes = len(codec.encode_table(table()))
    # replicas 3 with a durable store: the writer's LMDB, one peer's, the durable copy
    settings = CacheSettings(root=str(tmp_path / "{node}"), remote_url=f"file://{tmp_path}/store", replicas=3,
                             lmdb_bytes=2 * frame_bytes + 100, lmdb_map_size=1 << 30)
    start_cache_servers(settings)

    @ray.remote(num_cpus=1, max_retries=0)
    def put_eight(settings: CacheSettings) -> tuple[int, int, int]:
        from tierflow.cache import get_cache

        cache = get_cache(settings)
        for i in range(8):  # durable first: unpinned copies, evictable
            cache.put_table(f"demo/3f9a1c0e/clean/{i:06d}", table())
        return cache.evicted_bytes()

    memory, local, peers = ray.get(put_eight.remote(settings))
    # 8 copies over at most 3 peers that hold 2 each: some peer evicted; the writer's own
    # LMDB held 2 of its 8
    assert peers >= frame_bytes and peers % frame_bytes == 0
    assert local == 6 * frame_bytes and memory == 0
