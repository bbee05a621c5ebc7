"""The task layer's modules import one way: no circle, however late an import is made."""

from __future__ import annotations

import ast
from pathlib import Path

TASKS = Path(__file__).resolve().parents[1] / "camex" / "tasks"
PACKAGE = "camex.tasks"


def _graph() -> dict[str, set[str]]:
    """Module -> the camex.tasks modules it imports, module-level or inside functions alike.

    `from camex.tasks import x` counts as importing module `x` when `x` is a module, else the
    package itself; the implicit import of the parent package is not counted.
    """
    modules = {p.stem for p in TASKS.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m in modules:
        for node in ast.walk(ast.parse((TASKS / f"{m}.py").read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module == PACKAGE:
                    targets = [f"{PACKAGE}.{a.name}" if a.name in modules else PACKAGE for a in node.names]
                else:
                    targets = [node.module]
            for t in targets:
                if t == PACKAGE:
                    graph[m].add("__init__")
                elif t.startswith(PACKAGE + "."):
                    graph[m].add(t.removeprefix(PACKAGE + ".").split(".")[0])
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_task_modules_import_one_way():
    graph = _graph()
    assert {"sources", "families", "config"} <= set(graph)
    assert _cycle(graph) is None, f"import circle in camex/tasks: {' -> '.join(_cycle(graph))}"


def test_sources_know_nothing_of_task_families():
    """Data sources serve a `DataNeed`; they never reach back into the family declarations."""
    graph = _graph()
    for source in ("sources", "files", "hub", "packaged"):
        assert not graph[source] & {"config", "families", "text", "qa", "lm", "vision", "common", "__init__"}, source


def test_task_files_stay_short():
    long = {p.name: n for p in TASKS.glob("*.py") if (n := len(p.read_text().splitlines())) > 250}
    assert long == {}
