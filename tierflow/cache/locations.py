"""Location names: where a copy of a block is (``storage/FORMAT.md`` section 5).

A location is ``<kind>`` or ``<kind>:<node>``::

    memory:<node>   the writing worker's in-memory LRU (never a replica)
    lmdb:<node>     node ``<node>``'s LMDB environment
    remote          the durable store

``BlockMeta.locations`` and the journal hold these strings. No imports of its own: the
cache, its node servers, the engine and ``tierflow status`` all read them, and none of
them should need the tiered cache for that.

>>> lmdb_nodes([lmdb_location("n1"), REMOTE, "lmdb:n2"])
['n1', 'n2']
>>> location_kind("lmdb:n1"), location_kind(REMOTE)
('lmdb', 'remote')
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["LMDB", "MEMORY", "REMOTE", "lmdb_location", "lmdb_nodes", "location_kind", "memory_location"]

LMDB = "lmdb"
"""Kind of a copy in a node's LMDB environment."""

MEMORY = "memory"
"""Kind of a copy in a worker's memory tier."""

REMOTE = "remote"
"""Location name (and kind) of the durable copy."""


def lmdb_location(node_id: str) -> str:
    """Location name of a copy in node ``node_id``'s LMDB."""
    return f"{LMDB}:{node_id}"


def memory_location(node_id: str) -> str:
    """Location name of a copy in a memory tier on node ``node_id``."""
    return f"{MEMORY}:{node_id}"


def location_kind(location: str) -> str:
    """The kind of a location name: ``memory``, ``lmdb`` or ``remote``."""
    return location.partition(":")[0]


def lmdb_nodes(locations: Iterable[str]) -> list[str]:
    """The nodes whose LMDB holds a copy, in the order of ``locations``."""
    prefix = LMDB + ":"
    return [loc[len(prefix):] for loc in locations if loc.startswith(prefix)]
