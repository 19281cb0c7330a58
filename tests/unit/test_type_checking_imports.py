"""A module that imports a name only for type checking (``if TYPE_CHECKING:``, so that a command does
not load it until it is used) must import it again where it uses it at run time. mypy cannot see the
difference, so a forgotten import is a NameError only when that code runs (it happened: the console's
``aiohttp.WSMsgType`` once aiohttp moved under TYPE_CHECKING in vmkit.api.transport)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vmkit"


def _type_checking_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
    return names


def _annotation_nodes(tree: ast.Module) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        parts = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            parts.append(node.returns)
        if isinstance(node, ast.arg) and node.annotation is not None:
            parts.append(node.annotation)
        if isinstance(node, ast.AnnAssign):
            parts.append(node.annotation)
        for part in parts:
            out |= {id(n) for n in ast.walk(part)}
    return out


def _imported_in(fn: ast.AST) -> set[str]:
    return {(a.asname or a.name).split(".")[0] for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)
            for a in n.names}


def runtime_uses(path: Path, root: Path = SRC.parent) -> list[str]:
    """``file:line: name`` for each run-time use of a name the module imports only for type checking
    and the enclosing function does not import itself."""
    tree = ast.parse(path.read_text())
    only_typing = _type_checking_names(tree)
    if not only_typing:
        return []
    annotations = _annotation_nodes(tree)
    found: list[str] = []

    def visit(node: ast.AST, imported: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            scope = imported
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                scope = imported | _imported_in(child)
            if (isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load) and child.id in only_typing
                    and id(child) not in annotations and child.id not in scope):
                found.append(f"{path.relative_to(root)}:{child.lineno}: {child.id}")
            visit(child, scope)

    visit(tree, set())
    return found


def test_names_imported_for_type_checking_are_imported_where_they_run() -> None:
    found = [use for path in sorted(SRC.rglob("*.py")) for use in runtime_uses(path)]
    assert found == []


def test_the_check_finds_such_a_use(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import aiohttp\n\n"
                      "def f(x: aiohttp.ClientSession) -> aiohttp.ClientSession:\n    return x\n\n"
                      "def g() -> object:\n    import aiohttp\n    return aiohttp.WSMsgType\n\n"
                      "def h() -> object:\n    return aiohttp.WSMsgType\n")
    assert runtime_uses(module, tmp_path) == ["probe.py:13: aiohttp"]
