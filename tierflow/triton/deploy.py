"""Triton servers deployed on the Ray cluster by tierflow (``triton.deploy`` in a manifest).

Each server is a Ray actor running one ``tritonserver`` process (:class:`TritonServer`,
which dies with its actor through ``PR_SET_PDEATHSIG``) on the same model repository,
bound to free ports and reported as ``<node ip>:<grpc port>``. Ray places the actors on
nodes holding the requested resources (``num_gpus``, ``resources``); ``replicas:
per_node`` pins one to every node that has them. Ray sets ``CUDA_VISIBLE_DEVICES`` for an
actor holding GPUs and the tritonserver child inherits it, so ``KIND_GPU`` instance groups
work unchanged.

A *controller* actor (named, namespace ``tierflow``, zero CPUs, pinned to the driver's
node) owns the server actors and a watcher thread that

* waits for every model to be ready on each server (a model that fails to load is named
  with Triton's reason, and that server is not used),
* notices a lost server (dead actor, lost node, crashed process), takes it out of the
  endpoint list and starts a replacement on a surviving or new node,
* fails a server that cannot get its resources within ``startup_timeout_s``, naming the
  resources and the nodes it looked at.

Clients ask the controller for :meth:`DeploymentController.endpoints` and follow it
(:class:`EndpointFollower`, used by the Triton stage's actors): every couple of seconds,
and at once when every endpoint they know is failing.

Usage::

    spec = DeploySpec.from_manifest(manifest)
    with deployed(spec) as deployment:         # reuses a running deployment of that name
        urls = deployment.urls()               # DeployedEndpoints: a tuple of "ip:port"
    # a deployment this block started is gone here; a reused one is left running

    deployment = start_deployment(spec, detached=True)   # tierflow triton deploy
    find_deployment(spec.name).status()                   # tierflow triton status
    find_deployment(spec.name).stop()                     # tierflow triton undeploy
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tierflow.errors import DeploymentError, InferenceError, ModelError
from tierflow.triton.repository import list_models

if TYPE_CHECKING:
    from tierflow.manifest import Manifest
    from tierflow.triton.client import TritonStageClient

__all__ = [
    "NAMESPACE",
    "DeployedEndpoints",
    "Deployment",
    "DeploySpec",
    "EndpointFollower",
    "LostServers",
    "NodeView",
    "ServerStatus",
    "deployed",
    "eligible_nodes",
    "find_deployment",
    "placements",
    "resource_report",
    "start_deployment",
]

_log = logging.getLogger(__name__)

#: Ray namespace of every controller, so a run finds a deployment another driver made.
NAMESPACE = "tierflow"
_ACTOR_PREFIX = "triton-deploy/"
#: The watcher's period: how soon a lost server is noticed (plus Ray's own detection).
_WATCH_INTERVAL_S = 0.25
#: A ready server is asked whether its process lives this often...
_PING_INTERVAL_S = 1.0
#: ...and is declared lost when the answer takes longer than this (a hung actor or node).
_PING_TIMEOUT_S = 10.0
#: Failed starts on one node before it is left out (a model that failed to load: at once).
_MAX_START_FAILURES = 2
#: Servers that ended (lost, failed, stopped) kept in ``status()``.
_HISTORY = 32
#: Lost servers remembered for :meth:`DeploymentController.lost_since`.
_LOST_LOG = 256
#: How often a client asks the controller for the endpoints, and the shortest gap between two
#: asks when every endpoint is failing.
FOLLOW_INTERVAL_S = 2.0
_FOLLOW_MIN_GAP_S = 0.5


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True, slots=True)
class DeploySpec:
    """What to deploy: the models, how many servers, and what each holds.

    Attributes:
        name: Deployment name (the controller is the actor ``triton-deploy/<name>``).
        repository: Model repository, an absolute path every node can read.
        models: Models each server loads and must report ready.
        replicas: Number of servers, or ``"per_node"`` (one on every node holding the
            resources).
        resources: Custom Ray resources each server holds, e.g. ``{"triton_node": 1}``.
        num_gpus: GPUs each server holds (Ray sets its ``CUDA_VISIBLE_DEVICES``).
        num_cpus: Logical CPUs each server holds.
        startup_timeout_s: Time for one server to get its resources and load every model.
    """

    name: str
    repository: str
    models: tuple[str, ...]
    replicas: int | Literal["per_node"] = 1
    resources: Mapping[str, float] = field(default_factory=dict)
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    startup_timeout_s: float = 180.0

    @classmethod
    def from_manifest(cls, manifest: Manifest, models: Sequence[str] | None = None) -> DeploySpec:
        """The spec of ``manifest``'s ``triton.deploy``.

        Args:
            models: Models to serve; default: those the manifest's Triton stages name, or
                every model of the repository when no stage names one.

        Raises:
            ValueError: The manifest has no ``triton.deploy``.
        """
        from tierflow.manifest import TritonStage

        cfg = manifest.triton.deploy
        if cfg is None:
            raise ValueError("the manifest has no triton.deploy section")
        repo = str(Path(manifest.resolve(manifest.triton.repository)).resolve())
        if models is None:
            models = sorted({s.model for s in manifest.stages if isinstance(s, TritonStage)})
        return cls(
            name=cfg.name or f"triton-{manifest.name}",
            repository=repo,
            models=tuple(models) or tuple(list_models(Path(repo))),
            replicas=cfg.replicas,
            resources=dict(cfg.resources),
            num_gpus=cfg.num_gpus,
            num_cpus=cfg.num_cpus,
            startup_timeout_s=cfg.startup_timeout_s,
        )

    def demand(self) -> dict[str, float]:
        """Every Ray resource one server holds, by Ray's names (``CPU``, ``GPU``, custom)."""
        out = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: v for k, v in out.items() if v > 0}

    def describe_demand(self) -> str:
        """``"{GPU: 1, triton_node: 1}"``: what a message names as the missing resources."""
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(self.demand().items())) + "}"


# --------------------------------------------------------------------------- placement (pure)


@dataclass(frozen=True, slots=True)
class NodeView:
    """One Ray node as the placement logic sees it (built from ``ray.nodes()``)."""

    node_id: str
    address: str
    alive: bool
    total: Mapping[str, float]
    available: Mapping[str, float]


def _holds(amounts: Mapping[str, float], demand: Mapping[str, float]) -> bool:
    return all(amounts.get(k, 0.0) + 1e-9 >= v for k, v in demand.items())


def eligible_nodes(spec: DeploySpec, nodes: Sequence[NodeView]) -> list[NodeView]:
    """The alive nodes whose *total* resources can hold one server, in node-id order.

    >>> n = [NodeView("a", "h", True, {"CPU": 2}, {}), NodeView("b", "h", True, {"CPU": 2, "GPU": 1}, {})]
    >>> [v.node_id for v in eligible_nodes(DeploySpec("d", "/r", ("m",), num_gpus=1), n)]
    ['b']
    """
    demand = spec.demand()
    return sorted((n for n in nodes if n.alive and _holds(n.total, demand)), key=lambda n: n.node_id)


def placements(
    spec: DeploySpec,
    nodes: Sequence[NodeView],
    active: Sequence[str | None],
    excluded: Collection[str] = (),
) -> list[str]:
    """Nodes to start new servers on now, one entry per server (a node may repeat).

    ``per_node``: every eligible node without an active server. ``replicas: N``: the
    missing ``N - len(active)`` servers, each on the eligible node with the fewest active
    servers, then the most of the demand still available (spreading the servers over
    failure domains); the choice is a preference, Ray may place elsewhere.

    Args:
        spec: The deployment.
        nodes: Ray's node table.
        active: The node of each server starting or ready (``None``: not placed yet).
        excluded: Nodes left out (servers kept failing to start there).

    Returns:
        Node ids; empty when nothing is missing or no eligible node is left (the caller
        reports that and looks again later: a node may join).

    >>> nodes = [NodeView(i, "h", True, {"GPU": 1}, {"GPU": 1}) for i in "abc"]
    >>> placements(DeploySpec("d", "/r", ("m",), replicas="per_node", num_gpus=1, num_cpus=0), nodes, ["b"])
    ['a', 'c']
    >>> placements(DeploySpec("d", "/r", ("m",), replicas=4, num_cpus=0), nodes, ["a"], excluded={"c"})
    ['b', 'a', 'b']
    """
    candidates = [n for n in eligible_nodes(spec, nodes) if n.node_id not in excluded]
    if not candidates:
        return []
    if spec.replicas == "per_node":
        taken = set(active)
        return [n.node_id for n in candidates if n.node_id not in taken]
    missing = spec.replicas - len(active)
    counts = Counter(a for a in active if a is not None)
    demand = spec.demand()
    out: list[str] = []
    for _ in range(max(missing, 0)):
        best = min(
            candidates,
            key=lambda n: (
                counts[n.node_id],
                not _holds(n.available, {k: v * (counts[n.node_id] + 1) for k, v in demand.items()}),
                n.node_id,
            ),
        )
        counts[best.node_id] += 1
        out.append(best.node_id)
    return out


def resource_report(spec: DeploySpec, nodes: Sequence[NodeView]) -> str:
    """One line per node looked at: its id, address, and what it has of the demand.

    >>> print(resource_report(DeploySpec("d", "/r", ("m",), resources={"x": 1}, num_cpus=0),
    ...                       [NodeView("n1", "10.0.0.1", True, {"CPU": 2}, {"CPU": 2})]))
    node n1 (10.0.0.1): x 0 of 0 free
    """
    demand = spec.demand()
    lines = []
    for n in sorted(nodes, key=lambda n: n.node_id):
        if not n.alive:
            lines.append(f"node {n.node_id[:12]} ({n.address}): dead")
            continue
        have = ", ".join(
            f"{k} {n.available.get(k, 0.0):g} of {n.total.get(k, 0.0):g} free" for k in sorted(demand)
        )
        lines.append(f"node {n.node_id[:12]} ({n.address}): {have}")
    return "\n".join(lines) or "(no nodes)"


def nodes_from_ray() -> list[NodeView]:
    """Ray's node table now (totals from ``ray.nodes()``, availability per node from GCS)."""
    try:
        from ray._private.state import available_resources_per_node

        available: dict[str, dict[str, float]] = available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private API: degrade to totals only
        available = {}
    return [
        NodeView(
            node_id=n["NodeID"],
            address=n.get("NodeManagerAddress", "?"),
            alive=bool(n.get("Alive")),
            total=dict(n.get("Resources") or {}),
            available=dict(available.get(n["NodeID"], {})),
        )
        for n in ray.nodes()
    ]


# --------------------------------------------------------------------------- the server actor


@ray.remote(max_restarts=0, max_task_retries=0)
class TritonServerActor:
    """One ``tritonserver`` process on this actor's node. Not threaded on purpose: ``start``
    runs on the main thread, so the server gets ``PR_SET_PDEATHSIG`` and dies with us."""

    def __init__(self, repository: str, models: Sequence[str], startup_timeout_s: float) -> None:
        self._repository = repository
        self._models = list(models)
        self._startup_timeout_s = startup_timeout_s
        self._server: Any = None

    def node(self) -> str:
        """This actor's node id (answers as soon as Ray has placed the actor)."""
        return str(ray.get_runtime_context().get_node_id())

    def start(self) -> dict[str, Any]:
        """Start the server and wait for every model; return where it serves.

        Raises:
            ModelError: A model failed to load (Triton's reason) or was not ready in time.
            TritonUnavailable: The process died or never answered.
        """
        from tierflow.triton.server import TritonServer

        # 0.0.0.0: the clients are on other nodes; they are given this node's IP.
        server = TritonServer(
            Path(self._repository), models=self._models, host="0.0.0.0",
            startup_timeout_s=self._startup_timeout_s,
        )
        server.start()
        self._server = server
        port = server.grpc_url.rsplit(":", 1)[1]
        return {
            "url": f"{ray.util.get_node_ip_address()}:{port}",
            "node_id": self.node(),
            "pid": server.pid,
            "startup_s": server.startup_s,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "log": str(server.log_path),
        }

    def exit_code(self) -> int | None:
        """``None`` while the server process runs, else its exit code."""
        proc = self._server._proc if self._server is not None else None
        return None if proc is None else proc.poll()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


# --------------------------------------------------------------------------- the controller


ServerState = Literal["pending", "starting", "ready", "failed", "lost", "stopped"]


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """One server of a deployment, as :meth:`Deployment.status` reports it.

    Attributes:
        id: Its number in this deployment (replacements get new ones).
        state: ``pending`` (waiting for resources), ``starting`` (loading models),
            ``ready`` (serving), ``failed`` (never became ready), ``lost`` (was ready,
            then its actor, node or process died), ``stopped``.
        node_id: Its Ray node ("" until placed).
        url: ``<node ip>:<grpc port>`` once ready.
        pid: The tritonserver process id once ready.
        startup_s: Seconds from start to every model ready.
        cuda_visible_devices: What Ray gave the actor (the server inherits it).
        reason: Why it failed or was lost.
        age_s: Seconds since it was created.
    """

    id: int
    state: ServerState
    node_id: str
    url: str
    pid: int | None
    startup_s: float | None
    cuda_visible_devices: str | None
    reason: str
    age_s: float


@dataclass(slots=True)
class _Server:
    """A server as the controller tracks it (mutable; controller-internal)."""

    id: int
    actor: Any
    target: str | None  # the node it was asked to go to
    created: float
    node_ref: Any
    state: ServerState = "pending"
    start_ref: Any = None
    node_id: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    ping_ref: Any = None
    ping_sent: float = 0.0
    ping_last: float = 0.0

    def view(self, now: float) -> ServerStatus:
        return ServerStatus(
            id=self.id, state=self.state, node_id=self.node_id, url=self.info.get("url", ""),
            pid=self.info.get("pid"), startup_s=self.info.get("startup_s"),
            cuda_visible_devices=self.info.get("cuda_visible_devices"), reason=self.reason,
            age_s=now - self.created,
        )


def _cause(exc: BaseException) -> BaseException:
    """The user-level exception inside a RayTaskError (its ``cause``), else ``exc``."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)  # type: ignore[call-overload]
class DeploymentController:
    """Owns a deployment's server actors; a watcher thread keeps the wanted number ready.

    Threaded: ``endpoints()`` and ``status()`` answer while the watcher works. Its server
    actors are owned by it, so they die with it (Ray's owner fate-sharing), and their
    tritonserver processes with them.
    """

    def __init__(self, spec: DeploySpec, detached: bool) -> None:
        self._spec = spec
        self._detached = detached
        self._lock = threading.Condition()
        self._servers: list[_Server] = []
        self._ended: deque[_Server] = deque(maxlen=_HISTORY)
        self._lost = 0  # servers lost after they were ready (each replaced by the watcher)
        self._lost_log: deque[tuple[int, str, int, str]] = deque(maxlen=_LOST_LOG)  # (number, node, server, why)
        self._failures: Counter[str] = Counter()  # failed starts in a row, per node
        self._next_id = 0
        self._waiting = ""  # why servers are missing, "" when none is
        self._stopping = threading.Event()
        self._created = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="triton-deploy-watch", daemon=True)
        self._thread.start()

    # -- queries (any thread)

    def spec(self) -> DeploySpec:
        return self._spec

    def endpoints(self) -> list[tuple[str, str]]:
        """``[(url, node_id)]`` of the ready servers, oldest first."""
        with self._lock:
            return [(s.info["url"], s.node_id) for s in self._servers if s.state == "ready"]

    def status(self) -> dict[str, Any]:
        """Name, spec, every current server and the recently ended ones, and what is missing."""
        now = time.monotonic()
        with self._lock:
            return {
                "name": self._spec.name,
                "detached": self._detached,
                "spec": {**asdict(self._spec), "resources": dict(self._spec.resources)},
                "servers": [asdict(s.view(now)) for s in self._servers],
                "ended": [asdict(s.view(now)) for s in self._ended],
                "waiting": self._waiting,
                "excluded_nodes": sorted(n for n, k in self._failures.items() if k >= _MAX_START_FAILURES),
                "uptime_s": now - self._created,
            }

    def lost_since(self, seen: int) -> tuple[int, list[dict[str, Any]]]:
        """``(servers lost so far, the ones after the first seen)``: each a ready server that
        died (its actor, node or process) and that the watcher replaces. A run's driver asks
        this to report them as faults; the newest ``_LOST_LOG`` are kept."""
        with self._lock:
            return self._lost, [
                {"node_id": node, "server": server, "reason": why}
                for n, node, server, why in self._lost_log if n > seen
            ]

    def wait_ready(self, timeout_s: float) -> list[tuple[str, str]]:
        """Block until no server is still starting (or ``timeout_s`` passes); return the endpoints.

        Raises:
            DeploymentError: No server is ready: no node holds the resources, none got them
                in time (the message names them and the nodes looked at), or every server
                failed (each failure's reason, Triton's for a model that did not load).
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                settling = any(s.state in ("pending", "starting") for s in self._servers)
                ready = [s for s in self._servers if s.state == "ready"]
                # Hopeless once the watcher found no node left to try (``_waiting``); between
                # a failure and its replacement nothing is settling either, but that is not it.
                hopeless = not settling and not ready and bool(self._waiting)
                if (not settling and ready) or hopeless or time.monotonic() >= deadline:
                    break
                self._lock.wait(_WATCH_INTERVAL_S)
            if ready:
                return [(s.info["url"], s.node_id) for s in ready]
            reasons = [f"server {s.id}: {s.reason}" for s in self._ended if s.reason]
            if self._waiting:
                reasons.insert(0, self._waiting)
            when = "no node left to try" if hopeless else f"none within {timeout_s:g}s"
            raise DeploymentError(
                self._spec.name,
                f"no server became ready ({when})" + (":\n" + "\n".join(reasons) if reasons else ""),
            )

    def stop(self) -> None:
        """Stop the watcher, then every server (SIGTERM, then the actor is killed). Idempotent."""
        self._stopping.set()
        self._thread.join(timeout=10.0)
        with self._lock:
            servers, self._servers = self._servers, []
        stops = [s.actor.stop.remote() for s in servers if s.state == "ready"]
        with contextlib.suppress(Exception):
            ray.wait(stops, num_returns=len(stops), timeout=20.0)
        for s in servers:
            s.state = "stopped"
            with contextlib.suppress(Exception):
                ray.kill(s.actor, no_restart=True)
            self._ended.append(s)

    # -- the watcher

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._round()
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad round
                _log.exception("Triton deployment %s: watcher round failed", self._spec.name)
            self._stopping.wait(_WATCH_INTERVAL_S)

    def _round(self) -> None:
        nodes = nodes_from_ray()
        alive = {n.node_id for n in nodes if n.alive}
        now = time.monotonic()
        for s in list(self._servers):
            self._advance(s, alive, nodes, now)
        with self._lock:
            if self._stopping.is_set():
                return
            active = [s.node_id or s.target for s in self._servers]
            excluded = {n for n, k in self._failures.items() if k >= _MAX_START_FAILURES}
            wanted = placements(self._spec, nodes, active, excluded)
            if not eligible_nodes(self._spec, [n for n in nodes if n.node_id not in excluded]):
                self._waiting = (
                    f"no alive node holds {self._spec.describe_demand()}"
                    + (f" (left out after failed starts: {', '.join(sorted(excluded))})" if excluded else "")
                    + f"; nodes looked at:\n{resource_report(self._spec, nodes)}"
                )
            else:
                self._waiting = ""
            for node in wanted:
                self._servers.append(self._launch(node, now))
            self._lock.notify_all()

    def _launch(self, node: str, now: float) -> _Server:
        spec = self._spec
        # per_node pins hard (the point is one on *that* node); N replicas only prefer the
        # chosen node, so Ray can still place a server when that node filled up meanwhile.
        strategy = NodeAffinitySchedulingStrategy(node, soft=spec.replicas != "per_node")
        actor = TritonServerActor.options(  # type: ignore[attr-defined]
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, resources=dict(spec.resources),
            scheduling_strategy=strategy,
        ).remote(spec.repository, spec.models, spec.startup_timeout_s)
        self._next_id += 1
        _log.info("Triton deployment %s: starting server %d on node %s", spec.name, self._next_id, node[:12])
        return _Server(id=self._next_id, actor=actor, target=node, created=now, node_ref=actor.node.remote())

    def _end(self, s: _Server, state: ServerState, reason: str, strikes: int = 1) -> None:
        with self._lock:
            s.state, s.reason = state, reason
            if s in self._servers:
                self._servers.remove(s)
            self._ended.append(s)
            if state == "failed" and s.node_id:
                self._failures[s.node_id] += strikes
            if state == "lost":
                self._lost += 1
                self._lost_log.append((self._lost, s.node_id, s.id, reason))
            self._lock.notify_all()
        (_log.warning if state in ("failed", "lost") else _log.info)(
            "Triton deployment %s: server %d %s: %s", self._spec.name, s.id, state, reason
        )
        with contextlib.suppress(Exception):
            ray.kill(s.actor, no_restart=True)

    def _advance(self, s: _Server, alive: set[str], nodes: Sequence[NodeView], now: float) -> None:
        """Move one server along pending -> starting -> ready, or end it."""
        spec = self._spec
        overdue = now - s.created > spec.startup_timeout_s
        if s.state == "pending":
            done, _ = ray.wait([s.node_ref], timeout=0)
            if done:
                try:
                    s.node_id = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - the actor died before it was placed
                    self._end(s, "failed", f"server actor died before starting: {exc}")
                    return
                with self._lock:
                    s.state, s.start_ref = "starting", s.actor.start.remote()
                return
            if overdue:
                self._end(
                    s, "failed",
                    f"could not get {spec.describe_demand()} within {spec.startup_timeout_s:g}s; "
                    f"nodes looked at:\n{resource_report(spec, nodes)}",
                )
            return
        if s.node_id and s.node_id not in alive:
            self._end(s, "lost" if s.state == "ready" else "failed", f"node {s.node_id[:12]} is gone")
            return
        if s.state == "starting":
            done, _ = ray.wait([s.start_ref], timeout=0)
            if not done:
                if overdue:
                    self._end(s, "failed", f"not ready within {spec.startup_timeout_s:g}s")
                return
            try:
                info = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - reported with the failed server
                cause = _cause(exc)
                why = str(cause) if isinstance(cause, InferenceError) else f"{type(cause).__name__}: {cause}"
                # A model that did not load will not load on that node next time either (same
                # files, same node): leave the node out at once rather than retry it.
                self._end(s, "failed", why, _MAX_START_FAILURES if isinstance(cause, ModelError) else 1)
                return
            with self._lock:
                s.info, s.state, s.ping_last = info, "ready", now
                self._failures.pop(s.node_id, None)
                self._lock.notify_all()
            _log.info(
                "Triton deployment %s: server %d ready at %s on node %s in %.1fs",
                spec.name, s.id, info["url"], s.node_id[:12], info["startup_s"],
            )
            return
        if s.state == "ready":
            if s.ping_ref is not None:
                done, _ = ray.wait([s.ping_ref], timeout=0)
                if done:
                    s.ping_ref = None
                    try:
                        code = ray.get(done[0])
                    except Exception as exc:  # noqa: BLE001 - actor or its node died
                        self._end(s, "lost", f"server actor died: {type(_cause(exc)).__name__}")
                        return
                    if code is not None:
                        self._end(s, "lost", f"tritonserver exited with code {code}")
                        return
                    s.ping_last = now
                elif now - s.ping_sent > _PING_TIMEOUT_S:
                    self._end(s, "lost", f"no answer to a health check within {_PING_TIMEOUT_S:g}s")
                    return
            elif now - s.ping_last >= _PING_INTERVAL_S:
                s.ping_ref, s.ping_sent = s.actor.exit_code.remote(), now


# --------------------------------------------------------------------------- driver side


class DeployedEndpoints(tuple[str, ...]):
    """The URLs of a deployment's ready servers, carrying the deployment's name.

    A plain tuple of ``"ip:port"`` wherever one is expected (the engine passes it to the
    Triton stages untouched); a stage that sees one follows the deployment's changes
    (:class:`EndpointFollower`).
    """

    deployment: str

    def __new__(cls, urls: Sequence[str], deployment: str) -> DeployedEndpoints:
        self = super().__new__(cls, tuple(urls))
        self.deployment = deployment
        return self

    def __getnewargs__(self) -> tuple[tuple[str, ...], str]:  # type: ignore[override]
        return (tuple(self), self.deployment)


def _actor_name(name: str) -> str:
    return _ACTOR_PREFIX + name


class Deployment:
    """Driver-side handle of a deployment's controller actor.

    Args:
        name: The deployment's name.
        handle: Its controller.
        owned: Whether this driver started it for one run (then :func:`deployed` stops it).
    """

    def __init__(self, name: str, handle: Any, *, owned: bool) -> None:
        self.name = name
        self.handle = handle
        self.owned = owned

    def endpoints(self, timeout_s: float = 30.0) -> list[tuple[str, str]]:
        """``[(url, node_id)]`` of the ready servers."""
        return list(ray.get(self.handle.endpoints.remote(), timeout=timeout_s))

    def urls(self, timeout_s: float = 30.0) -> DeployedEndpoints:
        """The ready servers' URLs, as the Triton stages take them."""
        return DeployedEndpoints([u for u, _ in self.endpoints(timeout_s)], self.name)

    def status(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The controller's :meth:`DeploymentController.status`."""
        return dict(ray.get(self.handle.status.remote(), timeout=timeout_s))

    def spec(self, timeout_s: float = 30.0) -> DeploySpec:
        spec: DeploySpec = ray.get(self.handle.spec.remote(), timeout=timeout_s)
        return spec

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop every server and the controller. Never raises for one already gone."""
        with contextlib.suppress(Exception):
            ray.get(self.handle.stop.remote(), timeout=timeout_s)
        with contextlib.suppress(Exception):
            ray.kill(self.handle, no_restart=True)


def find_deployment(name: str) -> Deployment | None:
    """The running deployment called ``name`` on the connected cluster, else ``None``."""
    try:
        handle = ray.get_actor(_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        return None
    return Deployment(name, handle, owned=False)


def start_deployment(spec: DeploySpec, *, detached: bool = False) -> Deployment:
    """Start ``spec``'s servers and wait until they are ready (or settled).

    Fails fast, before starting anything, when no node of the cluster declares the
    resources. Returns once no server is still starting and at least one is ready; a
    server that failed is reported in ``status()`` and replaced by the watcher.

    Args:
        detached: Outlive this driver (``tierflow triton deploy``); else the deployment
            dies with the driver at the latest.

    Raises:
        DeploymentError: A deployment of that name exists, no node holds the resources,
            or no server became ready in time.
    """
    nodes = nodes_from_ray()
    if not eligible_nodes(spec, nodes):
        raise DeploymentError(
            spec.name,
            f"no alive node holds {spec.describe_demand()} per server; nodes looked at:\n"
            f"{resource_report(spec, nodes)}",
        )
    here = ray.get_runtime_context().get_node_id()
    try:
        handle = DeploymentController.options(  # type: ignore[attr-defined]
            name=_actor_name(spec.name), namespace=NAMESPACE,
            lifetime="detached" if detached else None,
            # On the driver's node: it holds no CPU, and a lost worker node must not take
            # the thing that replaces lost servers with it.
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(spec, detached)
    except ValueError as exc:  # the name is taken
        raise DeploymentError(spec.name, f"already running ({exc})") from exc
    deployment = Deployment(spec.name, handle, owned=True)
    try:
        ray.get(handle.wait_ready.remote(spec.startup_timeout_s + 5.0))
    except BaseException as exc:
        deployment.stop()
        cause = _cause(exc)
        if isinstance(cause, DeploymentError):
            raise cause from None
        raise
    return deployment


def check_reusable(spec: DeploySpec, running: DeploySpec) -> None:
    """Raise :class:`DeploymentError` unless ``running`` serves what ``spec`` needs.

    The repository must be the same and every model of ``spec`` must be loaded; counts and
    resources may differ (the running deployment's win).
    """
    if Path(running.repository) != Path(spec.repository):
        raise DeploymentError(
            spec.name, f"running deployment serves {running.repository}, this run needs {spec.repository}"
        )
    missing = sorted(set(spec.models) - set(running.models))
    if missing:
        raise DeploymentError(
            spec.name, f"running deployment does not load {', '.join(missing)} (it loads {', '.join(running.models)})"
        )


@contextlib.contextmanager
def deployed(spec: DeploySpec) -> Iterator[Deployment]:
    """A ready deployment for one run: a running one of that name (left running), else one
    started for the run and stopped when the block exits, on failure too.

    Raises:
        DeploymentError: See :func:`start_deployment`, or the running deployment does not
            serve the models or the repository the run needs, or none of its servers is ready.
    """
    deployment = find_deployment(spec.name)
    if deployment is not None:
        check_reusable(spec, deployment.spec())
        endpoints = ray.get(deployment.handle.wait_ready.remote(spec.startup_timeout_s))
        _log.info(
            "Triton deployment %s: reusing %d running server(s): %s",
            spec.name, len(endpoints), ", ".join(u for u, _ in endpoints),
        )
        yield deployment
        return
    _log.info("Triton deployment %s: starting servers for %s", spec.name, spec.describe_demand())
    deployment = start_deployment(spec)
    try:
        yield deployment
    finally:
        deployment.stop()


class LostServers:
    """Driver side: the servers of a deployment lost since the last :meth:`poll`, never
    blocking the caller (the driver's loop calls it every round).

    Each poll takes the answer to the previous ask, if it came, and asks again at most every
    ``interval_s``. Servers lost before this object was made are not reported (a reused
    deployment's history is not this run's). A controller that is gone (stopped with the
    run) or does not answer is asked again later; nothing is raised.
    """

    def __init__(self, deployment: str, *, interval_s: float = 1.0, handle: Any = None) -> None:
        self.deployment = deployment
        self._interval_s = interval_s
        self._handle = handle
        self._seen = 0
        self._ref: Any = None
        self._asked = -float("inf")
        with contextlib.suppress(Exception):
            self._seen, _ = ray.get(self._controller().lost_since.remote(1 << 62), timeout=10.0)

    def _controller(self) -> Any:
        if self._handle is None:
            self._handle = ray.get_actor(_actor_name(self.deployment), namespace=NAMESPACE)
        return self._handle

    def poll(self) -> list[dict[str, Any]]:
        """``[{node_id, server, reason}]`` of the servers lost since the last answer."""
        lost: list[dict[str, Any]] = []
        if self._ref is not None:
            done, _ = ray.wait([self._ref], timeout=0)
            if not done:
                return lost
            ref, self._ref = self._ref, None
            try:
                seen, lost = ray.get(ref)
            except Exception:  # noqa: BLE001 - the controller is gone or restarting: ask later
                self._handle = None
                return []
            self._seen = max(self._seen, seen)
        now = time.monotonic()
        if now - self._asked >= self._interval_s:
            self._asked = now
            try:
                self._ref = self._controller().lost_since.remote(self._seen)
            except Exception:  # noqa: BLE001 - not found (stopped): ask later
                self._handle = None
        return lost


# --------------------------------------------------------------------------- client side


class EndpointFollower:
    """Keeps a :class:`TritonStageClient`'s endpoints in step with a deployment.

    Asks the controller every ``interval_s`` (a daemon thread) and, through the client's
    ``on_all_out`` hook, whenever every endpoint the client knows is failing (at most every
    ``_FOLLOW_MIN_GAP_S``). Endpoints on this process's Ray node are preferred. When the
    controller cannot be reached the client keeps the endpoints it has.
    """

    def __init__(
        self,
        client: TritonStageClient,
        deployment: str,
        *,
        interval_s: float = FOLLOW_INTERVAL_S,
        node_id: str | None = None,
        fetch: Callable[[], list[tuple[str, str]]] | None = None,
    ) -> None:
        self._client = client
        self._deployment = deployment
        self._interval_s = interval_s
        self._node = node_id if node_id is not None else ray.get_runtime_context().get_node_id()
        self._fetch = fetch or self._ask_controller
        self._handle: Any = None
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._stop = threading.Event()
        client.on_all_out = self.refresh_soon
        self._thread = threading.Thread(target=self._run, name="triton-endpoints", daemon=True)
        self._thread.start()

    def _ask_controller(self) -> list[tuple[str, str]]:
        if self._handle is None:
            self._handle = ray.get_actor(_actor_name(self._deployment), namespace=NAMESPACE)
        return list(ray.get(self._handle.endpoints.remote(), timeout=5.0))

    def refresh(self) -> bool:
        """Ask now and apply the answer; ``False`` if the controller did not answer."""
        with self._lock:
            self._last = time.monotonic()
            try:
                endpoints = self._fetch()
            except Exception as exc:  # noqa: BLE001 - keep serving from what we have
                self._handle = None
                _log.warning("Triton deployment %s: cannot refresh endpoints: %s", self._deployment, exc)
                return False
            local = [u for u, node in endpoints if node == self._node]
            self._client.set_endpoints([u for u, _ in endpoints], prefer=local)
            return True

    def refresh_soon(self) -> None:
        """Refresh unless one happened in the last ``_FOLLOW_MIN_GAP_S`` (the all-out hook)."""
        if time.monotonic() - self._last >= _FOLLOW_MIN_GAP_S:
            self.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
