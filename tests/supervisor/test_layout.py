"""How the code is laid out: one home per concept, checked by reading the source."""

from __future__ import annotations

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

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


# A statement on one of the event log's tables: its keyword, then the table's name after
# FROM / INTO / UPDATE / TABLE (the schema's tables: meta, events, sessions).
_LOG_SQL = re.compile(r"\b(?:SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|REPLACE)\b[^;]*?"
                      r"\b(?:FROM|INTO|UPDATE|TABLE|ON)\s+(?:meta|events|sessions)\b", re.IGNORECASE)


def _log_sql(path: Path) -> list[str]:
    """String constants in a file that hold SQL on the event log's tables."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [m.group(0) for m in _LOG_SQL.finditer(node.value)]
    return found


def test_the_sql_search_finds_a_statement() -> None:
    assert _LOG_SQL.search("SELECT seq, name FROM events WHERE seq > ?")
    assert _LOG_SQL.search("select value from meta where key = 'epoch'")
    assert not _LOG_SQL.search("select the events to send from the outbox")


def test_every_sql_statement_on_the_event_log_is_in_eventlog() -> None:
    home = ROOT / "vmworker" / "eventlog.py"
    assert _log_sql(home)
    elsewhere = {str(path.relative_to(ROOT)): sql
                 for package in ("supervisor", "vmworker", "protocol", "bench")
                 for path in sorted((ROOT / package).rglob("*.py"))
                 if path != home and (sql := _log_sql(path))}
    assert elsewhere == {}
