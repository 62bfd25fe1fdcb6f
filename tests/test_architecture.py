"""The package's shape: no import cycles between foodvision modules, and every foodvision import at module top.

Read from the source with :mod:`ast` (nothing is imported): a cycle or a function-local import of a
foodvision module fails with the full list of offending imports (``path:line``), to work through.
Optional heavy dependencies (gradio, optuna, onnxruntime, ...) may still be imported where they are used.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "foodvision"


@dataclass(frozen=True)
class Import:
    """One import statement's dependency of ``source`` on the foodvision module ``target``."""

    source: str
    target: str
    where: str  # "src/foodvision/x.py:12"
    scope: str  # "" at module level, else the enclosing function or class (e.g. "Tool.run")
    type_only: bool  # under a module-level ``if TYPE_CHECKING:``: never runs


def module_files(src: Path = SRC) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> list[str]:
    """The foodvision modules an import statement imports (relative imports resolved against ``package``).

    ``import a.b.c`` imports ``a.b.c``; ``from a.b import c`` imports the submodule ``a.b.c`` when there is
    one, else (a name defined in ``a.b``) the module ``a.b``. Parent packages run too, but only as the
    packages they are: they are not counted as a dependency of the importer."""

    def known(name: str) -> str | None:  # the longest existing module of a dotted name
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    if isinstance(node, ast.Import):
        found = [known(alias.name) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        return [name for name in found if name is not None]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    if origin.split(".")[0] != PACKAGE:
        return []
    targets = []
    for alias in node.names:
        submodule = f"{origin}.{alias.name}"
        target = submodule if submodule in modules else known(origin)
        if target is not None and target not in targets:
            targets.append(target)
    return targets


def imports_of(name: str, path: Path, modules: dict[str, Path], src: Path = SRC) -> list[Import]:
    """Every foodvision import of one module, with where it is and whether it is local or type-only."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    shown = path.relative_to(src.parent).as_posix()
    found: list[Import] = []

    def visit(node: ast.AST, scope: str, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, package, modules):
                    if target != name:
                        found.append(Import(name, target, f"{shown}:{child.lineno}", scope, type_only))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{scope}.{child.name}" if scope else child.name, type_only)
            elif isinstance(child, ast.If) and not scope and _is_type_checking(child.test):
                for statement in child.body:
                    visit(ast.Module(body=[statement], type_ignores=[]), scope, True)
                for statement in child.orelse:
                    visit(ast.Module(body=[statement], type_ignores=[]), scope, type_only)
            else:
                visit(child, scope, type_only)

    visit(ast.parse(path.read_text(), filename=str(path)), "", False)
    return found


def all_imports(src: Path = SRC) -> list[Import]:
    """Every foodvision import of every module under ``src``, in file and line order."""
    modules = module_files(src)
    return [found for name, path in modules.items() for found in imports_of(name, path, modules, src)]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of two or more modules (each one at least one cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth: the longest import chain, a few dozen modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """``[start, ..., start]``: a shortest import chain from ``start`` back to itself inside ``within``."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for other in sorted(graph.get(node, ()) & within):
            if other == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return [start, *reversed(chain[:-1]), start] if node != start else [start, start]
            if other not in came_from:
                came_from[other] = node
                queue.append(other)
    raise AssertionError(f"{start} is on no cycle inside {sorted(within)}")


def cycles_report(imports: list[Import]) -> str:
    """Empty when the runtime import graph has no cycle; else each cycle, then every import on one."""
    runtime = [found for found in imports if not found.type_only]
    graph: dict[str, set[str]] = {}
    for found in runtime:
        graph.setdefault(found.source, set()).add(found.target)
    lines = []
    for component in strongly_connected(graph):
        members = set(component)
        lines.append(
            f"cycle among {len(component)} modules: "
            + " -> ".join(shortest_cycle(graph, component[0], members))
        )
        for found in runtime:
            if found.source in members and found.target in members:
                local = f" (local, in {found.scope})" if found.scope else ""
                lines.append(f"  {found.where}: {found.source} imports {found.target}{local}")
    return "\n".join(lines)


def local_imports_report(imports: list[Import]) -> str:
    """Empty when every foodvision import is at module level; else each function- or class-local one."""
    return "\n".join(f"  {f.where}: {f.target} imported in {f.scope}" for f in imports if f.scope)


def test_no_import_cycles_between_foodvision_modules() -> None:
    report = cycles_report(all_imports())
    if report:
        print(report)
    assert not report, "import cycles (every import listed is on one; break each cycle):\n" + report


def test_foodvision_modules_are_imported_at_module_top_only() -> None:
    report = local_imports_report(all_imports())
    assert not report, (
        "function-local imports of foodvision modules (move them to the module top; a cycle they hide "
        "shows up in test_no_import_cycles_between_foodvision_modules):\n" + report
    )


# ---- the walker itself, on a small made-up package ------------------------------------------------------


@pytest.fixture
def fake_package(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files = {
        "foodvision/__init__.py": "",
        "foodvision/a.py": "from foodvision import b\n",
        "foodvision/b.py": "from .sub.c import thing\n",
        "foodvision/sub/__init__.py": "",
        "foodvision/sub/c.py": (
            "from typing import TYPE_CHECKING\n"
            "import json\n"
            "if TYPE_CHECKING:\n"
            "    from foodvision.d import Hint\n"
            "def run():\n"
            "    import gradio\n"
            "    from .. import a\n"
            "    return a, gradio\n"
        ),
        "foodvision/d.py": "import foodvision.sub.c as c\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_walker_resolves_imports_and_finds_cycles_and_local_imports(fake_package: Path) -> None:
    imports = all_imports(fake_package)
    edges = {(f.source, f.target, f.scope, f.type_only) for f in imports}
    assert edges == {
        ("foodvision.a", "foodvision.b", "", False),  # from pkg import submodule: the submodule
        ("foodvision.b", "foodvision.sub.c", "", False),  # relative, a name of a module: that module
        ("foodvision.sub.c", "foodvision.d", "", True),  # TYPE_CHECKING: no runtime edge
        ("foodvision.sub.c", "foodvision.a", "run", False),  # `from .. import a` in a function
        ("foodvision.d", "foodvision.sub.c", "", False),
    }
    report = cycles_report(imports)
    assert "foodvision.a -> foodvision.b -> foodvision.sub.c -> foodvision.a" in report
    assert "src/foodvision/sub/c.py:7: foodvision.sub.c imports foodvision.a (local, in run)" in report
    assert "foodvision.d" not in report  # its cycle with c is type-only
    assert local_imports_report(imports) == "  src/foodvision/sub/c.py:7: foodvision.a imported in run"
