"""Where a manifest's pipeline lives, without Ray: its cache settings, its plan, its journal.

``tierflow run`` builds on these; ``tierflow status`` and ``tierflow cache`` use them alone,
so they import neither Ray nor tritonclient.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tierflow.cache.settings import CacheSettings
from tierflow.engine.journal import Journal, journal_dir
from tierflow.manifest import CacheConfig, Manifest
from tierflow.plan import Plan, make_plan
from tierflow.triton.repository import model_digest


def cache_settings(manifest: Manifest) -> CacheSettings:
    return cache_settings_from(manifest.cache, manifest.resolve)


def cache_settings_from(c: CacheConfig, resolve: Callable[[str], str]) -> CacheSettings:
    """The manifest's ``cache:`` section as the settings shipped to every worker."""
    return CacheSettings(
        root=resolve(c.dir),
        memory_bytes=c.memory_bytes,
        lmdb_bytes=c.lmdb_bytes,
        lmdb_map_size=max(c.lmdb_bytes * 2, 1 << 30),
        remote_url=c.remote_url,
        storage_options=dict(c.storage_options),
        replicas=c.replicas,
        compression_level=c.compression_level,
    )


def plan_manifest(manifest: Manifest) -> Plan:
    repo = Path(manifest.resolve(manifest.triton.repository))

    def digest(model: str) -> str:
        if (repo / model / "config.pbtxt").is_file():
            return model_digest(repo, model)
        return f"name:{model}"  # a server we cannot see into: identify the model by name

    return make_plan(manifest, digest)


def open_journal(manifest: Manifest, settings: CacheSettings) -> Journal:
    """The pipeline's journal in the durable store (empty when it has none yet)."""
    url = journal_dir(settings.durable_url, manifest.name)
    journal = Journal.load(url, dict(settings.storage_options))
    journal.pipeline = manifest.name
    return journal
