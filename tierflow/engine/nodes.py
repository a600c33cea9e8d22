"""The cluster's nodes as one run sees them: which are alive, which were lost, and whether
each one's cache server still serves its copies.

:class:`NodeWatcher` reads Ray's node table (at most every ``NODE_TABLE_TTL_S``: one
driver round's decisions share one read), reports nodes that died, starts a cache server
on each node that joins, and probes the running ones: a server found dead on a live node
is started again, so that node's LMDB copies are served again. The table reader and the
clock are injected, so loss detection is tested without Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from tierflow.cache.node_server import forget_server, start_cache_servers, started_server, stop_cache_servers
from tierflow.cache.settings import CacheSettings
from tierflow.engine.pool import pop_answered

__all__ = ["NODES_REFRESH_S", "NODE_TABLE_TTL_S", "NodeWatcher", "read_node_table"]

NODES_REFRESH_S = 1.0  # how often the table is compared with the nodes known alive
NODE_TABLE_TTL_S = 0.2


def read_node_table() -> dict[str, dict[str, float]]:
    """Alive node -> its resources, from Ray's node table."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return {str(n["NodeID"]): dict(n["Resources"]) for n in nodes if n.get("Alive")}


class NodeWatcher:
    """Nodes alive (each with this run's cache server), nodes lost, servers restarted.

    ``nodes`` are the nodes with a cache server, i.e. alive at the last look; a node in it
    that the table no longer lists is lost (reported once by :meth:`lost`).
    """

    def __init__(
        self,
        settings: CacheSettings,
        read_table: Callable[[], dict[str, dict[str, float]]] = read_node_table,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._read_table = read_table
        self._clock = clock
        self.nodes: set[str] = set()
        self.restart: set[str] = set()  # live nodes whose cache server was found dead
        self.restarted = 0  # cache servers started again on a live node
        self._restarted_since: list[str] = []  # their nodes, until taken by restarted_servers()
        self._joining: dict[Any, str] = {}  # node() calls of cache servers starting on new nodes
        self._probes: dict[Any, str] = {}  # node() calls checking that running servers live
        self._table: dict[str, dict[str, float]] = {}
        self._table_at = -NODE_TABLE_TTL_S
        self._lost_at = clock()

    def resources(self, fresh: bool = False) -> dict[str, dict[str, float]]:
        """Alive node -> its resources (read at most every ``NODE_TABLE_TTL_S``, unless ``fresh``)."""
        now = self._clock()
        if fresh or now - self._table_at >= NODE_TABLE_TTL_S:
            self._table = self._read_table()
            self._table_at = now
        return self._table

    def alive(self, fresh: bool = False) -> dict[str, float]:
        """Alive node -> its CPUs."""
        return {node: res.get("CPU", 0.0) for node, res in self.resources(fresh).items()}

    def start(self) -> None:
        """Start a cache server on every alive node and wait for them (peer replicas go
        through these)."""
        self.nodes = set(start_cache_servers(self._settings))

    def lost(self) -> list[str]:
        """Nodes found dead since the last call (looked at every ``NODES_REFRESH_S``)."""
        if self._clock() - self._lost_at <= NODES_REFRESH_S:
            return []
        self._lost_at = self._clock()
        gone = self.nodes - set(self.resources())
        self.nodes -= gone
        return sorted(gone)

    def joined(self) -> None:
        """Take in the nodes whose new cache server answered (a failed one's node went again)."""
        served, _ = pop_answered(self._joining)
        self.nodes.update(node for node, _ in served)

    def check_servers(self) -> None:
        """Probe each node's cache server (the answers are read one call later); a server
        found dead on a live node goes to ``restart``, for :meth:`serve_joined`. (Ray 2.60
        crashed one while fetching a call's argument whose owner had just died with its
        node, cf. ray-project/ray#63079.)"""
        _, dead = pop_answered(self._probes)
        if dead:
            alive = self.resources(fresh=True)
            for node in dead:
                if node in alive:  # a lost node's is left for lost() to report
                    self.restart.add(node)  # still in nodes, so its loss would be seen
                    forget_server(node, self._settings)
        probed = set(self._probes.values())
        for node in self.nodes - probed - self.restart:
            server = started_server(node, self._settings)
            if server is not None:
                self._probes[server.node.remote()] = node

    def serve_joined(self) -> None:
        """Start a cache server on each node that joined (or whose server died), without
        waiting for it: on a new node that means a worker process first, seconds in which
        no block would move."""
        joining = set(self._joining.values())
        alive = self.resources()
        joined = [n for n in sorted(alive) if (n not in self.nodes or n in self.restart) and n not in joining]
        self.restart &= set(alive)  # a node lost meanwhile: lost() reports it
        for node, server in start_cache_servers(self._settings, joined, wait=False).items():
            if node in self.restart:
                self.restarted += 1
                self._restarted_since.append(node)
            self.restart.discard(node)
            self._joining[server.node.remote()] = node

    def restarted_servers(self) -> list[str]:
        """Nodes whose cache server was started again since the last call (each once)."""
        taken, self._restarted_since = self._restarted_since, []
        return taken

    def stop(self) -> None:
        """Stop this run's cache servers: they carry its settings and end with it."""
        stop_cache_servers(self._settings)
