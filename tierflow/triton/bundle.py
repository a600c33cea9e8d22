"""The ``tritonserver`` binary and Python backend that ship in the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 with the Python backend, but not laid out as a backend
directory Triton can load on its own: the stub for each Python version sits in
``python_backend_stubs/<X.Y>/``. :func:`prepare_backend_dir` assembles
``<dir>/python/{libtriton_python.so, triton_python_backend_utils.py,
triton_python_backend_stub}`` once per (wheel version, Python version) in a per-user cache,
so the same ``triton_models/`` runs unchanged here and on any other Triton server.

Usage::

    binary = tritonserver_binary()           # FileNotFoundError (with the fix) if absent
    backends = prepare_backend_dir()         # pass as --backend-directory
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["caches_dir", "library_dir", "prepare_backend_dir", "tritonserver_binary"]

_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"


def _pytriton_root() -> Path:
    """``…/site-packages/pytriton``; raises FileNotFoundError with the fix if absent."""
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise FileNotFoundError(
            "the tritonserver binary ships in the nvidia-pytriton wheel: "
            "pip install 'nvidia-pytriton==0.7.0'"
        ) from exc
    return Path(pytriton.__file__).resolve().parent


def tritonserver_binary() -> Path:
    """Path of the bundled ``tritonserver`` executable."""
    path = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not path.is_file():
        raise FileNotFoundError(f"no tritonserver binary at {path} (broken nvidia-pytriton?)")
    return path


def library_dir() -> Path:
    """The wheel's vendored shared libraries (for ``LD_LIBRARY_PATH``)."""
    # auditwheel puts them next to the package.
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def caches_dir() -> Path:
    """The bundled response-cache implementations (for ``--cache-directory``)."""
    return _pytriton_root() / "tritonserver" / "caches"


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tierflow" / "triton"


def prepare_backend_dir(cache_root: Path | None = None) -> Path:
    """Assemble a Triton backend directory holding the Python backend for this interpreter.

    Built once per (nvidia-pytriton version, Python X.Y) under ``cache_root`` (default:
    ``$XDG_CACHE_HOME/tierflow/triton``, falling back to the temp dir if that is not
    writable), atomically, so concurrent callers never see a half-copied directory.

    Returns:
        The directory to pass as ``--backend-directory`` (it contains ``python/``).

    Raises:
        FileNotFoundError: The wheel lacks the backend or a stub for this Python version.
    """
    root = _pytriton_root() / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / _STUB
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python-backend stub for Python {py}")
    sources = [root / "backends" / "python" / name for name in _BACKEND_FILES] + [stub]
    version = importlib.metadata.version("nvidia-pytriton")
    name = f"pytriton-{version}-py{py}"

    candidates = (
        [cache_root]
        if cache_root
        else [
            _default_cache_root(),
            Path(tempfile.gettempdir()) / f"tierflow-triton-{os.getuid()}",
        ]
    )
    last_error: OSError | None = None
    for base in candidates:
        target = Path(base) / name
        if (target / "python" / _STUB).is_file():
            return target
        try:
            base.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
            (staging / "python").mkdir()
            for src in sources:
                shutil.copy2(src, staging / "python" / src.name)
            try:
                staging.rename(target)
            except OSError:
                # Another process won the race; its copy is identical.
                shutil.rmtree(staging, ignore_errors=True)
                if not (target / "python" / _STUB).is_file():
                    raise
            return target
        except OSError as exc:
            last_error = exc
    raise FileNotFoundError(f"cannot create a Triton backend directory: {last_error}")
