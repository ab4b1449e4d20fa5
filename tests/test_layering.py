"""The import rules between raftmesh's top-level packages (docs/architecture: who may use whom).

Every module is parsed, imports inside functions included, so a lazy import cannot hide a
dependency: the agent and the Raft layer must stay usable without the admin API, the
protocol package must stand alone, and no two packages may depend on each other in a ring.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "storage", "proto", "api", "agent", "cli", "lab", "chaos", "bench")


def imported_packages(path: Path, package: str) -> set[str]:
    """The raftmesh top-level packages a module of `package` imports (itself excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    depth = len(path.relative_to(ROOT / package).parts)  # a module's package depth, from 1
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climbing out of `package` would name another package
                assert node.level <= depth, f"{path}: relative import leaves raftmesh.{package}"
                names = [f"raftmesh.{package}"]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "raftmesh" and len(parts) > 1 and parts[1] != package:
                found.add(parts[1])
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the modules that import it."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for other in imported_packages(path, package):
                graph[package].setdefault(other, []).append(str(path.relative_to(ROOT)))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of packages (first == last), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(p: str) -> list[str] | None:
        state[p] = "open"
        path.append(p)
        for q in sorted(graph.get(p, {})):
            if state.get(q) == "open":
                return path[path.index(q):] + [q]
            if q not in state and (cycle := visit(q)):
                return cycle
        state[p] = "done"
        path.pop()
        return None

    for p in sorted(graph):
        if p not in state and (cycle := visit(p)):
            return cycle
    return None


def test_every_package_is_known():
    """A new top-level package must be placed in the rules here, not slip past them."""
    assert set(PACKAGES) <= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}


def test_agent_and_cluster_do_not_import_the_api():
    graph = package_graph()
    for package in ("agent", "cluster"):
        assert "api" not in graph[package], f"{package}/ imports raftmesh.api in {graph[package]['api']}"


def test_proto_imports_no_other_raftmesh_package():
    graph = package_graph()
    assert graph["proto"] == {}, f"proto/ imports {graph['proto']}"


def test_no_cycle_between_packages():
    graph = package_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle " + " -> ".join(cycle) + ": " + "; ".join(
        f"{a}->{b} in {graph[a][b]}" for a, b in zip(cycle, cycle[1:]))


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b": ["a/x.py"]}, "b": {"c": ["b/y.py"]}, "c": {"a": ["c/z.py"]}, "d": {}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) is None
