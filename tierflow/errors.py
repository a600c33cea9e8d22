"""Every error tierflow raises on purpose.

::

    TierflowError
    ├── ManifestError          bad manifest: file + one line per (field path, reason); CLI exit 2
    ├── CacheError
    │   ├── InvalidKey         key would escape the cache root or is malformed
    │   ├── TierUnavailable    a tier cannot be reached; skipped, not fatal   (retryable)
    │   ├── CorruptObject      checksum/header mismatch; treated as a miss + repair
    │   └── ReplicaLost        every copy of a committed block is gone
    ├── InferenceError
    │   ├── TritonUnavailable  server unreachable, UNAVAILABLE, deadline      (retryable)
    │   ├── ModelError         model missing/not ready, bad tensor name/dtype/shape
    │   └── DeploymentError    tierflow's Triton servers on the cluster could not be brought up
    ├── StageError             user code failed; has .stage, .block, __cause__
    ├── SinkError              output exists (mode: error), or a part could not be committed
    ├── StoreError             the source's, sink's or journal's store failed  (retryable)
    └── PipelineBusy           another live driver holds the pipeline's lease (its journal)

Errors from third-party libraries (tritonclient, fsspec, lmdb) are translated into this
tree at the edges only (``tierflow.triton.errors``, ``tierflow.cache.base.tier_errors``
for the cache tiers, ``tierflow.io.fs.fs_errors`` for the other stores), with
``raise ... from exc`` so the original stays attached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import ClassVar


class TierflowError(Exception):
    """Base of every error tierflow raises on purpose. Picklable (errors cross Ray)."""

    retryable: ClassVar[bool] = False
    _init_args: tuple[object, ...] | None = None

    def __reduce__(self) -> str | tuple[object, ...]:
        if self._init_args is None:
            return super().__reduce__()
        return (type(self), self._init_args)


class ManifestError(TierflowError):
    """A manifest that cannot run. Lists every problem found, each with its field path.

    >>> str(ManifestError("m.yaml", [("stages[1].batch_size", "must be > 0")]))
    'm.yaml: 1 error\\n  stages[1].batch_size: must be > 0'
    """

    def __init__(self, path: str, problems: Sequence[tuple[str, str]]) -> None:
        self._init_args = (path, list(problems))
        self.path = path
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"{path}: {n} error{'s' if n != 1 else ''}"]
        lines += [f"  {loc}: {reason}" if loc else f"  {reason}" for loc, reason in self.problems]
        super().__init__("\n".join(lines))


class CacheError(TierflowError):
    """Base of cache failures."""


class InvalidKey(CacheError, ValueError):
    """A block key that is malformed or would escape the cache root."""


class TierUnavailable(CacheError):
    """A tier could not be reached. The tiered cache skips it and counts it."""

    retryable = True

    def __init__(self, tier: str, reason: str) -> None:
        self._init_args = (tier, reason)
        self.tier = tier
        self.reason = reason
        super().__init__(f"cache tier {tier} unavailable: {reason}")


class CorruptObject(CacheError):
    """A stored value whose header or checksum does not match. Read as a miss."""

    def __init__(self, key: str, reason: str) -> None:
        self._init_args = (key, reason)
        self.key = key
        self.reason = reason
        super().__init__(f"corrupt cache object {key}: {reason}")


class ReplicaLost(CacheError):
    """No readable copy of a committed block is left anywhere."""

    def __init__(self, key: str, tried: Sequence[str]) -> None:
        self._init_args = (key, list(tried))
        self.key = key
        self.tried = list(tried)
        super().__init__(f"every copy of block {key} is lost (tried: {', '.join(tried) or 'none'})")


class InferenceError(TierflowError):
    """Base of Triton failures."""


class TritonUnavailable(InferenceError):
    """The server did not answer in time or said UNAVAILABLE. Retried with backoff."""

    retryable = True

    def __init__(self, url: str, reason: str) -> None:
        self._init_args = (url, reason)
        self.url = url
        self.reason = reason
        super().__init__(f"Triton at {url} unavailable: {reason}")


class ModelError(InferenceError):
    """The model rejected the request or answered with the wrong tensors. Never retried."""

    def __init__(self, model: str, reason: str) -> None:
        self._init_args = (model, reason)
        self.model = model
        self.reason = reason
        super().__init__(f"model {model!r}: {reason}")


class DeploymentError(InferenceError):
    """A Triton deployment could not be brought up, found, or reused.

    Raised when no node holds the requested resources, no server became ready in time (the
    message names the resources and the nodes looked at, or Triton's reason for a model
    that failed to load), or a reused deployment does not serve what the run needs.
    """

    def __init__(self, name: str, reason: str) -> None:
        self._init_args = (name, reason)
        self.name = name
        self.reason = reason
        super().__init__(f"Triton deployment {name!r}: {reason}")


class StageError(TierflowError):
    """A stage failed on a block. The original exception is ``__cause__``."""

    def __init__(self, stage: str, block: int, reason: str) -> None:
        self._init_args = (stage, block, reason)
        self.stage = stage
        self.block = block
        self.reason = reason
        super().__init__(f"stage {stage!r} failed on block {block}: {reason}")


class SinkError(TierflowError):
    """The sink refused to write (existing output with ``mode: error``) or could not commit."""


class StoreError(TierflowError):
    """The store behind the source, the sink or the journal could not be read or written
    (unreachable, refused, missing). ``role`` says which; ``reason`` has secrets scrubbed."""

    retryable = True

    def __init__(self, role: str, url: str, reason: str) -> None:
        self._init_args = (role, url, reason)
        self.role = role
        self.url = url
        self.reason = reason
        super().__init__(f"{role} store {url}: {reason}")


class PipelineBusy(TierflowError):
    """Another live driver holds the pipeline's lease; this one does not start.

    Raised by ``Journal.acquire_lease``. The lease expires ``lease_s`` after its holder's
    last renewal (at once when the holder ran on this host and its process is gone).
    """


_medium_failures: tuple[type[BaseException], ...] | None = None


def medium_failures() -> tuple[type[BaseException], ...]:
    """Third-party exception types that mean "the medium cannot be used right now": the
    classification shared by the cache tiers (``tier_errors``) and the other stores
    (``tierflow.io.fs.fs_errors``)."""
    global _medium_failures
    if _medium_failures is None:
        found: list[type[BaseException]] = [OSError, TimeoutError, MemoryError]
        with contextlib.suppress(ImportError):
            import lmdb

            found.append(lmdb.Error)
        with contextlib.suppress(ImportError):
            from fsspec.exceptions import FSTimeoutError

            found.append(FSTimeoutError)
        with contextlib.suppress(ImportError):
            import botocore.exceptions

            found += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
        with contextlib.suppress(ImportError):
            import aiohttp

            found.append(aiohttp.ClientError)
        _medium_failures = tuple(found)
    return _medium_failures
