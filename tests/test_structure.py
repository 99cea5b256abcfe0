"""The package's floor plan: no import cycle, the public names import, each module's job.

The import graph is read from the source (every ``import`` statement, also those inside
functions), so a cycle hidden behind a lazy import is found too.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from helpers import run_without_torch

import coop_dbo

PACKAGE_DIR = Path(coop_dbo.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of coop_dbo it imports}`` for every module of the package."""
    modules = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                # ``from pkg import sub`` imports the submodule when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "coop_dbo.greenlet_sched" in graph and "coop_dbo.backends.base" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module, forbidden", [
    # the scheduler knows nothing of backends, splitting or models
    ("coop_dbo.greenlet_sched", {"coop_dbo.moe_hooks", "coop_dbo.split", "coop_dbo.runner"}),
    # the trace record is a leaf
    ("coop_dbo.trace.record", set()),
    # the backend contract knows nothing of the scheduler or the exchange
    ("coop_dbo.backends.base", {"coop_dbo.greenlet_sched", "coop_dbo.moe_hooks"}),
    # the split layer knows nothing of the runner or of transformers
    ("coop_dbo.split", {"coop_dbo.runner", "coop_dbo.hf", "coop_dbo.hf.cache"}),
])
def test_layers_import_downward_only(module: str, forbidden: set[str]) -> None:
    graph = import_graph()
    reachable, todo = set(), [module]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    if module == "coop_dbo.trace.record":
        assert reachable == set()
    assert not reachable & forbidden, f"{module} reaches {sorted(reachable & forbidden)}"


def test_scheduler_imports_without_torch() -> None:
    out = run_without_torch("import coop_dbo.greenlet_sched as gs\n"
                            "print(gs.UBatchScheduler(2).run([lambda: 1, lambda: 2]))")
    assert out.strip() == "[1, 2]"


def test_public_names_import() -> None:
    for name in coop_dbo.__all__:
        assert getattr(coop_dbo, name) is not None
    for name in ("UBatchScheduler", "dbo_yield", "dbo_yield_and_switch",
                 "dbo_current_ubatch_id", "YieldAsymmetryError", "print_trace",
                 "CoopDBORunner"):
        assert name in coop_dbo.__all__
    for mod in ("coop_dbo.backends", "coop_dbo.split", "coop_dbo.hf", "coop_dbo.moe_hooks",
                "coop_dbo.cudagraph_capture", "coop_dbo.schedule", "coop_dbo.trace",
                "coop_dbo.runner", "coop_dbo.cost_model", "coop_dbo.models"):
        m = importlib.import_module(mod)
        for name in getattr(m, "__all__", []):
            assert hasattr(m, name), f"{mod}.__all__ names {name!r}, which it lacks"
