"""No import cycles inside `retro`: the graph of which module imports which, read with ast from
python/retro (imports inside functions included: a lazy import that closes a cycle is still a
cycle in the design), has none. Importing a name from a package (`from .retrieval import Retriever`)
is an edge to its __init__; importing a submodule (`from .. import distributed`) an edge to that
module alone, not to its parent package, since every module would otherwise depend on
`retro/__init__.py`, which imports the public API."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "python" / "retro"


def module_name(path: Path) -> str:
    parts = ("retro",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the retro modules it imports}, for every .py file under `root`."""
    paths = {module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bases, names = [a.name for a in node.names], []
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                bases, names = [base], [a.name for a in node.names]
            else:
                continue
            for base in bases:
                for n in names or [None]:
                    if n and f"{base}.{n}" in paths:  # `from package import submodule`
                        targets.add(f"{base}.{n}")
                    elif base in paths:
                        targets.add(base)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert len(graph) > 30 and "retro" in graph
    assert any(graph.values())


def test_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The sub-packages in pipeline order (ARCHITECTURE.md): a module imports from its own package and
# those before it, never from a later one.
PIPELINE = ("base", "retrieval", "model", "retrofitting", "training", "decoding", "evaluation", "serve", "app")


def stage(module: str) -> int:
    """The pipeline rank of a module: its sub-package's; the package itself and `python -m retro`
    come last; a flat module (the demo) ranks with the app."""
    parts = module.split(".")
    if module in ("retro", "retro.__main__"):
        return len(PIPELINE)
    return PIPELINE.index(parts[1]) if parts[1] in PIPELINE else PIPELINE.index("app")


def test_packages_follow_the_pipeline():
    graph = import_graph()
    assert {m.split(".")[1] for m in graph if m.count(".") >= 2} == set(PIPELINE)
    upward = [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets) if stage(b) > stage(a)]
    assert not upward, "imports of a later stage: " + ", ".join(upward)
