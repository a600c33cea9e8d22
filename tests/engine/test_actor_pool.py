"""The actor pool grows under backlog and shrinks when idle (real local Ray actors)."""

from __future__ import annotations

import time

import pytest
import ray

from tierflow.engine.backend import RETIRE_AFTER, ActorPool

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
class Echo:
    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_pool_scales_between_min_and_max(local_ray: None) -> None:
    pool = ActorPool(None, lambda: Echo.remote(), min_size=1, max_size=3, idle_s=0.2)  # type: ignore[arg-type]
    assert len(pool.actors) == 1 and pool.idle == 3
    busy = [pool.acquire() for _ in range(3)]  # backlog: two more actors start at once
    assert len(pool.actors) == 3 and pool.started == 3 and pool.idle == 0
    assert ray.get([a.ready.remote() for a in busy]) == [True] * 3
    for a in busy:
        pool.release(a)
    again = pool.acquire()
    assert again is busy[-1]  # reuse, most recently used first
    pool.release(again)
    time.sleep(0.3)
    pool.shrink()
    assert len(pool.actors) == 1  # back to min once idle
    pool.replace(pool.actors[0])
    assert pool.actors == [] and pool.idle == 3
    assert pool.acquire() is not None and pool.started == 4
    pool.shutdown()


def test_an_actor_failing_too_often_is_retired_and_replaced(local_ray: None) -> None:
    pool = ActorPool(None, lambda: Echo.remote(), min_size=2, max_size=2)  # type: ignore[arg-type]
    bad, good = pool.acquire(), pool.acquire()
    for _ in range(RETIRE_AFTER - 1):
        pool.release(bad, failed=True)
        assert pool.acquire() is bad  # still in service: failures below the limit
    pool.release(good, failed=True)  # a failure elsewhere does not count against ``bad``
    pool.acquire()
    pool.release(bad, failed=True)
    assert pool.retired == 1 and bad not in pool.actors and good in pool.actors
    fresh = pool.acquire()
    assert fresh is not bad and fresh is not good and ray.get(fresh.ready.remote())
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(bad.ready.remote(), timeout=30)  # stopped, not just set aside
    pool.shutdown()


def test_concurrency_accepts_a_range() -> None:
    from tierflow.errors import ManifestError
    from tierflow.manifest import parse_manifest

    base = {"name": "p", "source": {"format": "csv", "path": "x"}, "sink": {"path": "o"}}
    m = parse_manifest({**base, "stages": [{"name": "a", "kind": "python", "cls": "m:C", "concurrency": [1, 4]}]})
    assert m.stages[0].concurrency_range == (1, 4)
    with pytest.raises(ManifestError, match="concurrency"):
        parse_manifest({**base, "stages": [{"name": "a", "kind": "python", "fn": "m:f", "concurrency": [3, 2]}]})
