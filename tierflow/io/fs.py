"""fsspec filesystems from (URL, storage_options), with ``${VAR}`` secrets resolved late.

Secrets are written in manifests as ``${VAR}`` and resolved from the environment only here,
when a filesystem is built; the resolved values are never stored, logged or journaled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import fsspec
from fsspec import AbstractFileSystem

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(options: Mapping[str, object]) -> dict[str, object]:
    """Replace ``${VAR}`` in string values (nested mappings too) from the environment.

    Raises KeyError naming the variable (never its value) when it is unset.
    """

    def sub(value: object) -> object:
        if isinstance(value, str):

            def one(m: re.Match[str]) -> str:
                name = m.group(1)
                if name not in os.environ:
                    raise KeyError(f"environment variable {name} is not set")
                return os.environ[name]

            return _VAR.sub(one, value)
        if isinstance(value, Mapping):
            return {k: sub(v) for k, v in value.items()}
        return value

    return {k: sub(v) for k, v in options.items()}


def filesystem(url: str, storage_options: Mapping[str, object] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for ``url``."""
    fs, path = fsspec.core.url_to_fs(url, **expand_env(storage_options or {}))
    return fs, path
