"""What runs inside Ray workers: one stage applied to one block, cache in and cache out.

A step reads its input block (from the source for the first stage, else from the cache by
key), transforms it, writes the result into the cache and returns an ``Outcome`` holding
only metadata. User exceptions come back as a failed ``Outcome`` (not a Ray error), so the
driver can tell a bug in a stage (fail fast) from a lost worker (retry elsewhere).

Tasks are submitted with ``max_retries=0`` and actors with ``max_task_retries=0``: a block
is never rebuilt by Ray's lineage; the driver retries it from the cache.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from tierflow.cache.settings import CacheSettings
from tierflow.cache.tiered import TieredCache, get_cache
from tierflow.code import load_object
from tierflow.engine.rss import measure_end, measure_start
from tierflow.errors import ReplicaLost, TierflowError, TierUnavailable
from tierflow.io.fs import filesystem, write_atomic
from tierflow.io.sink import Sink
from tierflow.io.source import BlockSpec, Source
from tierflow.manifest import PythonStage, Stage, TritonStage

Transform = Callable[[pa.Table], pa.Table]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one step on one block. ``meta`` is a BlockMeta or a PartMeta.

    The figures measured in the worker (see :mod:`tierflow.engine.rss`) ride along: plain
    ints and one short string, a few dozen bytes of pickle per step.
    """

    ok: bool
    meta: Any = None
    error: str = ""
    retryable: bool = False
    lost_input: bool = False
    rows_in: int = 0
    seconds: float = 0.0
    node: str = ""  # the Ray node it ran on ("" when unknown: the worker died)
    crashed: bool = False  # its worker, actor or node died under it (not the step's own failure)
    rejected: int = 0  # input rows set aside as dead letters (``on_error: skip_rows``)
    read_tier: str = ""  # where the input came from: source, memory, lmdb, peer, remote ("" unknown)
    read_bytes: int = 0  # its size (the cache frame, or the source block's Arrow buffers)
    pid: int = 0  # the worker process (with ``node``: which worker the RSS figures are of)
    rss_start: int = 0  # the worker's RSS when the step started, in bytes
    rss_end: int = 0  # ... when it ended
    rss_peak: int = 0  # ... at its highest while the step ran
    memory_tier_bytes: int = 0  # held by the worker's in-process cache tier after the step
    evicted_memory_bytes: int = 0  # bytes the worker's memory tier evicted while the step ran
    evicted_lmdb_bytes: int = 0  # ... and that its writes evicted from the node's LMDB
    evicted_peer_bytes: int = 0  # ... and from other nodes' LMDB (its peer copies)


def make_transform(chain: Sequence[Stage], triton_url: str | tuple[str, ...] | None) -> Transform:
    """Build the per-process callable for a step: its stages applied in order (fused
    stages first), each built once (imports code, creates the instance)."""
    transforms = [_stage_transform(stage, triton_url) for stage in chain]
    if len(transforms) == 1:
        return transforms[0]

    def fused(table: pa.Table) -> pa.Table:
        for transform in transforms:
            table = transform(table)
        return table

    return fused


def _stage_transform(stage: Stage, triton_url: str | tuple[str, ...] | None) -> Transform:
    if isinstance(stage, TritonStage):
        from tierflow.triton.client import TritonStageClient

        if not triton_url:
            raise TierflowError(f"stage {stage.name!r} needs a Triton server and none is configured")
        client = TritonStageClient(
            url=triton_url,
            model=stage.model,
            model_version=stage.model_version,
            inputs=stage.inputs,
            outputs=stage.outputs,
            batch_size=stage.batch_size,
            max_inflight=stage.max_inflight,
            timeout_s=stage.timeout_s,
            shared_memory=stage.shared_memory,
            shared_memory_min_bytes=stage.shared_memory_min_bytes,
        )
        from tierflow.triton.deploy import DeployedEndpoints, EndpointFollower

        if isinstance(triton_url, DeployedEndpoints):
            # Servers tierflow deployed come and go (lost nodes, replacements): follow the
            # controller, and use this node's server first.
            EndpointFollower(client, triton_url.deployment).refresh()
        return client.infer_table
    assert isinstance(stage, PythonStage)
    obj = load_object(stage.target)
    if stage.cls is not None:
        fn: Callable[..., Any] = obj(**stage.params)
        params: dict[str, Any] = {}
    else:
        fn, params = obj, stage.params
    name, batch_rows = stage.name, stage.batch_rows

    def apply(table: pa.Table) -> pa.Table:
        if batch_rows is None or table.num_rows <= batch_rows:
            return _checked(name, fn(table, **params))
        parts = [
            _checked(name, fn(table.slice(i, batch_rows), **params))
            for i in range(0, table.num_rows, batch_rows)
        ]
        return pa.concat_tables(parts, promote_options="default")

    return apply


def _checked(stage: str, out: object) -> pa.Table:
    if not isinstance(out, pa.Table):
        raise TypeError(f"stage {stage!r} returned {type(out).__name__}, expected pyarrow.Table")
    return out


@dataclass(frozen=True, slots=True)
class StepIO:
    """Where one step reads and writes. ``input`` is a source block or a cache key whose
    copies are at ``locations`` (asked first); ``durable`` also writes the durable store."""

    input: BlockSpec | str
    output: str
    locations: tuple[str, ...] = ()
    durable: bool = False
    retry_on: tuple[str, ...] = ()  # user exceptions (class names) worth another attempt
    rejects_to: tuple[str, dict[str, str]] | None = None  # dead-letter file base, options (skip_rows)


def durable_output(settings: CacheSettings, checkpoint: bool) -> bool:
    """Whether a stage's blocks get a copy in the durable store when written.

    With a remote store: checkpoints always; other blocks when ``replicas`` is 1 (the
    durable copy is then their only protection against losing the node). With
    ``replicas`` >= 2 other blocks live on that many nodes' LMDB only. Without a remote
    store the durable store is the local disk, which LMDB already is: nothing extra.
    """
    return settings.remote_url is not None and (checkpoint or settings.replicas == 1)


def read_input(source: Source | None, io: StepIO, settings: CacheSettings) -> pa.Table:
    """A step's input: a cached block by key, or a block of the source."""
    return read_located(source, io, settings)[0]


def read_located(source: Source | None, io: StepIO, settings: CacheSettings) -> tuple[pa.Table, str, int]:
    """:func:`read_input`, plus where it came from (a cache tier, or ``source``) and its bytes."""
    if isinstance(io.input, str):
        return get_cache(settings).get_table_located(io.input, locations=io.locations)
    assert source is not None
    table = source.read(io.input)
    return table, "source", table.nbytes


def run_step(transform: Transform, source: Source | None, io: StepIO, settings: CacheSettings) -> Outcome:
    """Read the input (a source block or a cache key), transform, write to the cache."""
    started = time.perf_counter()
    rss_start = measure_start()
    try:
        cache = get_cache(settings)
        evicted = cache.evicted_bytes()
        try:
            table, tier, nbytes = read_located(source, io, settings)
        except ReplicaLost as exc:
            return _failure(exc, started, lost_input=True)
        rejected = 0
        try:
            out = transform(table)
        except Exception as exc:
            if io.rejects_to is None or _retryable(exc, io.retry_on):
                raise
            out, rejects = isolate_rows(transform, table, exc, io.retry_on)
            rejected = rejects.num_rows
            _write_rejects(io.rejects_to, rejects)  # before the block commits: a retry rewrites it
        try:
            meta = cache.put_table(io.output, out, durable=io.durable)
        except TierUnavailable:
            if not io.durable:
                raise
            # The durable store is down: keep going on local copies (pinned until written
            # there); the driver flushes them before it may report success.
            meta = cache.put_table(io.output, out, durable=False)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an Outcome the driver judges
        return _failure(exc, started, retry_on=io.retry_on)
    return _success(meta, table.num_rows, started, rss_start, tier, nbytes, cache, evicted, rejected)


def _success(
    meta: Any, rows_in: int, started: float, rss_start: int, tier: str, nbytes: int, cache: TieredCache,
    evicted: tuple[int, int, int], rejected: int = 0,
) -> Outcome:
    mem = measure_end(rss_start)
    memory_evicted, lmdb_evicted, peer_evicted = cache.evicted_bytes()
    return Outcome(True, meta, rows_in=rows_in, seconds=time.perf_counter() - started, node=_node(),
                   rejected=rejected, read_tier=tier, read_bytes=nbytes, pid=os.getpid(), rss_start=mem.start,
                   rss_end=mem.end, rss_peak=mem.peak, memory_tier_bytes=cache.memory_held(),
                   evicted_memory_bytes=memory_evicted - evicted[0], evicted_lmdb_bytes=lmdb_evicted - evicted[1],
                   evicted_peer_bytes=peer_evicted - evicted[2])


def isolate_rows(
    transform: Transform, table: pa.Table, error: Exception, retry_on: tuple[str, ...] = ()
) -> tuple[pa.Table, pa.Table]:
    """Find the rows of a failing block that fail on their own, by running halves.

    Returns the output of the rows that pass (in input order) and the failing input rows
    with two more columns, ``_row`` (index in the block) and ``_error``. About
    2 k log2(n / k) calls for k bad rows in n. Re-raises ``error`` when no row fails
    alone (the block fails as a whole) or when every row does (nothing to go on with).
    A retryable failure met on the way is raised as it is: the block is retried whole.
    """
    outputs: list[pa.Table] = []
    bad: list[int] = []
    errors: list[str] = []

    def visit(part: pa.Table, offset: int, err: str) -> None:
        if part.num_rows <= 1:
            bad.extend([offset] * part.num_rows)
            errors.extend([err] * part.num_rows)
            return
        mid = part.num_rows // 2
        for piece, at in ((part.slice(0, mid), offset), (part.slice(mid), offset + mid)):
            try:
                outputs.append(transform(piece))
            except Exception as exc:  # noqa: BLE001 - judged like a whole block's failure
                if _retryable(exc, retry_on):
                    raise
                visit(piece, at, _describe(exc))

    visit(table, 0, _describe(error))
    if not bad or not outputs:
        raise error
    rejects = table.take(pa.array(bad, pa.int64()))
    rejects = rejects.append_column("_row", pa.array(bad, pa.int64()))
    rejects = rejects.append_column("_error", pa.array(errors, pa.string()))
    return pa.concat_tables(outputs, promote_options="default"), rejects


def _write_rejects(target: tuple[str, dict[str, str]], rejects: pa.Table) -> None:
    base, options = target
    fs, path = filesystem(f"{base}.rows.parquet", options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    buf = pa.BufferOutputStream()
    pq.write_table(rejects, buf)
    write_atomic(fs, path, buf.getvalue().to_pybytes())


def write_part(sink: Sink, io: StepIO, block: int, settings: CacheSettings) -> Outcome:
    """Sink step: read the last stage's block from the cache and commit it as one part."""
    started = time.perf_counter()
    rss_start = measure_start()
    try:
        assert isinstance(io.input, str)
        cache = get_cache(settings)
        evicted = cache.evicted_bytes()
        try:
            table, tier, nbytes = cache.get_table_located(io.input, locations=io.locations)
        except ReplicaLost as exc:
            return _failure(exc, started, lost_input=True)
        meta = sink.write_part(block, table)
    except Exception as exc:  # noqa: BLE001
        return _failure(exc, started)
    return _success(meta, table.num_rows, started, rss_start, tier, nbytes, cache, evicted)


def _matches(exc: BaseException, names: tuple[str, ...]) -> bool:
    return any(
        c.__name__ in names or f"{c.__module__}.{c.__qualname__}" in names for c in type(exc).__mro__
    )


def _failure(
    exc: BaseException, started: float, lost_input: bool = False, retry_on: tuple[str, ...] = ()
) -> Outcome:
    text = _describe(exc)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))
    return Outcome(False, error=f"{text}\n{tb}", retryable=_retryable(exc, retry_on), lost_input=lost_input,
                   seconds=time.perf_counter() - started, node=_node())


def _retryable(exc: BaseException, retry_on: tuple[str, ...]) -> bool:
    # Triton outages and unreachable tiers are the system's fault: worth a retry. A
    # ModelError or an exception raised by user code is not, unless the stage lists it.
    return (isinstance(exc, TierflowError) and exc.retryable) or _matches(exc, retry_on)


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _node() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


# -- Ray entry points ------------------------------------------------------------------------


@ray.remote(max_retries=0)
def run_task(chain: tuple[Stage, ...], source: Source | None, io: StepIO, settings: CacheSettings) -> Outcome:
    """A stateless step as a Ray task. The transform is rebuilt per task (cheap for fns)."""
    try:
        transform = make_transform(chain, None)
    except Exception as exc:  # noqa: BLE001
        return _failure(exc, time.perf_counter())
    return run_step(transform, source, io, settings)


@ray.remote(max_retries=0)
def sink_task(sink: Sink, io: StepIO, block: int, settings: CacheSettings) -> Outcome:
    return write_part(sink, io, block, settings)


def dead_letters_target(plan: Any, sink: Sink) -> tuple[str, dict[str, str]]:
    """(URL, storage_options) of the dead letters: ``sink.dead_letters`` or
    ``<sink>/_dead_letters`` (a ``_`` directory, which Parquet dataset readers skip)."""
    where = plan.manifest.sink.dead_letters
    url = plan.manifest.resolve(where) if where else f"{sink.url.rstrip('/')}/_dead_letters"
    return url, dict(plan.manifest.sink.storage_options)


@ray.remote(max_retries=3)
def write_dead_letter(
    target: tuple[str, dict[str, str]], stage: str, block: int, io: StepIO, source: Source,
    error: str, settings: CacheSettings,
) -> str:
    """``<target>/<stage>/block-<n>.json`` (the error) and ``.parquet`` (the rows the
    stage got, when they can still be read). Idempotent: same names on every attempt."""
    url, options = target
    fs, root = filesystem(url, options)
    base = f"{root}/{stage}/block-{block:06d}"
    fs.makedirs(f"{root}/{stage}", exist_ok=True)
    rows = None
    try:
        table = read_input(source, io, settings)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        write_atomic(fs, f"{base}.parquet", buf.getvalue().to_pybytes())
        rows = table.num_rows
    except Exception as exc:  # noqa: BLE001 - the error record is written regardless
        error += f"\n(input rows not saved: {type(exc).__name__}: {exc})"
    doc = {"stage": stage, "block": block, "rows": rows, "error": error}
    write_atomic(fs, f"{base}.json", json.dumps(doc, indent=1).encode())
    return base


@ray.remote(max_retries=0)
def flush_blocks(prefix: str, settings: CacheSettings) -> int:
    """Write the durable copy of this node's pinned blocks under ``prefix``."""
    return get_cache(settings).flush(prefix)


@ray.remote(max_retries=0)
def rereplicate_block(key: str, locations: tuple[str, ...], settings: CacheSettings) -> list[str]:
    """Copy a block that lost copies with a node to new peers (runs on a holder's node)."""
    return get_cache(settings).rereplicate(key, locations)


@ray.remote(max_retries=3)
def delete_blocks(keys: list[str], settings: CacheSettings) -> int:
    """Drop intermediate blocks no later step needs. Idempotent, so Ray may retry it."""
    cache = get_cache(settings)
    return sum(bool(cache.delete(k)) for k in keys)


@ray.remote(max_restarts=0, max_task_retries=0)  # the pool replaces a dead actor itself
class StageActor:
    """A stateful or model stage: the transform (class instance, Triton client) is built
    once per actor and reused for every block sent to it."""

    def __init__(
        self, chain: tuple[Stage, ...], triton_url: str | tuple[str, ...] | None, settings: CacheSettings
    ) -> None:
        self._settings = settings
        self._transform = make_transform(chain, triton_url)
        get_cache(settings)  # open the node's LMDB now: a spare must be ready for its first block

    def run(self, source: Source | None, io: StepIO) -> Outcome:
        return run_step(self._transform, source, io, self._settings)

    def warm(self, source: Source | None, io: StepIO) -> None:
        """Run the stage once on the first row of ``io``'s input and discard the result, so
        that a spare pays the costs of a first call (lazy imports, compilation, connections:
        seconds on a loaded node) before it takes over, not on the block it takes over.
        Nothing is written. A failure is left for the first real block to meet and report."""
        try:
            self._transform(read_input(source, io, self._settings).slice(0, 1))
        except Exception:  # noqa: BLE001, S110 - judged on the real block, if it recurs
            pass

    def ready(self) -> str:
        """The node this actor runs on (once it is constructed)."""
        return ray.get_runtime_context().get_node_id()
