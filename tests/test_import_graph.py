"""No import cycles between starfish modules (the graph is read from the source with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "starfish").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _statements(tree: ast.Module, module_level: bool) -> list[ast.stmt]:
    if not module_level:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:  # module level includes the bodies of top-level if/try blocks, but not TYPE_CHECKING
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", []) + [s for h in getattr(node, "handlers", []) for s in h.body]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
    return out


def imports(name: str, path: Path, known: dict[str, Path], module_level: bool) -> set[str]:
    """The starfish modules ``name`` imports; ``from pkg import sub`` counts as importing ``pkg.sub``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(ast.parse(path.read_text()), module_level):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
            continue
        base = node.module or ""
        if node.level:
            head = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(head + ([base] if base else []))
        subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
        found |= subs if subs and len(subs) == len(node.names) else subs | {base}
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def graph(module_level: bool) -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known, module_level) for name, path in known.items()}


def test_module_level_imports_have_no_cycle():
    g = graph(module_level=True)
    assert len(g) > 30 and "starfish.tasks.classification" in g
    assert find_cycle(g) is None, " -> ".join(find_cycle(g) or [])


def test_no_cycle_even_counting_imports_inside_functions():
    g = graph(module_level=False)
    assert find_cycle(g) is None, " -> ".join(find_cycle(g) or [])
    assert "starfish.cli" not in g["starfish.experiments.compare"] and "starfish.cli" not in g["starfish.experiments.diagnose"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
