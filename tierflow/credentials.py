"""Credentials in ``storage_options``: written as ``${VAR}``, resolved late, never printed.

A ``storage_options`` value may be written as ``${VAR}`` (or contain ``${VAR}``). Manifests,
:class:`~tierflow.cache.settings.CacheSettings`, journals and every ``repr`` only ever hold
that text; the reference is resolved from the environment of the process that builds an
fsspec filesystem, at that moment (:func:`resolve_storage_options`), and the resolved
values are scrubbed from any error message that might echo them (:func:`secret_values`,
:func:`scrub`). An option whose name looks like a credential must be such a reference
(:func:`check_storage_options`): a secret in clear is refused before anything runs.

The manifest, the sources and sinks (``tierflow.io``) and the cache all follow these rules,
which is why they live here and not under any one of them.

>>> check_storage_options({"secret": "${AWS_SECRET_ACCESS_KEY}", "region": "eu-west-1"})
>>> check_storage_options({"secret": "hunter2"})
Traceback (most recent call last):
...
ValueError: storage_options['secret'] looks like a credential: write it as ${VAR} and set VAR in the environment
>>> resolve_storage_options({"secret": "${S}", "url": "http://${HOST}:9000"}, {"S": "s3cr3t", "HOST": "h"})
{'secret': 's3cr3t', 'url': 'http://h:9000'}
>>> scrub("denied for s3cr3t", secret_values({"secret": "${S}"}, {"S": "s3cr3t"}))
'denied for ***'
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_storage_options", "resolve_storage_options", "scrub", "secret_values"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CREDENTIAL_NAME = re.compile(
    r"(^key$|secret|password|passwd|token|credential|access_key|private)", re.IGNORECASE
)


def check_storage_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError (naming the option, never its value) for a credential in clear."""
    for name, value in options.items():
        if not isinstance(name, str):
            raise ValueError(f"storage_options key {name!r} is not a string")
        if _CREDENTIAL_NAME.search(name) and not (isinstance(value, str) and _VAR.fullmatch(value)):
            raise ValueError(
                f"storage_options[{name!r}] looks like a credential: write it as ${{VAR}} "
                "and set VAR in the environment"
            )


def _resolve(value: Any, environ: Mapping[str, str], name: str) -> Any:
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            var = match.group(1)
            if var not in environ:
                raise KeyError(f"storage_options[{name!r}] refers to ${{{var}}}, which is not set")
            return environ[var]

        return _VAR.sub(lookup, value)
    if isinstance(value, Mapping):
        return {k: _resolve(v, environ, f"{name}.{k}") for k, v in value.items()}
    return value


def resolve_storage_options(
    options: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Return ``options`` with every ``${VAR}`` replaced from ``environ``.

    Call it only where the filesystem is built; never store or log the result.

    Args:
        options: ``storage_options`` as written (``CacheSettings.storage_options``, a
            manifest section's).
        environ: Variables to resolve from (default ``os.environ``).

    Raises:
        KeyError: A referenced variable is not set (the message names the variable only).
    """
    env = os.environ if environ is None else environ
    return {name: _resolve(value, env, name) for name, value in options.items()}


def secret_values(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> list[str]:
    """The resolved values of every ``${VAR}`` in ``options``: strings to scrub from messages."""
    env = os.environ if environ is None else environ
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.extend(env[v] for v in _VAR.findall(value) if env.get(v))
        elif isinstance(value, Mapping):
            for inner in value.values():
                walk(inner)

    for value in options.values():
        walk(value)
    return found


def scrub(text: str, secrets: Sequence[str]) -> str:
    """Replace every secret (of 4+ characters) in ``text`` with ``***``.

    Longest first, so a secret that contains another is replaced whole. Shorter values are
    left: replacing every ``"1"`` would garble a message and protect nothing.
    """
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
