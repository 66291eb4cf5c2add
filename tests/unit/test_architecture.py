"""The package's dependency rules (docs/architecture.md), checked on the import graph.

Every ``import`` / ``from ... import`` of a meshweave module counts, also the lazy ones inside
functions (they run too, just later); only ``if TYPE_CHECKING:`` blocks are left out, since they
never execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "meshweave"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Names of the modules ``tree`` imports, skipping ``if TYPE_CHECKING:`` bodies."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]  # `from pkg import module`
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _runtime_imports(ast.parse(path.read_text())):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


GRAPH = _graph()


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _imports_under(module_prefix: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if m == module_prefix or m.startswith(module_prefix + ".")}


# (package, packages of meshweave it must not import): dependencies point one way.
FORBIDDEN = [
    ("meshweave.config", {"meshweave."}),  # a leaf: imports nothing of meshweave
    (
        "meshweave.comm",
        {
            "meshweave.parallel",
            "meshweave.lowcomm",
            "meshweave.models",
            "meshweave.trainer",
            "meshweave.launch",
            "meshweave.data",
            "meshweave.checkpoint",
            "meshweave.config",
        },
    ),
    (
        "meshweave.kernels",
        {
            "meshweave.parallel",
            "meshweave.lowcomm",
            "meshweave.models",
            "meshweave.trainer",
            "meshweave.launch",
            "meshweave.comm",
        },
    ),
    (
        "meshweave.models",
        {"meshweave.parallel", "meshweave.lowcomm", "meshweave.trainer", "meshweave.launch", "meshweave.comm"},
    ),
    ("meshweave.lowcomm", {"meshweave.parallel", "meshweave.trainer", "meshweave.launch"}),
    ("meshweave.parallel", {"meshweave.trainer", "meshweave.launch"}),
    ("meshweave.data", {"meshweave.parallel", "meshweave.trainer", "meshweave.lowcomm", "meshweave.models"}),
]


@pytest.mark.parametrize("package, forbidden", FORBIDDEN, ids=[p for p, _ in FORBIDDEN])
def test_dependencies_point_one_way(package, forbidden):
    bad = {
        f"{m} -> {d}"
        for m, deps in _imports_under(package).items()
        for d in deps
        if any(d == f.rstrip(".") or d.startswith(f if f.endswith(".") else f + ".") for f in forbidden)
    }
    assert not bad, f"{package} must not import {sorted(forbidden)}: {sorted(bad)}"


def test_the_training_loop_knows_only_the_runtime_seam_of_parallel():
    seam = {
        "meshweave.parallel",
        "meshweave.parallel.dims",
        "meshweave.parallel.parallelize",
        "meshweave.parallel.runtime",
    }
    parallel = {d for d in GRAPH["meshweave.trainer.loop"] if d.startswith("meshweave.parallel")}
    assert parallel <= seam, f"trainer/loop.py imports {sorted(parallel - seam)} of parallel/"
