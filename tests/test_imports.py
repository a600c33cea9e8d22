"""The package's import graph: no cycles, layers import only downwards, and the Ray-free
core stays Ray-free.

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


#: Lowest first: a module may import its own layer and the ones below, never one above.
#: A name covers the module or package and everything under it; every module must be in
#: exactly one (the package root, ``tierflow``, only itself).
LAYERS: list[tuple[str, ...]] = [
    # The vocabulary every layer speaks: errors, the manifest's types, events, credentials.
    ("tierflow.errors", "tierflow.manifest", "tierflow.credentials", "tierflow.code",
     "tierflow.events", "tierflow.faults", "tierflow.retry", "tierflow.stores"),
    ("tierflow.cache", "tierflow.triton"),
    ("tierflow.plan", "tierflow.io"),
    ("tierflow.engine", "tierflow.metrics"),
    ("tierflow.driver", "tierflow.checks", "tierflow.capacity", "tierflow.workspace",
     "tierflow.pipeline_status"),
    ("tierflow", "tierflow.__main__", "tierflow.cli", "tierflow.api", "tierflow.report",
     "tierflow.testing"),
]


def under(module: str, name: str) -> bool:
    return module == name or (name != "tierflow" and module.startswith(name + "."))


def layer_of(module: str) -> int:
    hits = [i for i, names in enumerate(LAYERS) for name in names if under(module, name)]
    assert len(hits) == 1, f"{module} is in {len(hits)} layers of LAYERS (want exactly one)"
    return hits[0]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` for every import of a higher layer."""
    return sorted((a, b) for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


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


def test_every_module_is_in_one_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_the_layer_check_sees_an_upward_import() -> None:
    graph = import_graph()
    assert upward_imports({**graph, "tierflow.errors": {"tierflow.driver"}}) == [
        ("tierflow.errors", "tierflow.driver")
    ]


def test_no_layer_imports_a_higher_one() -> None:
    # cli/api -> driver -> engine -> plan/io -> cache, triton -> errors
    assert upward_imports(import_graph()) == []


def test_the_cache_and_triton_import_neither_other() -> None:
    graph = import_graph()
    for one, other in (("tierflow.cache", "tierflow.triton"), ("tierflow.triton", "tierflow.cache")):
        for module, deps in graph.items():
            if under(module, one):
                assert not [m for m in deps if under(m, other)], module
