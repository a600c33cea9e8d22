"""Cache settings: one frozen, picklable value shipped from the driver to every worker.

Credentials never live here in clear: a ``storage_options`` value may be written as
``${VAR}`` (or contain ``${VAR}``), and the reference is resolved from the environment of
the process that builds the fsspec filesystem, at that moment (by
:mod:`tierflow.credentials`). The settings object itself, its ``repr`` and its pickle
only ever hold the ``${VAR}`` text.

>>> s = CacheSettings(root="/tmp/tf", remote_url="s3://bucket/cache",
...                   storage_options={"secret": "${AWS_SECRET_ACCESS_KEY}"})
>>> s.storage_options["secret"]
'${AWS_SECRET_ACCESS_KEY}'
>>> CacheSettings(root="/tmp/tf", storage_options={"secret": "hunter2"})
Traceback (most recent call last):
...
ValueError: storage_options['secret'] looks like a credential: write it as ${VAR} and set VAR in the environment
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tierflow.credentials import check_storage_options

__all__ = ["CacheSettings", "FrozenOptions"]

GiB = 1 << 30

def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping) and not isinstance(value, FrozenOptions):
        return FrozenOptions(value)
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class FrozenOptions(Mapping[str, Any]):
    """An immutable, hashable, picklable mapping (``storage_options`` inside settings)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items: tuple[tuple[str, Any], ...] = tuple(
            sorted((k, _freeze(v)) for k, v in (items or {}).items())
        )

    def __getitem__(self, name: str) -> Any:
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenOptions):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(dict(self._items))

    def __reduce__(self) -> tuple[type[FrozenOptions], tuple[dict[str, Any]]]:
        return (FrozenOptions, (dict(self._items),))


@dataclass(frozen=True)
class CacheSettings:
    """Where and how the block cache stores data. Immutable and picklable.

    Usage::

        settings = CacheSettings(root="/data/tierflow", remote_url="s3://bucket/cache",
                                 storage_options={"key": "${AWS_ACCESS_KEY_ID}",
                                                  "secret": "${AWS_SECRET_ACCESS_KEY}"})
        cache = get_cache(settings)

    Attributes:
        root: Local directory. The node's LMDB environment lives in ``<root>/lmdb`` and,
            when ``remote_url`` is ``None``, the durable store is ``file://<root>/store``.
            ``{node}`` in it is replaced by the node id, which gives each of several Ray
            nodes on one machine (test clusters) its own environment; it then needs an
            explicit ``remote_url``.
        memory_bytes: Capacity of the in-process memory tier (0 disables it).
        lmdb_bytes: Capacity of the LMDB tier (sum of stored value sizes); least recently
            used blocks whose durable copy exists are evicted beyond it.
        lmdb_map_size: LMDB ``map_size``: the hard upper bound of the database file. Sparse,
            so it can be much larger than the disk usage.
        remote_url: fsspec URL of the durable store (``s3://bucket/prefix``,
            ``file:///path``, ``memory://x``), or ``None`` for ``file://<root>/store``.
        storage_options: Keyword arguments for the fsspec filesystem. Values may contain
            ``${VAR}``; credential-like names must use it.
        replicas: Number of copies of each block, each in its own failure domain (a Ray
            node, or the durable store).
        compression_level: zstd level for the durable copy, or ``None``. Local tiers are
            always uncompressed (decompression would cap local reads near 0.7 GB/s).
        remote_timeout_s: Upper bound on one remote operation; an unreachable store fails
            within about this long.
        unavailable_retry_s: After a tier fails, reads skip it for this long.
    """

    root: str
    memory_bytes: int = 1 * GiB
    lmdb_bytes: int = 64 * GiB
    lmdb_map_size: int = 1 << 40
    remote_url: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=FrozenOptions)
    replicas: int = 2
    compression_level: int | None = None
    remote_timeout_s: float = 30.0
    unavailable_retry_s: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.fspath(self.root))
        object.__setattr__(self, "storage_options", FrozenOptions(self.storage_options))
        if self.memory_bytes < 0 or self.lmdb_bytes < 0:
            raise ValueError("memory_bytes and lmdb_bytes must be >= 0")
        if self.lmdb_map_size < 1 << 20:
            raise ValueError("lmdb_map_size must be at least 1 MiB")
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.remote_timeout_s <= 0:
            raise ValueError("remote_timeout_s must be > 0")
        if "{node}" in self.root and self.remote_url is None:
            raise ValueError("a root with {node} needs an explicit remote_url (a shared store)")
        check_storage_options(self.storage_options)

    @property
    def durable_url(self) -> str:
        """The durable store's URL: ``remote_url`` or ``file://<root>/store``."""
        if self.remote_url is not None:
            return self.remote_url
        return "file://" + os.path.join(os.path.abspath(self.root), "store")

    def lmdb_path_for(self, node_id: str) -> str:
        """Directory of node ``node_id``'s LMDB environment."""
        root = self.root.replace("{node}", node_id)
        return os.path.join(os.path.abspath(root), "lmdb")
