"""The package's shape, kept by the code's own imports: wings along the pipeline, imports pointing down only.

Every ``import`` of the package (module level, inside a function, or under ``TYPE_CHECKING``) is read with
`ast`, so a circle cannot hide inside a function and an annotation-only import still counts as a
dependency. The wing order below is the one a reader sees in the folder tree and in the README.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ignite_trainer"

#: Lowest first: a module may import its own wing and the wings before it, never one after it.
WINGS = ("core", "data", "model", "scoring", "runs", "training", "use", "experiments")

#: Third-party modules a function may import late, and why; every other import sits at the top of its module.
DEFERRED = {
    "mlflow": "optional extra (`pip install -e '.[mlflow]'`); only `--tracker mlflow` needs it",
    "optuna_integration": "its import pulls in every integration Optuna ships (seconds); only a pruned sweep needs it",
    "matplotlib": "figures only; every other command starts without loading a plotting stack",
    "ninja": "only the opt-in CPU kernel build needs it on PATH",
    "torch.utils.cpp_extension": "only the opt-in CPU kernel build needs a compiler front-end",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The package modules an import statement loads (``from pkg import submodule`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports() -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, inside_a_function)`` for every import in the package."""
    rows = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, name, path.name == "__init__.py"):
                    rows.append((name, target, node.lineno, id(node) in nested))
    return rows


IMPORTS = _imports()


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ignite_trainer" else None


def test_every_module_lives_in_a_wing():
    loose = [m for m in MODULES if m != "ignite_trainer" and _wing(m) not in WINGS]
    assert not loose, f"modules outside the wings {WINGS}: {loose}"


def test_imports_point_down_the_wings_only():
    upward = []
    for importer, imported, line, _ in IMPORTS:
        if importer == "ignite_trainer" or not imported.startswith("ignite_trainer"):
            continue
        if imported == "ignite_trainer":
            upward.append(f"{importer}:{line} imports the package's public face")
            continue
        if WINGS.index(_wing(imported)) > WINGS.index(_wing(importer)):
            upward.append(f"{importer}:{line} imports {imported}")
    assert not upward, "imports running up the wings:\n" + "\n".join(upward)


def test_there_is_no_import_circle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for importer, imported, _, _ in IMPORTS:
        if imported in MODULES and importer != "ignite_trainer" and imported != importer:
            graph[importer].add(imported)
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_imports_inside_functions_only_defer_a_heavy_optional_dependency():
    hidden = [f"{importer}:{line} imports {imported}" for importer, imported, line, inside in IMPORTS
              if inside and not any(imported == d or imported.startswith(d + ".") for d in DEFERRED)]
    assert not hidden, "imports inside functions (move them to the top of the module):\n" + "\n".join(hidden)


@pytest.mark.parametrize("wing", WINGS)
def test_every_wing_says_what_it_owns_and_what_it_may_import(wing):
    init = PACKAGE / wing / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    below = WINGS[:WINGS.index(wing)]
    assert "Owns" in doc, f"{init}: the docstring should say what the wing owns"
    named = "nothing but" if not below else ", ".join(below)
    assert "May import" in doc and all(w in doc for w in below), \
        f"{init}: the docstring should say it may import {named} the standard library and third-party packages"
