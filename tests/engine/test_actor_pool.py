"""The actor pool grows under backlog and shrinks when idle (real local Ray actors)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray

from tierflow.engine.pool import RETIRE_AFTER, SPARE_REFILL_S, ActorPool

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
class Echo:
    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()


def stopped(actor: object, timeout_s: float = 30.0) -> bool:
    """Whether ``actor`` dies within ``timeout_s`` (``ray.kill`` goes through the GCS, so a
    call sent right after it may still be served)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=timeout_s)  # type: ignore[attr-defined]
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.1)
    return False


class Clock:
    """Time the pool sees, stepped by the test instead of slept."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_pool_scales_between_min_and_max(local_ray: None) -> None:
    clock = Clock()
    pool = ActorPool(None, lambda node: Echo.remote(), min_size=1, max_size=3, idle_s=0.2, clock=clock)  # type: ignore[arg-type]
    assert len(pool.actors) == 1 and pool.idle == 3
    busy = [pool.acquire() for _ in range(3)]  # backlog: two more actors start at once
    assert len(pool.actors) == 3 and pool.started == 3 and pool.idle == 0
    node = ray.get_runtime_context().get_node_id()
    assert ray.get([a.ready.remote() for a in busy]) == [node] * 3
    for a in busy:
        pool.release(a, node)
    again = pool.acquire()
    assert again is busy[-1]  # reuse, most recently used first
    pool.release(again, node)
    clock.now += 0.1
    pool.shrink()
    assert len(pool.actors) == 3  # not idle for long enough yet
    clock.now += 0.15
    pool.shrink()
    assert len(pool.actors) == 1  # back to min once idle
    gone = pool.actors[0]
    pool.replace(gone)  # under min: the successor starts now, not when a block needs it
    assert len(pool.actors) == 1 and pool.started == 4 and pool.actors[0] is not gone
    assert pool.acquire() is pool.actors[0]
    pool.shutdown()


def test_an_idle_actor_on_the_node_of_the_input_is_preferred() -> None:
    pool = ActorPool(None, lambda node: object(), 3, 3)  # type: ignore[arg-type]
    a, b, c = pool.actors
    pool._where.update({a: "n1", b: "n2", c: "n3"})
    assert pool.acquire(["n9", "n2"]) is b  # the input has a copy on n2: read locally
    assert pool.acquire(["n9"]) is c  # none idle where the input is: the most recently used
    pool.release(b, "n2")
    assert pool.acquire(["n1"]) is a
    assert pool.acquire() is b


def test_an_actor_failing_too_often_is_retired_and_replaced(local_ray: None) -> None:
    pool = ActorPool(None, lambda node: Echo.remote(), min_size=2, max_size=2)  # type: ignore[arg-type]
    bad, good = pool.acquire(), pool.acquire()
    for _ in range(RETIRE_AFTER - 1):
        pool.release(bad, "", failed=True)
        assert pool.acquire() is bad  # still in service: failures below the limit
    pool.release(good, "", failed=True)  # a failure elsewhere does not count against ``bad``
    pool.acquire()
    pool.release(bad, "", failed=True)
    assert pool.retired == 1 and bad not in pool.actors and good in pool.actors
    fresh = pool.acquire()
    assert fresh is not bad and fresh is not good and ray.get(fresh.ready.remote())
    assert stopped(bad)  # stopped, not just set aside
    pool.shutdown()


def test_the_actors_of_a_lost_node_are_dropped_and_succeeded_at_once(local_ray: None) -> None:
    pool = ActorPool(None, lambda node: Echo.remote(), min_size=2, max_size=3)  # type: ignore[arg-type]
    pool.wait_ready(30)  # learns where each actor runs
    node = ray.get_runtime_context().get_node_id()
    idle, busy = pool.actors[0], pool.acquire()
    pool.lose_node("some-other-node")
    assert pool.actors == [idle, busy]
    pool.lose_node(node)
    assert idle not in pool.actors and busy not in pool.actors and pool.started == 4
    assert len(pool.actors) == 2 and pool.idle == 3  # two successors, idle, already starting
    pool.release(busy, node)  # the lost actor's block came back: it is not taken back
    assert busy not in pool.actors and pool.idle == 3
    assert stopped(idle) and stopped(busy)
    assert ray.get([pool.acquire().ready.remote() for _ in range(2)]) == [node, node]
    pool.shutdown()


def test_a_constructed_spare_takes_over_from_a_dead_actor(local_ray: None) -> None:
    asked: list[set[str]] = []

    def place(demand: object, avoid: object) -> str:
        asked.append(set(avoid))  # type: ignore[call-overload]
        return ""  # anywhere

    clock = Clock()
    pool = ActorPool(None, lambda node: Echo.remote(), min_size=1, max_size=1, standby=1, place=place,  # type: ignore[arg-type]
                     clock=clock)
    pool.wait_ready(30)
    node = ray.get_runtime_context().get_node_id()
    assert asked == [{node}]  # the spare is asked to stay off the working actor's node
    working = pool.actors[0]
    deadline = time.monotonic() + 30
    while not pool._built_spares() and time.monotonic() < deadline:  # let it construct
        time.sleep(0.05)
    spare = pool._built_spares()[0]
    pool.replace(working)  # died
    assert pool.actors == [spare] and pool.took_over == 1  # constructed already: no wait
    pool.refill()
    assert len(asked) == 1  # no new spare in the middle of a recovery...
    clock.now += SPARE_REFILL_S - 0.5
    pool.refill()
    assert len(asked) == 1  # ... only SPARE_REFILL_S later
    clock.now += 0.5
    pool.refill()
    assert len(asked) == 2 and pool.started == 3
    assert ray.get(pool.acquire().ready.remote()) == node
    pool.shutdown()
    assert stopped(spare) and stopped(working)


def test_an_actor_that_cannot_start_mid_run_fails_the_run_naming_the_stage(local_ray: None) -> None:
    from types import SimpleNamespace

    from tierflow.errors import TierflowError

    stage = SimpleNamespace(name="embed", config=SimpleNamespace(demand={"CPU": 64}))
    fits = ActorPool(stage, lambda node: Echo.remote(), min_size=0, max_size=1)  # type: ignore[arg-type]
    grown = fits.acquire()  # started mid-run (growth; a successor alike)
    deadline = time.monotonic() + 30
    while fits._starting and time.monotonic() < deadline:
        fits.check_starting(timeout_s=30)
        time.sleep(0.05)
    assert fits._where[grown] == ray.get_runtime_context().get_node_id()  # constructed: placed
    fits.shutdown()
    # e.g. the node with the CPUs it needs was lost and none joined
    made: list[object] = []

    def factory(node: object) -> object:  # the first actor fits, later ones never will
        made.append(Echo.options(num_cpus=64 if made else 0).remote())
        return made[-1]

    clock = Clock()
    pool = ActorPool(stage, factory, min_size=1, max_size=2, clock=clock)  # type: ignore[arg-type]
    pool.wait_ready(30)
    working = pool.acquire()
    pool.acquire()  # grows: this one waits for CPUs that never come
    pool.check_starting(timeout_s=0.5)  # not late yet
    clock.now += 0.6
    pool.check_starting(timeout_s=0.5)  # late, but the stage still has a working actor: no failure
    pool.replace(working)  # its only working actor is gone: nothing can run the stage now
    with pytest.raises(TierflowError, match=r"stage 'embed': 1 actor\(s\) needing 64 CPU each could not start"):
        pool.check_starting(timeout_s=0.5)
    pool.shutdown()


def test_a_spare_starts_only_where_the_cluster_has_room_for_it(local_ray: None) -> None:
    room = {"free": False}
    pool = ActorPool(None, lambda node: Echo.remote(), min_size=1, max_size=1, standby=1,  # type: ignore[arg-type]
                     place=lambda demand, avoid: "" if room["free"] else None)
    pool.wait_ready(30)
    assert not pool._spares and pool.started == 1  # no room (e.g. a node was lost): no spare
    room["free"] = True
    pool.refill()  # asked again later: room now
    assert len(pool._spares) == 1 and pool.started == 2
    pool.shutdown()


RECORD = """
import os


class Record:
    def __init__(self, log):
        self.log = log

    def __call__(self, t):
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()} {t.num_rows}\\n")
        return t
"""


def test_a_spare_is_warmed_on_one_row_before_it_takes_over(local_ray: None, tmp_path: Path) -> None:
    import pyarrow as pa

    from tierflow.cache.settings import CacheSettings
    from tierflow.cache.tiered import get_cache
    from tierflow.engine.runners import StageActor, StepIO
    from tierflow.manifest import parse_manifest

    (tmp_path / "record_stage.py").write_text(RECORD)
    log = tmp_path / "calls.txt"
    stage = parse_manifest({"name": "p", "source": {"format": "csv", "path": "x"}, "sink": {"path": "o"}, "stages": [
        {"name": "rec", "kind": "python", "cls": "record_stage:Record", "params": {"log": str(log)}}]}).stages[0]
    settings = CacheSettings(root=str(tmp_path / "cache"), replicas=1)
    env = {"env_vars": {"PYTHONPATH": str(tmp_path)}}

    def factory(node: object) -> object:
        return StageActor.options(num_cpus=0, runtime_env=env).remote((stage,), None, settings)  # type: ignore[attr-defined]

    pool = ActorPool(None, factory, min_size=1, max_size=1, standby=1)  # type: ignore[arg-type]
    pool.wait_ready(60)
    cache = get_cache(settings)
    cache.put_table("p/in/0", pa.table({"id": pa.array(range(5), pa.int64())}), durable=False)
    working = pool.acquire()
    assert ray.get(working.run.remote(None, StepIO("p/in/0", "p/out/0"))).ok
    pool.warm(None, StepIO("p/in/0", "p/out/warm"))
    pool.warm(None, StepIO("p/in/0", "p/out/warm"))  # once per spare
    spare = next(iter(pool._spares))
    ray.get(spare.ready.remote())  # the actor's calls run in order: the warm-up has run
    pids = {name: ray.get(a.__ray_call__.remote(lambda self: os.getpid())) for name, a in
            (("working", working), ("spare", spare))}
    calls = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert sorted(calls) == sorted([(pids["working"], 5), (pids["spare"], 1)])
    assert not cache.contains("p/out/warm")  # a warm-up writes nothing
    pool.replace(working)  # died: the warmed spare takes over
    assert pool.actors == [spare] and pool.took_over == 1
    pool.shutdown()
