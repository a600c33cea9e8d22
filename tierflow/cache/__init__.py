"""The multi-level block cache: memory -> node LMDB -> peer nodes -> durable store.

Public surface::

    from tierflow.cache import CacheSettings, get_cache
    cache = get_cache(CacheSettings(root="/data/tierflow", remote_url="s3://bucket/cache"))
    meta = cache.put_table("demo/3f9a1c0e/clean/000042", table)   # -> BlockMeta
    table = cache.get_table("demo/3f9a1c0e/clean/000042")

The value format, key scheme and on-disk layouts are specified in ``storage/FORMAT.md``.
Ray-specific parts (the per-node cache server actor, peer replicas) live in
:mod:`tierflow.cache.node_server` and are imported only when used.
"""

from __future__ import annotations

from tierflow.cache.base import Tier, TierStats
from tierflow.cache.codec import decode_table, encode_table, verify
from tierflow.cache.keys import block_key, parse_block_key, validate_key
from tierflow.cache.settings import CacheSettings
from tierflow.cache.tiered import BlockMeta, CacheStats, TieredCache, VerifyReport, close_all, get_cache

__all__ = [
    "BlockMeta",
    "CacheSettings",
    "CacheStats",
    "Tier",
    "TierStats",
    "TieredCache",
    "VerifyReport",
    "block_key",
    "close_all",
    "decode_table",
    "encode_table",
    "get_cache",
    "parse_block_key",
    "validate_key",
    "verify",
]
