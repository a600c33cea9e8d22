"""tierflow: offline batch-inference pipelines on Ray with Triton stages and a tiered cache."""

from tierflow.errors import (
    CacheError,
    CorruptObject,
    InferenceError,
    InvalidKey,
    ManifestError,
    ModelError,
    ReplicaLost,
    SinkError,
    StageError,
    TierflowError,
    TierUnavailable,
    TritonUnavailable,
)

__all__ = [
    "CacheError",
    "CorruptObject",
    "InferenceError",
    "InvalidKey",
    "ManifestError",
    "ModelError",
    "ReplicaLost",
    "SinkError",
    "StageError",
    "TierUnavailable",
    "TierflowError",
    "TritonUnavailable",
]
