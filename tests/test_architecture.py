"""The package's shape, kept by the code's own imports: wings along the pipeline, imports pointing down only.

Every ``import`` of the package (module level, inside a function, or under ``TYPE_CHECKING``) is read with
`ast`, so a circle cannot hide inside a function and an annotation-only import still counts as a
dependency. The wing order below is the one a reader sees in the folder tree and in the README.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ignite_trainer"

# The import graph is read by the same code that prints the package's figures (benchmarks/), so the test
# and the figures cannot disagree on what counts as an import, a wing or a circle.
_spec = importlib.util.spec_from_file_location("architecture_figures", ROOT / "benchmarks" / "architecture_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

#: Lowest first: a module may import its own wing and the wings before it, never one after it.
WINGS = figures.WINGS

#: Third-party modules a function may import late, and why; every other import sits at the top of its module.
DEFERRED = {
    "mlflow": "optional extra (`pip install -e '.[mlflow]'`); only `--tracker mlflow` needs it",
    "optuna_integration": "its import pulls in every integration Optuna ships (seconds); only a pruned sweep needs it",
    "ninja": "only the opt-in CPU kernel build needs it on PATH",
    "torch.utils.cpp_extension": "only the opt-in CPU kernel build needs a compiler front-end",
}

MODULES = figures.modules(ROOT)
#: ``(importer, imported, inside_a_function, line)`` for every import in the package.
IMPORTS = figures.imports(MODULES)


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ignite_trainer" else None


def test_every_module_lives_in_a_wing():
    loose = [m for m in MODULES if m != "ignite_trainer" and _wing(m) not in WINGS]
    assert not loose, f"modules outside the wings {WINGS}: {loose}"


def test_imports_point_down_the_wings_only():
    upward = []
    for importer, imported, _, line in IMPORTS:
        if importer == "ignite_trainer" or not imported.startswith("ignite_trainer"):
            continue
        if imported == "ignite_trainer":
            upward.append(f"{importer}:{line} imports the package's public face")
            continue
        if WINGS.index(_wing(imported)) > WINGS.index(_wing(importer)):
            upward.append(f"{importer}:{line} imports {imported}")
    assert not upward, "imports running up the wings:\n" + "\n".join(upward)


def test_there_is_no_import_circle():
    circles = figures.circles(MODULES, IMPORTS)
    assert not circles, f"import circles: {circles}"


def test_imports_inside_functions_only_defer_a_heavy_optional_dependency():
    hidden = [f"{importer}:{line} imports {imported}" for importer, imported, inside, line in IMPORTS
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
