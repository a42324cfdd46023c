"""The package's shape: no import cycles among tokcomp's modules (lazy imports included, type-only not)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tokcomp"


def _imports(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}  # fmt: skip
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokcomp"):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != "tokcomp"}
    return found


def _graph() -> dict[str, set[str]]:
    files = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_through_others():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_does_not_import_tokcomp_tiny():
    """tokcomp-tiny (its model, training and card) is a user of the library, not part of it: only the CLI's
    train-tiny command reaches it; the task suites it learns from live in tokcomp.data.tasks."""
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if not m.startswith("tokcomp.tiny") and
                   any(d == "tokcomp.tiny" or d.startswith("tokcomp.tiny.") for d in deps))  # fmt: skip
    assert users == ["tokcomp.cli"], users


def test_a_method_on_the_stage_protocol_is_one_small_file():
    """VisionZip, the protocol's proof: one file of at most 80 lines (docstrings included)."""
    assert len((ROOT / "methods" / "visionzip.py").read_text().splitlines()) <= 80
