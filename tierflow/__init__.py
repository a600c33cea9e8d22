"""tierflow: offline batch-inference pipelines on Ray with Triton stages and a tiered cache.

The front door: :func:`run`, :func:`validate` and :func:`status` (the CLI's verbs),
:func:`load_manifest` / :class:`Manifest`, the typed :class:`RunReport`, the
:class:`Event` a run reports to ``on_event``, and the errors. Importing it starts nothing
and imports neither Ray nor tritonclient.
"""

from tierflow.api import RunReport, StageReport, run, status, validate
from tierflow.errors import (
    CacheError,
    CorruptObject,
    DeploymentError,
    InferenceError,
    InvalidKey,
    ManifestError,
    ModelError,
    PipelineBusy,
    ReplicaLost,
    SinkError,
    StageError,
    StoreError,
    TierflowError,
    TierUnavailable,
    TritonUnavailable,
)
from tierflow.events import Event
from tierflow.manifest import Manifest, load_manifest
from tierflow.pipeline_status import PipelineStatus

__all__ = [
    "CacheError",
    "CorruptObject",
    "DeploymentError",
    "Event",
    "InferenceError",
    "InvalidKey",
    "Manifest",
    "ManifestError",
    "ModelError",
    "PipelineBusy",
    "PipelineStatus",
    "ReplicaLost",
    "RunReport",
    "SinkError",
    "StageError",
    "StageReport",
    "StoreError",
    "TierUnavailable",
    "TierflowError",
    "TritonUnavailable",
    "load_manifest",
    "run",
    "status",
    "validate",
]
