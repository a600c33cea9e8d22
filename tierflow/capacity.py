"""Whether the cluster can ever hold what the manifest asks for: checked once Ray is up,
before any block runs.

``tierflow.checks`` checks what needs no cluster. This module compares each stage's
per-worker demand (``num_cpus``, ``num_gpus``, ``resources``; a Triton deployment's per
server) with Ray's node table: a stage no alive node can hold would otherwise wait in
Ray's queue for ever (Ray Data stalls silently in that case). It also checks that the
actor pools and the Triton servers, which hold their GPUs and custom resources for the
whole run, leave each task stage what it needs (the cluster's totals: a necessary
condition, not a bin-packing proof).

A cluster with an autoscaler may add the missing node on demand: ``ray: {autoscaler:
true}`` skips the check (Ray's node table shows only the nodes up now).

>>> nodes = {"n1": {"CPU": 2, "GPU": 1}, "n2": {"CPU": 2, "GPU": 1}, "head": {"CPU": 4}}
>>> for where, reason in unmet_demand([("stages[0]", "stage 'embed'", {"CPU": 1, "GPU": 2})], nodes):
...     print(where, "|", reason)
stages[0].num_gpus | stage 'embed' asks for 1 CPU, 2 GPU per worker; no alive node has that (largest offers: 2 nodes with 2 CPU, 1 GPU; 1 node with 4 CPU, 0 GPU)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from tierflow.engine.placement import Resources, at_once, describe, holds
from tierflow.errors import ManifestError
from tierflow.manifest import Manifest, PythonStage, TritonStage

__all__ = ["check_cluster", "manifest_demands", "unmet_demand", "unmet_totals"]

MAX_OFFERS = 5  # distinct node offers named in a message (a 1000-node cluster has few kinds)


def _field(key: str) -> str:
    return {"CPU": "num_cpus", "GPU": "num_gpus"}.get(key, f"resources.{key}")


def _offers(demand: Resources, nodes: Mapping[str, Resources]) -> str:
    """What the nodes have of ``demand``'s resources, alike nodes grouped, best first."""
    keys = sorted(demand, key=lambda k: (k != "CPU", k != "GPU", k))
    offers = Counter(tuple(float(res.get(k, 0.0)) for k in keys) for res in nodes.values())
    # nearest to the demand first: the share of each resource asked for that the node has
    ranked = sorted(offers.items(), key=lambda item: (sum(min(a / demand[k], 1.0) for k, a in zip(keys, item[0])),
                                                      item[0]), reverse=True)
    parts = [f"{n} node{'s' if n != 1 else ''} with {describe(dict(zip(keys, have)))}" for have, n in ranked]
    more = f"; {len(parts) - MAX_OFFERS} more kinds" if len(parts) > MAX_OFFERS else ""
    return "; ".join(parts[:MAX_OFFERS]) + more


def unmet_demand(demands: Sequence[tuple[str, str, Resources]], nodes: Mapping[str, Resources]) -> list[tuple[str, str]]:
    """``(field path, reason)`` for each ``(where, stage, demand per worker)`` that no node
    in ``nodes`` (alive node -> its total resources) can hold. Pure.

    The path names the one resource no node has enough of (``stages[2].num_gpus``), else
    the stage: each node lacks something else.
    """
    problems = []
    for where, name, demand in demands:
        if not demand or any(holds(res, demand) for res in nodes.values()):
            continue
        short = [k for k in demand if not any(holds(res, {k: demand[k]}) for res in nodes.values())]
        path = f"{where}.{_field(short[0])}" if len(short) == 1 else where
        problems.append((path, f"{name} asks for {describe(demand)} per worker; no alive node has that "
                               f"(largest offers: {_offers(demand, nodes) or 'no nodes'})"))
    return problems


def unmet_totals(
    held: Sequence[tuple[str, Resources]], tasks: Sequence[tuple[str, Resources]], nodes: Mapping[str, Resources]
) -> list[tuple[str, str]]:
    """``("stages", reason)`` for each task stage (``tasks``: ``(who, demand per task)``)
    left less of a GPU or custom resource than one task needs by the workers that hold
    theirs for the whole run (``held``: ``(who, all they hold)`` of each actor pool and
    Triton deployment), in the cluster's totals. Pure. (CPUs are left out: placement keeps
    a CPU slot free for the task steps, ``tierflow.engine.placement``.)

    >>> unmet_totals([("stage 'm' (2 actors)", {"CPU": 2, "GPU": 2})], [("stage 't'", {"GPU": 0.5})],
    ...              {"a": {"CPU": 8, "GPU": 1}, "b": {"GPU": 1}})
    [('stages', "stage 't' needs 0.5 GPU per task, but stage 'm' (2 actors) hold 2 GPU for the whole run, of the cluster's 2")]
    """
    total: dict[str, float] = {}
    for res in nodes.values():
        for k, v in res.items():
            total[k] = total.get(k, 0.0) + v
    problems = []
    for who, demand in tasks:
        for k, need in sorted(demand.items()):
            holding = [(h, res[k]) for h, res in held if res.get(k, 0.0) > 0]
            kept = sum(amount for _, amount in holding)
            if k == "CPU" or not holding or holds({k: total.get(k, 0.0) - kept}, {k: need}):
                continue
            holders = ", ".join(h for h, _ in holding)
            problems.append(("stages", f"{who} needs {need:g} {k} per task, but {holders} hold {kept:g} {k} "
                                       f"for the whole run, of the cluster's {total.get(k, 0.0):g}"))
    return problems


def manifest_demands(manifest: Manifest, nodes: Mapping[str, Resources]) -> tuple[list[tuple[str, str, Resources]], list[tuple[str, Resources]],
                                                 list[tuple[str, Resources]]]:
    """What the manifest asks of the cluster: ``(where, who, demand per worker)`` of every
    step and Triton server; ``(who, resources)`` held for the whole run (actor pools at
    their minimum size, capped at what ``nodes`` hold as the backend does; the Triton
    servers of a ``replicas: N`` deployment); ``(who, demand)`` of every task stage. Fused
    stages run with the next stage's resources: left out."""
    demands: list[tuple[str, str, Resources]] = []
    held: list[tuple[str, Resources]] = []
    tasks: list[tuple[str, Resources]] = []
    for i, stage in enumerate(manifest.stages):
        if isinstance(stage, PythonStage) and stage.fuse:
            continue
        who = f"stage {stage.name!r}"
        demands.append((f"stages[{i}]", who, stage.demand))
        if isinstance(stage, TritonStage) or stage.cls is not None:
            n = stage.concurrency_range[0]
            n = min(n, at_once(nodes, stage.demand) or n)  # the backend caps a pool at what the nodes hold
            held.append((f"{who} ({n} actor{'s' if n != 1 else ''})", {k: n * v for k, v in stage.demand.items()}))
        else:
            tasks.append((who, stage.demand))
    deploy = manifest.triton.deploy
    if deploy is not None:
        server = {"CPU": deploy.num_cpus, "GPU": deploy.num_gpus, **deploy.resources}
        server = {k: v for k, v in server.items() if v > 0}
        demands.append(("triton.deploy", "a Triton server", server))
        if isinstance(deploy.replicas, int):
            n = deploy.replicas
            held.append((f"Triton ({n} server{'s' if n != 1 else ''})", {k: n * v for k, v in server.items()}))
    return demands, held, tasks


def check_cluster(manifest: Manifest, path: str, nodes: Mapping[str, Resources] | None = None) -> None:
    """Raise ManifestError (naming ``path``, each stage and resource, and what the nodes
    offer) when the cluster can never run the manifest; return quietly otherwise or with
    ``ray.autoscaler: true``. ``nodes`` (alive node -> total resources) defaults to Ray's
    node table: call it connected to Ray."""
    if manifest.ray.autoscaler:
        return
    if nodes is None:
        from tierflow.engine.nodes import read_node_table

        nodes = read_node_table()
    demands, held, tasks = manifest_demands(manifest, nodes)
    # A stage no node holds says it all; the totals only matter once each one fits.
    problems = unmet_demand(demands, nodes) or unmet_totals(held, tasks, nodes)
    if problems:
        hint = " (checked against Ray's nodes now; ray.autoscaler: true skips this check)"
        raise ManifestError(path, [(where, reason + hint) for where, reason in problems])
