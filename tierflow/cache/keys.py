"""Block keys: how a block is named in every tier, and what a valid name is.

A block key is a ``/``-separated string. Blocks produced by a stage use exactly four
segments, ``<pipeline>/<fingerprint>/<stage>/<block index>``: the stage fingerprint cut to
its first :data:`FINGERPRINT_CHARS` characters, the index written with at least six digits
so that keys sort in block order::

    demo/3f9a1c0e/clean/000042

This module is the only place that spells that format: the engine's plan builds its keys
with :func:`stage_keys` (validated once per stage, then one string format per block).

Other cache entries may use one to eight segments under the same rules. The rules are deliberately narrow, because the same string becomes
an LMDB key, a path under a local directory and an object name in a bucket:

* each segment matches ``[A-Za-z0-9._-]+`` and does not start with ``.`` (so no ``.``,
  no ``..``, no hidden names, and the cache's own temporary files, which start with ``.``,
  can never collide with a block);
* no empty segment, so no leading, trailing or doubled ``/``;
* at most :data:`MAX_SEGMENT_LEN` characters per segment and :data:`MAX_KEY_LEN` in all,
  which keeps every key below LMDB's 511-byte key limit without hashing.

>>> block_key("demo", "3f9a1c0e", "clean", 42)
'demo/3f9a1c0e/clean/000042'
>>> validate_key("demo/../etc/passwd")
Traceback (most recent call last):
...
tierflow.errors.InvalidKey: invalid cache key 'demo/../etc/passwd': segment '..' starts with '.'
>>> parse_block_key("demo/3f9a1c0e/clean/000042")
BlockKey(pipeline='demo', fingerprint='3f9a1c0e', stage='clean', index=42)
>>> stage_keys("demo", "3f9a1c0e5d7b2a41" + "0" * 48, "clean")(42)
'demo/3f9a1c0e5d7b2a41/clean/000042'
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from tierflow.errors import InvalidKey

__all__ = [
    "FINGERPRINT_CHARS",
    "MAX_KEY_LEN",
    "MAX_SEGMENTS",
    "MAX_SEGMENT_LEN",
    "BlockKey",
    "StageKeys",
    "block_key",
    "key_prefix",
    "parse_block_key",
    "stage_keys",
    "validate_key",
]

MAX_KEY_LEN = 400
"""Longest key, in characters (= bytes: keys are ASCII). LMDB's own limit is 511 bytes."""

MAX_SEGMENT_LEN = 128
"""Longest single segment."""

MAX_SEGMENTS = 8
"""Most segments in one key. Block keys have exactly four."""

FINGERPRINT_CHARS = 16
"""How much of a stage fingerprint a block key holds: 64 bits of a sha256 hex digest, which
no two versions of one pipeline's stage share in practice, and keeps keys short."""

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def _check_segment(key: str, segment: str) -> None:
    if not segment:
        raise InvalidKey(f"invalid cache key {key!r}: empty segment")
    if len(segment) > MAX_SEGMENT_LEN:
        raise InvalidKey(
            f"invalid cache key {key!r}: segment longer than {MAX_SEGMENT_LEN} characters"
        )
    if _SEGMENT.fullmatch(segment) is None:
        raise InvalidKey(
            f"invalid cache key {key!r}: segment {segment!r} has characters outside "
            "[A-Za-z0-9._-]"
        )
    if segment.startswith("."):
        raise InvalidKey(f"invalid cache key {key!r}: segment {segment!r} starts with '.'")


def validate_key(key: str) -> str:
    """Check that ``key`` is a valid cache key and return it unchanged.

    Args:
        key: The key to check.

    Returns:
        ``key`` itself, so calls can be chained.

    Raises:
        InvalidKey: The key is not a string, is empty or too long, or has a segment that
            is empty, starts with ``.`` or uses a character outside ``[A-Za-z0-9._-]``.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"invalid cache key {key!r}: not a string")
    return _validate(key)


@functools.lru_cache(maxsize=1 << 16)
def _validate(key: str) -> str:
    # Cached: the same key is checked by the cache and then by each tier it visits.
    if not key:
        raise InvalidKey("invalid cache key '': empty")
    if len(key) > MAX_KEY_LEN:
        raise InvalidKey(f"invalid cache key {key[:40]!r}...: longer than {MAX_KEY_LEN} characters")
    segments = key.split("/")
    if len(segments) > MAX_SEGMENTS:
        raise InvalidKey(f"invalid cache key {key!r}: more than {MAX_SEGMENTS} segments")
    for segment in segments:
        _check_segment(key, segment)
    return key


def key_prefix(*segments: str) -> str:
    """Build a listing prefix (``"demo/"``) from leading key segments.

    An empty call gives ``""``, the prefix of every key.

    >>> key_prefix("demo", "3f9a1c0e")
    'demo/3f9a1c0e/'

    Raises:
        InvalidKey: A segment is not valid.
    """
    if not segments:
        return ""
    return validate_key("/".join(segments)) + "/"


@dataclass(frozen=True, slots=True)
class BlockKey:
    """The parts of a stage block's key."""

    pipeline: str
    fingerprint: str
    stage: str
    index: int

    def __str__(self) -> str:
        return block_key(self.pipeline, self.fingerprint, self.stage, self.index)


@dataclass(frozen=True, slots=True)
class StageKeys:
    """The keys of one stage's blocks: ``StageKeys(...)(index)`` is block ``index``'s key.

    Built by :func:`stage_keys`, which checks the stage's part of the key once; a call only
    appends the index. (The driver builds a key per dispatch: validating every one would
    cost ~3.6 us each, a third of the driver's whole per-dispatch budget.)
    """

    prefix: str
    """``<pipeline>/<fingerprint>/<stage>/``, already validated."""

    def __call__(self, index: int) -> str:
        if index < 0:  # only the sign: a non-int fails the format (this is the hot path)
            raise InvalidKey(f"invalid block index {index!r}: must be an int >= 0")
        return f"{self.prefix}{index:06d}"


def stage_keys(pipeline: str, fingerprint: str, stage: str) -> StageKeys:
    """The key builder of ``stage``'s blocks (``fingerprint`` is cut to
    :data:`FINGERPRINT_CHARS` characters).

    Raises:
        InvalidKey: A part is not a valid segment.
    """
    fingerprint = fingerprint[:FINGERPRINT_CHARS] if isinstance(fingerprint, str) else fingerprint
    prefix = f"{pipeline}/{fingerprint}/{stage}/"
    for part in (pipeline, fingerprint, stage):
        if not isinstance(part, str):
            raise InvalidKey(f"invalid block key part {part!r}: not a string")
        _check_segment(prefix, part)
    validate_key(prefix + "0" * 6)  # the whole key's length and segment count
    return StageKeys(prefix)


def block_key(pipeline: str, fingerprint: str, stage: str, index: int) -> str:
    """Build the key of block ``index`` of ``stage`` (see :func:`stage_keys`).

    Raises:
        InvalidKey: A part is not a valid segment or ``index`` is negative.
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidKey(f"invalid block index {index!r}: must be an int >= 0")
    return validate_key(stage_keys(pipeline, fingerprint, stage)(index))


def parse_block_key(key: str) -> BlockKey:
    """Split a stage block's key into its parts.

    Raises:
        InvalidKey: ``key`` is not valid or is not a four-part block key with a numeric
            index.
    """
    validate_key(key)
    parts = key.split("/")
    if len(parts) != 4 or not parts[3].isdigit():
        raise InvalidKey(
            f"invalid block key {key!r}: expected <pipeline>/<fingerprint>/<stage>/<index>"
        )
    return BlockKey(parts[0], parts[1], parts[2], int(parts[3]))
