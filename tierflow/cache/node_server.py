"""Per-node cache servers (Ray actors) and peer replicas across Ray nodes.

Each Ray node runs one :class:`CacheServer` actor, pinned to the node with
``NodeAffinitySchedulingStrategy(soft=False)``, named ``tierflow-cache-<node id>`` in the
``tierflow`` namespace. It owns the writes that *other* nodes make into this node's LMDB
environment (peer replicas) and serves this node's copies to other nodes. Workers on the
node read and write their own node's environment directly (LMDB is multi-process safe);
only cross-node traffic goes through the actor.

Placement is rendezvous hashing: the peers of key ``K`` are the alive nodes with a server,
ordered by ``xxh3_64(node id + K)``, skipping the writer. Every process computes the same
order from the same node set, so readers know where to look without a directory; the
writer's own node is known to readers through ``BlockMeta.locations``.

How the engine uses it::

    # driver, once, after ray.init() (and again after nodes join):
    start_cache_servers(settings)
    # in a task on any node:
    cache = get_cache(settings)      # attaches RayPeers when Ray is initialized
    meta = cache.put_table(key, table, durable=False)    # local LMDB + replicas-1 peers
    table = cache.get_table(key, locations=meta.locations)
    # driver, at the run's end (the engine does this, on failure too):
    stop_cache_servers(settings)

Ray errors are translated into :class:`~tierflow.errors.TierUnavailable` here, at this
module's edge; one unreachable peer is skipped, never fatal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence
from typing import Any

import ray
import xxhash
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tierflow.cache import codec
from tierflow.cache.locations import lmdb_location, lmdb_nodes
from tierflow.cache.settings import CacheSettings
from tierflow.cache.tiers.lmdb import LmdbTier
from tierflow.errors import CorruptObject, TierUnavailable

__all__ = [
    "NAMESPACE",
    "CacheServer",
    "RayPeers",
    "alive_nodes",
    "forget_server",
    "rendezvous",
    "server_name",
    "start_cache_servers",
    "started_server",
    "stop_cache_servers",
]

NAMESPACE = "tierflow"
_PREFIX = "tierflow-cache-"


def server_name(node_id: str, settings: CacheSettings) -> str:
    """The actor name of node ``node_id``'s cache server for ``settings`` in this Ray job.

    Servers are per job and per LMDB environment: a second run in the same driver with
    another ``cache.dir`` (or another driver on the same cluster) gets servers of its own,
    never one that writes peer copies into the first run's directory. Tasks compute the
    same name, since they run in their driver's job.
    """
    ident = f"{ray.get_runtime_context().get_job_id()}|{settings.root}|{settings.lmdb_bytes}|{settings.lmdb_map_size}"
    return f"{_PREFIX}{xxhash.xxh3_64_hexdigest(ident.encode())[:12]}-{node_id}"


def rendezvous(key: str, nodes: Sequence[str]) -> list[str]:
    """``nodes`` in the placement order of ``key`` (highest random weight first)."""
    return sorted(nodes, key=lambda n: xxhash.xxh3_64_intdigest(f"{n}/{key}".encode()), reverse=True)


def alive_nodes() -> list[str]:
    """Ids of the Ray nodes that are alive."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return sorted(str(n["NodeID"]) for n in nodes if n.get("Alive"))


class CacheServer:
    """One node's LMDB, served to other nodes. Run as a Ray actor (see module docstring).

    Every read verifies the frame; a bad copy is deleted (so it is re-replicated rather
    than served) and reported as a miss.
    """

    def __init__(self, settings: CacheSettings, node_id: str) -> None:
        self.node_id = node_id
        self.tier = LmdbTier(
            settings.lmdb_path_for(node_id),
            capacity_bytes=settings.lmdb_bytes,
            map_size=settings.lmdb_map_size,
            sync=False,  # a peer copy is never the only one: the writer keeps its own
        )

    def node(self) -> str:
        """This server's node id (also a readiness probe)."""
        return self.node_id

    def put(self, key: str, frame: bytes, pinned: bool) -> str:
        """Verify and store a peer copy; returns its location name.

        Raises:
            CorruptObject: ``frame`` arrived damaged.
            TierUnavailable: No room (``full:``) or the environment cannot be written.
        """
        return self.store(key, frame, pinned)[0]

    def store(self, key: str, frame: bytes, pinned: bool) -> tuple[str, int]:
        """:meth:`put`, also returning the bytes evicted from this node's LMDB to make room
        (the writer counts them: they are its step's evictions, on a peer)."""
        codec.verify(frame, key)
        evicted = self.tier.put_counted(key, frame, pending=pinned)
        return lmdb_location(self.node_id), evicted

    def get(self, key: str) -> bytes | None:
        """This node's verified copy of ``key``, or ``None``."""
        try:
            return self.tier.get(key)
        except CorruptObject:
            self.tier.delete(key)
            return None

    def delete(self, key: str) -> bool:
        """Drop this node's copy of ``key``."""
        return self.tier.delete(key)


def start_cache_servers(
    settings: CacheSettings, nodes: Sequence[str] | None = None, *, wait: bool = True
) -> dict[str, Any]:
    """Start (or find) one cache server on each alive node and wait until they answer
    (``wait=False``: return at once; ``handle.node.remote()`` answers once it runs).

    Call from the driver after ``ray.init()``; call again after nodes join. Servers take
    no CPU slot (``num_cpus=0``), belong to the calling job and live until
    :func:`stop_cache_servers` or the driver's exit. A server that already runs is
    reused as it is (its settings are not changed).

    Returns:
        ``{node id: actor handle}``.
    """
    remote_cls = ray.remote(CacheServer)
    handles: dict[str, Any] = {}
    for node_id in nodes if nodes is not None else alive_nodes():
        handles[node_id] = remote_cls.options(
            num_cpus=0,
            max_concurrency=8,
            max_restarts=0,
            name=server_name(node_id, settings),
            namespace=NAMESPACE,
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(settings, node_id)
    if wait:
        ray.get([h.node.remote() for h in handles.values()])
    # Named actors that are not detached die when their creator's handles are dropped
    # (handles found by name do not count): keep the first handle of each server here for
    # as long as this driver runs (or until stop_cache_servers()), never replace it.
    for node_id, handle in handles.items():
        _STARTED.setdefault(server_name(node_id, settings), handle)
    return handles


def stop_cache_servers(settings: CacheSettings | None = None) -> None:
    """Kill the cache servers of ``settings`` in this job, or every tierflow cache server
    of the cluster (``None``). Their LMDB data stays on disk for the next run's servers."""
    if settings is not None:
        names = {server_name(n, settings) for n in alive_nodes()}
    else:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith(_PREFIX)}
    for name in names:
        _STARTED.pop(name, None)
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            continue


_STARTED: dict[str, Any] = {}  # server name -> the handle it was started with


def started_server(node_id: str, settings: CacheSettings) -> Any | None:
    """The handle this driver started node ``node_id``'s server with, if any."""
    return _STARTED.get(server_name(node_id, settings))


def forget_server(node_id: str, settings: CacheSettings) -> None:
    """Drop the handle of a server found dead, so that the next
    :func:`start_cache_servers` for its node starts a new one."""
    _STARTED.pop(server_name(node_id, settings), None)


class RayPeers:
    """:class:`~tierflow.cache.base.Peers` over the cluster's cache servers.

    Args:
        settings: Cache settings (``replicas`` and ``remote_timeout_s`` are used).
        node_id: This process's node (never chosen as a peer).
        refresh_s: How long the set of servers is reused before it is looked up again.
    """

    def __init__(self, settings: CacheSettings, node_id: str, *, refresh_s: float = 10.0) -> None:
        self.settings = settings
        self.node_id = node_id
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._servers: dict[str, Any] = {}
        self._looked_up = 0.0
        self._evicted = 0  # bytes the peers evicted to make room for this process's copies

    def __reduce__(self) -> Any:
        raise TypeError("RayPeers is per-process; build it from CacheSettings where needed")

    def servers(self, *, refresh: bool = False) -> dict[str, Any]:
        """``{node id: handle}`` of the other nodes' servers (cached for ``refresh_s``)."""
        with self._lock:
            if refresh or time.monotonic() - self._looked_up > self.refresh_s:
                found: dict[str, Any] = {}
                for node_id in alive_nodes():
                    if node_id == self.node_id:
                        continue
                    try:
                        found[node_id] = ray.get_actor(server_name(node_id, self.settings), namespace=NAMESPACE)
                    except ValueError:
                        continue
                self._servers, self._looked_up = found, time.monotonic()
            return dict(self._servers)

    def _forget(self, node_id: str) -> None:
        with self._lock:
            self._servers.pop(node_id, None)

    def replicate(
        self, key: str, frame: bytes, count: int, *, pinned: bool, skip: Collection[str] = ()
    ) -> list[str]:
        """Write ``frame`` to up to ``count`` peers in rendezvous order, skipping failures
        and the nodes in ``skip``."""
        servers = self.servers()
        if not servers:
            raise TierUnavailable("peers", "no cache server on any other node")
        order = [n for n in rendezvous(key, list(servers)) if n not in skip]
        ref = ray.put(frame)
        written: list[str] = []
        pos = 0
        while len(written) < count and pos < len(order):
            batch = order[pos : pos + count - len(written)]
            pos += len(batch)
            calls = {n: servers[n].store.remote(key, ref, pinned) for n in batch}
            for node_id, call in calls.items():
                try:
                    location, evicted = ray.get(call, timeout=self.settings.remote_timeout_s)
                except ray.exceptions.RayError as exc:  # includes errors raised by the actor
                    self._skip(node_id, exc)
                    continue
                written.append(location)
                if evicted:
                    with self._lock:
                        self._evicted += evicted
        return written

    def evicted_bytes(self) -> int:
        """Bytes the peers evicted from their LMDB to make room for this process's copies."""
        with self._lock:
            return self._evicted

    def fetch(self, key: str, hints: Sequence[str] = ()) -> tuple[bytes, str] | None:
        """Ask the hinted nodes, then the key's first ``replicas`` rendezvous nodes."""
        servers = self.servers()
        hinted = lmdb_nodes(hints)
        placed = rendezvous(key, list(servers))[: self.settings.replicas]
        tried: set[str] = set()
        for node_id in [*hinted, *placed]:
            if node_id in tried or node_id == self.node_id:
                continue
            tried.add(node_id)
            handle = servers.get(node_id)
            if handle is None:
                continue
            try:
                data = ray.get(handle.get.remote(key), timeout=self.settings.remote_timeout_s)
            except ray.exceptions.RayError as exc:
                self._skip(node_id, exc)
                continue
            if data is not None:
                return data, lmdb_location(node_id)
        return None

    def delete(self, key: str) -> int:
        """Delete ``key`` on every other node; returns how many held it."""
        servers = self.servers()
        calls = {n: h.delete.remote(key) for n, h in servers.items()}
        held = 0
        for node_id, call in calls.items():
            try:
                held += bool(ray.get(call, timeout=self.settings.remote_timeout_s))
            except ray.exceptions.RayError as exc:
                self._skip(node_id, exc)
        return held

    def _skip(self, node_id: str, exc: BaseException) -> None:
        if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError)):
            self._forget(node_id)
