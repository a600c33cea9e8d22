"""User code named in manifests as ``module:attr``: importing it and identifying it.

A stage's code identity is the digest of the source file that defines it, so editing a
stage function gives that stage (and everything downstream) new block keys.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Iterable
from typing import Any


_manifest_dirs: set[str] = set()  # every directory add_import_paths has put on sys.path


def add_import_paths(paths: Iterable[str]) -> None:
    """Make modules next to the manifest importable (idempotent)."""
    for p in paths:
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)  # first: the manifest's own modules win over same-named ones
        _forget_other_manifests_modules(os.path.realpath(p))
    importlib.invalidate_caches()  # files written since the finders last listed the directory


def _forget_other_manifests_modules(root: str) -> None:
    """Drop modules an earlier manifest's directory supplied under a name ``root`` also has.

    A process that runs two manifests (a notebook, a test session) would otherwise keep the
    first one's ``steps`` module for the second: wrong code, and block keys from the wrong
    file's digest. Modules from anywhere else (installed packages) are never touched."""
    others = tuple(d + os.sep for d in _manifest_dirs - {root})
    _manifest_dirs.add(root)
    if not others:
        return
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if not origin or not os.path.realpath(origin).startswith(others):
            continue
        local = os.path.join(root, name.partition(".")[0])
        if os.path.isfile(local + ".py") or os.path.isfile(os.path.join(local, "__init__.py")):
            del sys.modules[name]


def local_modules(targets: Iterable[str], base_dir: str) -> list[str]:
    """The files or package directories next to the manifest that define ``targets``
    (``module:attr``), to ship to a cluster whose nodes do not have them. Modules found
    elsewhere (installed packages) are left to the cluster's image."""
    found: list[str] = []
    for target in targets:
        top = target.partition(":")[0].split(".")[0]
        for path in (os.path.join(base_dir, top), os.path.join(base_dir, f"{top}.py")):
            if (os.path.isdir(path) or os.path.isfile(path)) and path not in found:
                found.append(path)
                break
    return found


def load_object(target: str) -> Any:
    """Import ``module:attr`` (attr may be dotted). Raises ImportError/AttributeError."""
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def code_digest(target: str) -> str:
    """sha256 of the source file defining ``target`` (its name when there is no file)."""
    module = importlib.import_module(target.partition(":")[0])
    try:
        source = inspect.getsourcefile(module)
    except TypeError:
        source = None
    h = hashlib.sha256(target.encode())
    if source:
        with open(source, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()
