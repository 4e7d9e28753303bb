"""The package's imports flow one way: no cycle, and the bottom layer imports nothing above it.

Every `import` counts (at module level or inside a function), except those under
`if TYPE_CHECKING:`, which only name types for mypy.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "batchscore"
# Plain types, settings and errors: everything may import them, they import (almost) nothing.
BOTTOM = {"batchscore.errors", "batchscore.names", "batchscore.settings", "batchscore.metrics"}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for statement in node.body
        for child in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            found.update(name for name in names if name.startswith("batchscore"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("batchscore"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = {target for target in _imports(path) if target in modules}
        graph[name] = targets - {name}
    return graph


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20  # the whole package was read
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
    assert order.index("batchscore.errors") < order.index("batchscore.score")


def test_the_bottom_layer_imports_only_the_bottom_layer() -> None:
    graph = import_graph()
    for name in BOTTOM:
        assert graph[name] <= BOTTOM, f"{name} imports {sorted(graph[name] - BOTTOM)}"


def test_nothing_but_the_cli_imports_the_cli() -> None:
    graph = import_graph()
    for name, targets in graph.items():
        if not name.startswith("batchscore.cli") and name != "batchscore.__main__":
            assert not any(t.startswith("batchscore.cli") for t in targets), name
