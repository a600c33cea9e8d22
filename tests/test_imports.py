"""The package's import graph: no cycles, and the Ray-free core stays Ray-free.

Read from the source with ``ast`` (nothing is imported to build the graph). Imports inside
functions count too: a lazy import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tierflow

PACKAGE = Path(tierflow.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: tierflow modules it imports}``, at module level or inside functions.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module
    (the parent package runs first either way, as for every submodule import).
    """
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                )
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_imports_that_make_a_cycle() -> None:
    graph = import_graph()
    assert "tierflow.cache.node_server" in graph["tierflow.cache.tiered"]  # inside _open()
    assert cycles({**graph, "tierflow.cache.node_server": {"tierflow.cache.tiered"}}) == [
        ["tierflow.cache.node_server", "tierflow.cache.tiered"]
    ]


def test_no_import_cycle_within_the_package() -> None:
    assert cycles(import_graph()) == []


def test_the_tiered_cache_and_location_names_import_no_ray() -> None:
    code = "import sys, tierflow.cache.tiered, tierflow.cache.locations; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_manifest_and_io_import_no_cache() -> None:
    # They share only the credential rules with the cache (tierflow.credentials).
    graph = import_graph()
    for module in ("tierflow.manifest", "tierflow.io.fs", "tierflow.io.sink", "tierflow.io.source"):
        assert not {m for m in graph[module] if m.startswith("tierflow.cache")}, module
