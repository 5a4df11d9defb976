"""No import loop between the package's modules, nor between its folders (sub-packages),
function-local imports included: every ``import``/``from ... import`` anywhere in a file
is an edge to the package module it names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reptile_gen"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(mod: str, path: Path) -> set[str]:
    """The dotted names a module imports (relative imports made absolute)."""
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def module_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        targets = set()
        for name in _imported(mod, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # a package and its own submodules are one unit (an __init__ re-exports)
            if name and not (
                name == mod or mod.startswith(name + ".") or name.startswith(mod + ".")
            ):
                targets.add(name)
        graph[mod] = targets
    return graph


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    def folder(mod: str) -> str:
        return ".".join(mod.split(".")[:2])

    out: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        node = out.setdefault(folder(mod), set())
        node.update(folder(t) for t in targets if folder(t) not in (folder(mod), PACKAGE.name))
    return out


def in_cycles(graph: dict[str, set[str]]) -> set[str]:
    """The nodes left after repeatedly removing nodes that import nothing left (Kahn's
    order): empty exactly when the graph has no cycle."""
    remaining = {n: set(ts) & set(graph) for n, ts in graph.items()}
    changed = True
    while changed:
        leaves = [n for n, ts in remaining.items() if not ts]
        changed = bool(leaves)
        for leaf in leaves:
            del remaining[leaf]
        for ts in remaining.values():
            ts.difference_update(leaves)
    return set(remaining)


@pytest.mark.parametrize("level", ["modules", "folders"])
def test_no_import_cycles(level):
    graph = module_graph()
    assert len(graph) > 40 and any(graph.values())  # the package was read
    if level == "folders":
        graph = folder_graph(graph)
    assert in_cycles(graph) == set()


def test_the_check_finds_a_cycle():
    # the cycle and what imports it stay; a node outside it goes
    assert in_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}, "e": set()}) == {"a", "b", "c"}
    assert in_cycles({"a": {"b"}, "b": set()}) == set()
    graph = module_graph()
    # algorithms.base imports data.task_spec: the back edge closes a loop
    assert "reptile_gen.data.task_spec" in graph["reptile_gen.algorithms.base"]
    graph["reptile_gen.data.task_spec"].add("reptile_gen.algorithms.base")
    assert "reptile_gen.algorithms.base" in in_cycles(graph)
    assert "reptile_gen.data" in in_cycles(folder_graph(graph))
