"""Manifest -> Plan: blocks, stage fingerprints and block keys. Pure, no Ray.

A stage's fingerprint hashes the source's identity (files, sizes, versions, block_rows),
then, for this stage and every stage before it, the config that can change its output and
its code identity (stage source file, or the Triton model's files). Changing stage k gives
stage k and every later stage new keys; earlier stages keep theirs and are reused.

Block keys are built by :func:`tierflow.cache.keys.stage_keys`, the one place that spells
their format (``<pipeline>/<fingerprint[:16]>/<stage>/<block index, 6 digits>``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from tierflow.cache.keys import StageKeys, stage_keys
from tierflow.code import add_import_paths, code_digest
from tierflow.io.source import BlockSpec, Source, SourceFile
from tierflow.manifest import Manifest, PythonStage, Stage, TritonStage

# Fields that change how a stage runs, never what it outputs: not part of the fingerprint.
_EXECUTION_ONLY = {
    "concurrency", "num_cpus", "num_gpus", "resources", "checkpoint", "max_inflight", "timeout_s", "batch_size",
    "max_attempts", "retry_on", "on_error", "block_timeout_s", "speculate_after", "fuse", "standby",
    "shared_memory", "shared_memory_min_bytes",
}


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One step of the plan: a stage, run after the ``fused`` stages before it (``fuse:
    true``) in the same task or actor. Its output is cached under its key."""

    index: int
    config: Stage
    fingerprint: str
    fused: tuple[Stage, ...] = ()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def chain(self) -> tuple[Stage, ...]:
        """Every stage this step runs, in order."""
        return (*self.fused, self.config)


@dataclass(frozen=True)
class Plan:
    manifest: Manifest
    source: Source
    files: tuple[SourceFile, ...]
    blocks: tuple[BlockSpec, ...]
    stages: tuple[StagePlan, ...]
    _keys: tuple[StageKeys, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = tuple(stage_keys(self.manifest.name, s.fingerprint, s.name) for s in self.stages)
        object.__setattr__(self, "_keys", keys)  # frozen: set once, here

    def key(self, stage: int, block: int) -> str:
        """The cache key of step ``stage``'s output for ``block``."""
        return self._keys[stage](block)

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)


def stage_identity(stage: Stage, model_digest: Callable[[str], str]) -> dict[str, object]:
    """What of a stage decides its output: its config minus execution knobs, plus code."""
    config = stage.model_dump(mode="json", exclude=_EXECUTION_ONLY)
    if stage.on_error == "skip_rows":  # its blocks may hold fewer rows than a failing run's
        config["on_error"] = stage.on_error
    if isinstance(stage, PythonStage):
        code = code_digest(stage.target)
    else:
        assert isinstance(stage, TritonStage)
        code = model_digest(stage.model)
    return {"config": config, "code": code}


def make_plan(manifest: Manifest, model_digest: Callable[[str], str]) -> Plan:
    """List the source, cut blocks and fingerprint every stage.

    ``model_digest(model)`` identifies a Triton model (its repository files, or its name
    and version for a server whose repository is not local).
    """
    add_import_paths([manifest.base_dir])
    source = Source(manifest.source, manifest.resolve(manifest.source.path))
    files = tuple(source.files())
    blocks = tuple(source.plan(list(files)))
    h = hashlib.sha256()
    h.update(json.dumps({
        "source": manifest.source.model_dump(mode="json", exclude={"storage_options"}),
        "files": [[f.path, f.size, f.version, f.rows] for f in files],
    }, sort_keys=True).encode())
    stages: list[StagePlan] = []
    fused: list[Stage] = []
    for stage in manifest.stages:
        h.update(json.dumps(stage_identity(stage, model_digest), sort_keys=True).encode())
        if isinstance(stage, PythonStage) and stage.fuse:
            fused.append(stage)  # runs in the next stage's step; its output has no key
            continue
        stages.append(StagePlan(len(stages), stage, h.copy().hexdigest(), tuple(fused)))
        fused = []
    return Plan(manifest, source, files, blocks, tuple(stages))
