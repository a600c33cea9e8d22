"""The run telemetry recorder, on a fake clock (no Ray)."""

from __future__ import annotations

import json

from tierflow.cache.tiered import BlockMeta
from tierflow.engine.progress import StepView
from tierflow.engine.runners import Outcome
from tierflow.engine.telemetry import MemorySample, StepResources, Telemetry
from tierflow.io.sink import PartMeta


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recorder(clock: FakeClock, **kwargs: object) -> tuple[Telemetry, list[StepView]]:
    views = [StepView("parse", "task", 10), StepView("embed", "actor", 10), StepView("sink", "parquet", 10)]
    steps = [StepResources("parse", 1.0), StepResources("embed", 0.5, 1.0), StepResources("sink", 1.0)]
    kwargs.setdefault("memory", None)
    return Telemetry("p", steps, clock=clock, **kwargs), views  # type: ignore[arg-type]


def test_samples_at_most_once_per_interval_and_always_when_forced() -> None:
    clock = FakeClock()
    tel, views = recorder(clock)
    views[0].done, views[0].rows_out, views[0].inflight = 1, 100, 2
    views[1].inflight = 3
    assert tel.sample(views)
    clock.now += 0.5
    views[0].done = 2
    assert not tel.sample(views)  # not due: nothing recorded
    clock.now += 0.5
    assert tel.sample(views)
    clock.now += 0.1
    views[0].done = 3
    assert tel.sample(views, force=True)
    parse, embed, _ = tel.to_json()["steps"]
    assert parse["t"] == [0.0, 1.0, 1.1]
    assert parse["done"] == [1, 2, 3]
    assert parse["cpus"] == [2.0, 2.0, 2.0]  # 2 attempts x 1 CPU
    assert embed["cpus"] == [1.5] * 3 and embed["gpus"] == [3.0] * 3
    assert tel.latest["steps"][0]["done"] == 3 and tel.latest["t"] == 1.1


def test_long_runs_are_thinned_to_max_samples_keeping_the_start_and_the_shape() -> None:
    clock = FakeClock()
    tel, views = recorder(clock, max_samples=8)
    for i in range(100):
        views[0].done = i
        tel.sample(views)
        clock.now += 1.0
    parse = tel.to_json()["steps"][0]
    assert len(parse["t"]) <= 9
    assert parse["t"][0] == 0.0 and parse["done"][0] == 0
    assert parse["done"] == sorted(parse["done"]) and len(parse["done"]) == len(parse["t"])
    assert all(done == t for done, t in zip(parse["done"], parse["t"]))  # points stay paired
    assert tel.to_json()["interval_s"] > 1.0


def test_faults_have_times_and_rising_counters_become_fault_events() -> None:
    clock = FakeClock()
    tel, views = recorder(clock)
    tel.sample(views)
    clock.now += 2.0
    tel.fault("node_lost", "abc123")
    views[1].retries = 3
    views[1].retired_actors = 1
    clock.now += 1.0
    tel.sample(views)
    clock.now += 1.0
    tel.sample(views)  # no rise since: no new events
    out = tel.to_json()
    assert {"t": 2.0, "kind": "node_lost", "detail": "abc123"} in out["faults"]
    assert {"t": 3.0, "kind": "retry", "detail": "embed +3"} in out["faults"]
    assert {"t": 3.0, "kind": "actor_retired", "detail": "embed +1"} in out["faults"]
    assert out["fault_counts"] == {"actor_retired": 1, "node_lost": 1, "retry": 3}
    assert tel.latest["faults"]["retry"] == 3


def test_fault_events_are_capped_but_counted_exactly() -> None:
    clock = FakeClock()
    tel, _ = recorder(clock, max_faults=5)
    for i in range(50):
        tel.fault("rereplicated", f"block {i}")
    out = tel.to_json()
    assert len(out["faults"]) == 5 and out["fault_counts"] == {"rereplicated": 50}


def _done(node: str, locations: tuple[str, ...], nbytes: int = 1000, read: str = "", **fields: int) -> Outcome:
    return Outcome(True, BlockMeta("p/f/s/000001", 10, nbytes, "xxh3-128:0", locations), node=node,
                   read_tier=read, read_bytes=nbytes, **fields)


def test_reads_are_the_tiers_the_workers_report_and_writes_per_tier_with_bytes() -> None:
    clock = FakeClock()
    tel, views = recorder(clock)
    tel.block(0, _done("n1", ("lmdb:n1", "lmdb:n2"), read="source"), 0)
    tel.block(1, _done("n1", ("lmdb:n1",), 500, read="memory"), 0)
    tel.block(1, _done("n3", ("lmdb:n3", "remote"), 500, read="peer"), 1)
    tel.block(1, _done("n3", ("lmdb:n3",), 500, read="remote"), 2)
    tel.block(1, _done("n3", ("lmdb:n3",), 500, read="lmdb"), 3)
    tel.block(1, _done("n3", ("lmdb:n3",), 500), 4)  # a backend that does not say
    tel.block(2, Outcome(True, PartMeta("part-000001.parquet", 10, 4321, "x"), node="n2", read_tier="peer",
                         read_bytes=77), 0)
    tel.sample(views, force=True)
    parse, embed, sink = tel.to_json()["steps"]
    assert parse["reads"] == {"source": 1} and parse["read_bytes"] == {"source": 1000}
    assert parse["writes"] == {"local": {"count": 1, "bytes": 1000}, "peer": {"count": 1, "bytes": 1000}}
    assert embed["reads"] == {"local": 1, "memory": 1, "peer": 1, "remote": 1, "unknown": 1}
    assert embed["writes"] == {"local": {"count": 5, "bytes": 2500}, "remote": {"count": 1, "bytes": 500}}
    assert sink["reads"] == {"peer": 1} and sink["read_bytes"] == {"peer": 77}
    assert sink["writes"] == {"sink": {"count": 1, "bytes": 4321}}
    assert tel.latest["writes"][2] == {"sink": (1, 4321)}
    assert tel.usage[1].hit_ratio() == 2 / 5  # memory and local, of five cache reads


def test_held_bytes_fall_when_the_next_step_consumes_a_block_and_spills_are_counted() -> None:
    clock = FakeClock()
    tel, views = recorder(clock)
    tel.block(0, _done("n1", ("lmdb:n1", "lmdb:n2")), 0)
    tel.block(0, _done("n1", ("lmdb:n2", "remote"), 300), 1)  # its own LMDB refused it: spilled
    assert tel.usage[0].held == {"local": 1000, "peer": 1300, "remote": 300}
    assert tel.usage[0].spilled == 300
    tel.sample(views, force=True)
    tel.consumed(0, 0)
    tel.consumed(0, 0)  # told twice (a speculative copy): counted once
    assert tel.usage[0].held == {"local": 0, "peer": 300, "remote": 300}
    clock.now += 1
    tel.sample(views, force=True)
    assert tel.to_json()["steps"][0]["held_bytes"] == [2600, 600]  # the timeline follows


def test_worker_memory_is_summed_over_fresh_workers_counted_once_and_peaks_are_the_highest_reported() -> None:
    clock = FakeClock()
    tel, views = recorder(clock)
    mb = 1 << 20
    tel.block(0, _done("n1", (), pid=11, rss_start=100 * mb, rss_end=110 * mb, rss_peak=310 * mb,
                       memory_tier_bytes=5 * mb), 0)
    clock.now += 5
    tel.block(0, _done("n2", (), pid=11, rss_start=90 * mb, rss_end=95 * mb, rss_peak=120 * mb), 1)
    tel.sample(views, force=True)
    use = tel.usage[0]
    assert (use.rss_now, use.rss_peak, use.grew_peak, use.memory_tier_now) == (205 * mb, 310 * mb, 210 * mb, 5 * mb)
    clock.now += 6  # the first worker has not reported for 11 s: no longer one of the stage's
    tel.sample(views, force=True)
    assert (use.rss_now, len(use.workers)) == (95 * mb, 1)
    step = tel.to_json()["steps"][0]
    assert (step["rss_peak"], step["step_memory_peak"], step["rss"]) == (310 * mb, 210 * mb, [205 * mb, 95 * mb])
    # the same task worker then runs a block of the next stage: it counts there only
    tel.block(1, _done("n2", (), pid=11, rss_start=95 * mb, rss_end=150 * mb, rss_peak=160 * mb), 0)
    tel.sample(views, force=True)
    assert (tel.usage[0].rss_now, tel.usage[1].rss_now) == (0, 150 * mb)


def test_memory_is_probed_on_its_own_interval_and_dropped_when_unavailable() -> None:
    clock = FakeClock()
    calls: list[float] = []

    def probe() -> MemorySample:
        calls.append(clock.now)
        return MemorySample(workers_rss=3000, workers=3, max_worker_rss=1500, driver_rss=700)

    tel, views = recorder(clock, memory=probe, memory_interval_s=5.0)
    for _ in range(12):
        tel.sample(views)
        clock.now += 1.0
    assert calls == [100.0, 105.0, 110.0]
    mem = tel.to_json()["memory"]
    assert mem["t"] == [0.0, 5.0, 10.0] and mem["workers_rss"] == [3000] * 3 and mem["driver_rss"] == [700] * 3
    assert tel.latest["memory"]["workers"] == 3  # carried between probes

    slow_calls: list[float] = []

    def slow_probe() -> MemorySample:
        slow_calls.append(clock.now)
        clock.now += 0.1  # a probe that costs 100 ms: wait 10 s for the next one
        return MemorySample(1, 1, 1, 1)

    tel3, views = recorder(clock, memory=slow_probe, memory_interval_s=2.0)
    start = clock.now
    for _ in range(25):
        tel3.sample(views)
        clock.now += 1.0
    assert [round(c - start, 1) for c in slow_calls] == [0.0, 10.1, 20.2]

    tel2, views = recorder(clock, memory=lambda: None)
    tel2.sample(views)
    clock.now += 10.0
    tel2.sample(views)
    assert tel2.to_json()["memory"]["t"] == []


def test_finish_takes_a_last_sample_runs_closers_and_is_json() -> None:
    clock = FakeClock()
    tel, views = recorder(clock)
    closed: list[bool] = []
    tel.closers.append(lambda: closed.append(True))
    tel.sample(views)
    for v in views:
        v.done = 10
    clock.now += 0.2  # not due: finish samples anyway
    out = json.loads(json.dumps(tel.finish(views)))
    assert [s["done"][-1] for s in out["steps"]] == [10, 10, 10]
    assert closed == [True]
    tel.finish(views)
    assert closed == [True]  # once


def test_a_lost_nodes_copies_stop_counting_as_held_and_re_replicated_copies_start() -> None:
    clock = FakeClock()
    tel, views = recorder(clock)
    tel.block(0, _done("n1", ("lmdb:n1", "lmdb:n2")), 0)
    tel.block(0, _done("n2", ("lmdb:n2", "lmdb:n3"), 200), 1)
    tel.block(1, _done("n2", ("lmdb:n2",), 50, pid=7, rss_end=10), 0)
    assert tel.usage[0].held == {"local": 1200, "peer": 1200}
    tel.node_lost("n2")
    assert tel.usage[0].held == {"local": 1000, "peer": 200}  # n2's local 200 and peer 1000 are gone
    assert tel.usage[1].held == {"local": 0} and tel.usage[1].workers == {}
    assert tel.to_json()["fault_counts"] == {"node_lost": 1}
    tel.copied(0, 1, ("lmdb:n4",))  # block 1 is back to two copies
    assert tel.usage[0].held == {"local": 1000, "peer": 400}
    tel.block(0, _done("n1", ("lmdb:n1", "lmdb:n2"), 10), 2)  # reported after n2 was lost
    assert tel.usage[0].held == {"local": 1010, "peer": 400}
    for block in (0, 1, 2):
        tel.consumed(0, block)
    assert tel.usage[0].held == {"local": 0, "peer": 0}  # never below zero: lost copies not taken twice
    tel.copied(0, 0, ("lmdb:n5",))  # consumed meanwhile: nothing to add
    assert tel.usage[0].held == {"local": 0, "peer": 0}


def test_evicted_bytes_are_summed_per_tier_and_backpressure_is_sampled() -> None:
    clock = FakeClock()
    tel, views = recorder(clock)
    tel.block(0, _done("n1", ("lmdb:n1",), evicted_memory_bytes=300, evicted_lmdb_bytes=7), 0)
    tel.block(0, _done("n1", ("lmdb:n1",), evicted_memory_bytes=200, evicted_peer_bytes=40), 1)
    views[0].done, views[0].inflight, views[0].limit = 2, 1, 4
    views[1].inflight, views[1].queued, views[1].limit = 2, 5, 2  # saturated, blocks waiting
    tel.sample(views, force=True)
    assert tel.latest["usage"][0]["evicted"] == {"local": 7, "memory": 500, "peer": 40}
    assert [s["held_back"] for s in tel.latest["steps"]] == [1, 0, 0]
    parse = tel.to_json()["steps"][0]
    assert parse["evicted"] == {"local": 7, "memory": 500, "peer": 40} and parse["held_back"] == [1]
    assert parse["evicted_bytes"] == [547]
