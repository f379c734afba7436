"""How the code is laid out: one home per concept, checked by reading the source."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter

from tests.support import ROOT


def _imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports: every import, including those in a
    function or under TYPE_CHECKING (a cycle hidden there is still one)."""
    directory = ROOT / package
    modules = {path.stem: path for path in directory.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:
                    continue
                base = node.module or ""
                if node.level == 1:
                    base = f"{package}.{base}" if base else package
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                head, _, rest = target.partition(".")
                if head == package and rest and rest.split(".")[0] in modules:
                    deps.add(rest.split(".")[0])
        deps.discard(name)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        return list(err.args[1])
    return None


def test_the_import_walk_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_supervisor_modules() -> None:
    graph = _imports("supervisor")
    assert {"actors", "app", "metrics", "relay"} <= graph.keys()
    assert "actors" in graph["app"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"
