"""The pipeline manifest: typed, frozen models and ``load_manifest(path)``.

A manifest is YAML with a source, an ordered list of stages and a sink::

    name: demo
    source: {format: parquet, path: data/*.parquet, block_rows: 5000}
    stages:
      - {name: clean, kind: python, fn: my_stages:clean}
      - {name: classify, kind: triton, model: mlp_classifier,
         inputs: {features: FEATURES}, outputs: {PROBS: probs}}
    sink: {path: out/, mode: overwrite}

Relative paths (source, sink, Triton repository, cache directory) are resolved against the
manifest's own directory, so a manifest runs the same from any working directory. This
module only checks shape and types; ``tierflow.checks`` checks what needs imports or
files (callables, Triton models, columns).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tierflow.credentials import check_storage_options
from tierflow.errors import ManifestError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_CALLABLE = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_clear_credentials(options: dict[str, str]) -> dict[str, str]:
    check_storage_options(options)
    return options


#: fsspec keyword arguments; credentials only as ``${ENV_VAR}`` references, never in clear
StorageOptions = Annotated[dict[str, str], AfterValidator(_no_clear_credentials)]


def _custom_only(resources: dict[str, float]) -> dict[str, float]:
    if "GPU" in resources or "CPU" in resources:
        raise ValueError("give GPUs and CPUs as num_gpus / num_cpus, not in 'resources'")
    return resources


#: custom Ray resources, e.g. {accelerator_node: 1}; amounts > 0 (fractions allowed)
CustomResources = Annotated[dict[str, Annotated[float, Field(gt=0)]], AfterValidator(_custom_only)]


class SourceConfig(_Model):
    """Where rows come from. Split into deterministic blocks of ``block_rows``."""

    format: Literal["parquet", "jsonl", "csv"] = Field(description="file format")
    path: str = Field(description="fsspec URL, path or glob (relative to the manifest)")
    columns: tuple[str, ...] | None = Field(None, description="columns to read (default all)")
    block_rows: int = Field(10_000, gt=0, description="rows per block")
    storage_options: StorageOptions = Field(default_factory=dict, description="fsspec options; secrets as ${ENV_VAR}")


class _StageBase(_Model):
    name: str = Field(pattern=_NAME, description="unique stage name; part of every block key")
    concurrency: int | tuple[int, int] = Field(
        2, description="tasks at once, or actors: N, or [min, max] for a pool that scales with the backlog"
    )
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs per task/actor")
    checkpoint: bool = Field(False, description="keep this stage's blocks after the run")
    max_attempts: int = Field(3, ge=1, description="tries per block for system failures and retry_on")
    retry_on: tuple[str, ...] = Field(
        (), description="exception class names (or module.Name) of user code that are retried"
    )
    on_error: Literal["fail", "skip", "skip_rows"] = Field(
        "fail",
        description=(
            "skip: a block that fails for good goes to the dead letters; skip_rows: the failing "
            "block is retried in halves, rows that fail alone go to the dead letters, the rest go on"
        ),
    )
    block_timeout_s: float | None = Field(
        None, gt=0, description="cancel one attempt on a block after this long and retry it elsewhere"
    )
    speculate_after: float | None = Field(
        3.0, gt=1, description="run a second copy of a block slower than this x the stage median"
    )
    standby: int = Field(
        0, ge=0, le=8,
        description=(
            "actor stages: spare actors kept constructed (spread over nodes) that take over at once "
            "from an actor that dies, instead of a new one starting then; each holds its resources"
        ),
    )


    @model_validator(mode="after")
    def _concurrency_range(self) -> _StageBase:
        low, high = self.concurrency_range
        if low < 1 or high < low:
            raise ValueError(f"concurrency must be >= 1, or [min, max] with 1 <= min <= max; got {self.concurrency}")
        return self

    @property
    def concurrency_range(self) -> tuple[int, int]:
        c = self.concurrency
        return (c, c) if isinstance(c, int) else c

    @property
    def demand(self) -> dict[str, float]:
        """The Ray resources one worker (task or actor) of this stage holds, by Ray's names
        (``CPU``, ``GPU``, custom); zeros left out.

        >>> TritonStage(name="t", kind="triton", model="m", inputs={"a": "A"}, outputs={"B": "b"}).demand
        {'CPU': 0.5}
        """
        return {"CPU": self.num_cpus} if self.num_cpus > 0 else {}


# How a step runs and fails: a fused stage takes these from the stage it runs with.
_STEP_FIELDS = {
    "concurrency", "num_cpus", "num_gpus", "resources", "checkpoint", "max_attempts", "retry_on", "on_error", "block_timeout_s",
    "speculate_after", "standby",
}



class PythonStage(_StageBase):
    """A Python stage: ``fn`` (a Ray task per block) or ``cls`` (a pool of Ray actors),
    on CPUs or, with ``num_gpus``, on GPUs (a torch model in a ``cls`` stage)."""

    kind: Literal["python"]
    num_gpus: float = Field(
        0.0, ge=0,
        description="Ray GPUs per task/actor (fractional allowed: 0.5 lets two workers share one); "
        "Ray sets each worker's CUDA_VISIBLE_DEVICES",
    )
    resources: CustomResources = Field(
        default_factory=dict,
        description="custom Ray resources per task/actor, e.g. {accelerator_node: 1}; only nodes declaring them run it",
    )
    fn: str | None = Field(None, pattern=_CALLABLE, description="module:callable, Table -> Table")
    cls: str | None = Field(None, pattern=_CALLABLE, description="module:Class; __init__ once per actor")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")
    batch_rows: int | None = Field(None, gt=0, description="call the function on slices this big")
    requires: tuple[str, ...] = Field((), description="columns the stage reads")
    produces: dict[str, str] = Field(
        default_factory=dict, description="columns the stage adds: name -> type (e.g. float32[16])"
    )
    drops: tuple[str, ...] = Field((), description="columns the stage removes")
    fuse: bool = Field(
        False,
        description=(
            "run in the same task or actor as the next stage: this stage's output is not cached "
            "(saves a cache round trip per block; a lost step re-runs both)"
        ),
    )

    @model_validator(mode="after")
    def _one_callable(self) -> PythonStage:
        if (self.fn is None) == (self.cls is None):
            raise ValueError("give exactly one of 'fn' (a function) or 'cls' (a class)")
        if self.standby and self.fn is not None:
            raise ValueError("standby keeps spare actors: it needs 'cls' ('fn' stages run as tasks)")
        return self

    @property
    def target(self) -> str:
        return self.fn or self.cls or ""

    @property
    def demand(self) -> dict[str, float]:
        """``num_cpus``, ``num_gpus`` and ``resources`` by Ray's names; zeros left out.

        >>> PythonStage(name="e", kind="python", cls="m:E", num_gpus=0.5, resources={"a100": 1}).demand
        {'CPU': 1.0, 'GPU': 0.5, 'a100': 1.0}
        """
        out = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: v for k, v in out.items() if v > 0}


class TritonStage(_StageBase):
    """A model stage: blocks are cut into requests to a Triton server over gRPC."""

    kind: Literal["triton"]
    model: str = Field(description="model name in the Triton repository")
    model_version: str = Field("", description="model version ('' = server's choice)")
    inputs: dict[str, str] = Field(min_length=1, description="input column -> input tensor")
    outputs: dict[str, str] = Field(min_length=1, description="output tensor -> output column")
    batch_size: int = Field(64, gt=0, description="rows per request (capped at max_batch_size)")
    max_inflight: int = Field(4, gt=0, description="requests in flight per actor")
    timeout_s: float = Field(60.0, gt=0, description="deadline of one request")
    concurrency: int | tuple[int, int] = Field(1, description="client actors: N or [min, max]")
    num_cpus: float = Field(0.5, ge=0, description="Ray CPUs per client actor")
    shared_memory: Literal["auto", "off"] = Field(
        "auto",
        description="'auto': a request to a server on the actor's host carries its numeric tensors in "
        "system shared memory (pooled regions) once they hold shared_memory_min_bytes, and a server "
        "that refuses gets gRPC; 'off': always gRPC",
    )
    # The default is tierflow.triton.shared_memory.DEFAULT_MIN_BYTES (not imported: the
    # manifest loads without tritonclient); BENCHMARKS.md "Same-host shared memory".
    shared_memory_min_bytes: int = Field(
        256 << 10, ge=0, description="smallest request (input + output bytes) sent through shared memory"
    )


Stage = Annotated[Union[PythonStage, TritonStage], Field(discriminator="kind")]


class SinkConfig(_Model):
    """Parquet output: one part per block, then ``_SUCCESS`` listing them."""

    format: Literal["parquet"] = "parquet"
    path: str = Field(description="output directory (fsspec URL or path)")
    mode: Literal["error", "overwrite"] = Field("error", description="if a complete output exists")
    dead_letters: str | None = Field(
        None, description="where failed blocks go with on_error: skip (default <path>/_dead_letters)"
    )
    storage_options: StorageOptions = Field(default_factory=dict, description="fsspec options; secrets as ${ENV_VAR}")


class RayConfig(_Model):
    address: str | None = Field(None, description="None = embedded local Ray; 'auto' or URL = join")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded local Ray")
    autoscaler: bool = Field(
        False,
        description="the cluster adds nodes on demand: a stage no node can hold yet is not rejected "
        "before the run (it waits for the autoscaler instead)",
    )


class MetricsConfig(_Model):
    port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus metrics on this port while the run lasts (0: any free one)"
    )
    host: str = Field("0.0.0.0", description="address the metrics endpoint listens on")


class TritonDeploy(_Model):
    """Triton servers that tierflow starts as Ray actors on the cluster's nodes
    (``tierflow.triton.deploy``)."""

    replicas: int | Literal["per_node"] = Field(
        1, description="number of servers, or 'per_node': one on every node holding the resources"
    )
    resources: CustomResources = Field(
        default_factory=dict,
        description="Ray resources each server holds, e.g. {triton_node: 1}; only nodes declaring them get one",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per server (fractional allowed); Ray sets its CUDA_VISIBLE_DEVICES")
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs each server holds")
    repository: str | None = Field(
        None, description="model repository the servers load (same as triton.repository, which it sets)"
    )
    startup_timeout_s: float = Field(
        180.0, gt=0, description="time for the servers to get their resources and load every model"
    )
    name: str | None = Field(
        None, pattern=_NAME,
        description="deployment name (default 'triton-<pipeline>'); a run reuses a deployment of this "
        "name that 'tierflow triton deploy' left running",
    )

    @model_validator(mode="before")
    @classmethod
    def _replicas(cls, data: Any) -> Any:
        # One message instead of pydantic's two (one per member of the union).
        value = data.get("replicas", 1) if isinstance(data, dict) else 1
        if value == "per_node" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return data
        raise ValueError(f"replicas must be a positive integer or 'per_node', got {value!r}")

    @model_validator(mode="after")
    def _resources(self) -> TritonDeploy:
        if self.replicas == "per_node" and not (self.resources or self.num_gpus):
            raise ValueError("replicas: per_node needs 'resources' or 'num_gpus' to say which nodes")
        return self


class TritonConfig(_Model):
    url: str | tuple[str, ...] | None = Field(
        None, description="gRPC host:port of a running Triton server, or several (balanced, with failover)"
    )
    launch: bool = Field(False, description="start the bundled server for the run")
    repository: str = Field("triton_models", description="model repository (relative to manifest)")
    startup_timeout_s: float | None = Field(
        None, gt=0,
        description="how long a run waits for the server and its models to be ready "
        "(default: 180 s for a launched server, 30 s for 'url' servers)",
    )
    deploy: TritonDeploy | None = Field(
        None, description="start the servers as Ray actors on the cluster (instead of 'url'/'launch')"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_repository(cls, data: Any) -> Any:
        # deploy.repository is an alias of triton.repository, so plan, checks and servers
        # all read one value.
        deploy = data.get("deploy") if isinstance(data, dict) else None
        repo = deploy.get("repository") if isinstance(deploy, dict) else None
        if repo is None:
            return data
        if data.get("repository", repo) != repo:
            raise ValueError("give the model repository once: triton.repository or triton.deploy.repository")
        return {**data, "repository": repo}

    @model_validator(mode="after")
    def _url_or_launch(self) -> TritonConfig:
        given = [k for k, on in (("url", self.url), ("launch", self.launch), ("deploy", self.deploy)) if on]
        if len(given) > 1:
            both = "both " if len(given) == 2 else ""
            raise ValueError(
                f"give one of 'url' (existing servers), 'launch: true' or 'deploy', not {both}{' and '.join(given)}"
            )
        return self


class CacheConfig(_Model):
    dir: str = Field(".tierflow", description="local cache root (LMDB, journal)")
    memory_bytes: int = Field(256 << 20, ge=0, description="in-process LRU capacity")
    lmdb_bytes: int = Field(8 << 30, gt=0, description="LMDB capacity before LRU eviction")
    remote_url: str | None = Field(None, description="durable fsspec store, e.g. s3://bucket/tf")
    storage_options: StorageOptions = Field(default_factory=dict, description="fsspec options; secrets as ${ENV_VAR}")
    replicas: int = Field(1, ge=1, le=8, description="copies in distinct failure domains")
    compression_level: int | None = Field(None, ge=1, le=22, description="zstd level for remote")


class Manifest(_Model):
    """A whole pipeline. ``base_dir`` is where relative paths are resolved (set by the loader)."""

    name: str = Field(pattern=_NAME)
    source: SourceConfig
    stages: tuple[Stage, ...] = Field(min_length=1)
    sink: SinkConfig
    ray: RayConfig = RayConfig()
    triton: TritonConfig = TritonConfig()
    cache: CacheConfig = CacheConfig()
    metrics: MetricsConfig = MetricsConfig()
    base_dir: str = Field(".", exclude=True, description="set by load_manifest")

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Manifest:
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name {stage.name!r} is used twice")
            seen.add(stage.name)
        return self

    @model_validator(mode="after")
    def _fusable(self) -> Manifest:
        for stage, after in zip(self.stages, [*self.stages[1:], None]):
            if not (isinstance(stage, PythonStage) and stage.fuse):
                continue
            if after is None:
                raise ValueError(f"stage {stage.name!r}: fuse: true needs a stage after it to run with")
            if stage.cls is not None:
                raise ValueError(f"stage {stage.name!r}: only fn stages can be fused (a cls stage keeps state in its own actors)")
            decided = sorted(stage.model_fields_set & _STEP_FIELDS)
            if decided:
                raise ValueError(
                    f"stage {stage.name!r}: fuse: true runs it in stage {after.name!r}'s step, which decides "
                    f"{', '.join(decided)}; set them there"
                )
        return self

    def resolve(self, path: str) -> str:
        """An fsspec URL as is; a local path made absolute against the manifest directory."""
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
            return path
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(path)))


def _loc(parts: Sequence[int | str]) -> str:
    out = ""
    prev: int | str | None = None
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif (isinstance(prev, int) and p in ("python", "triton")) or p.startswith("function-"):
            pass  # pydantic's union-branch and validator labels, not user fields
        else:
            out += f".{p}" if out else str(p)
        prev = p
    return out


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    errors = exc.errors()
    probs = []
    for err in errors:
        loc = err["loc"]
        if err["type"] == "too_short" and any(
            len(e["loc"]) > len(loc) and e["loc"][: len(loc)] == loc for e in errors
        ):
            continue  # pydantic counts the invalid items as missing; the item errors say it all
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        probs.append((_loc(err["loc"]), msg))
    return probs


def parse_manifest(data: Any, path: str = "<manifest>", base_dir: str = ".") -> Manifest:
    """Validate already-loaded YAML data. Raises ManifestError listing every problem."""
    if not isinstance(data, Mapping):
        raise ManifestError(path, [("", "the manifest must be a YAML mapping")])
    try:
        return Manifest.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise ManifestError(path, _problems(exc)) from None


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest file. Raises ManifestError (file, line/field, reason)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ManifestError(str(p), [("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(str(p), [(where, f"invalid YAML: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ManifestError(str(p), [("", f"invalid YAML: {exc}")]) from None
    if "base_dir" in (data or {}):
        raise ManifestError(str(p), [("base_dir", "unknown field")])
    return parse_manifest(data, str(p), str(p.resolve().parent))
