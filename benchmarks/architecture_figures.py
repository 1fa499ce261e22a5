"""The package's shape in figures, read from a checkout's code: modules per wing, import circles, imports up
the wings, imports inside functions, the longest module and function, public names, README lines.

Run it on this checkout and on an older one (a ``git worktree`` of any commit) to compare them::

    git worktree add /tmp/before b38347d
    python benchmarks/architecture_figures.py /tmp/before .

A checkout from before the wings (one flat folder) is placed in the wings by where each of its modules went
(`FLAT_TO_WING`), so that "imports up" means the same thing on both sides.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

WINGS = ("core", "data", "model", "scoring", "runs", "training", "use", "experiments")

#: Where each module of the flat layout went when the package got its wings.
FLAT_TO_WING = {
    "vocabulary": "core", "errors": "core", "atomic": "core", "config": "core",
    "splits": "data", "models": "model", "models_resnet": "model", "fusion": "model", "fused_block": "model",
    "cpu_kernels": "model", "scores": "scoring", "challenge_scores": "scoring", "decision": "scoring",
    "predictions": "scoring", "rundir": "runs", "checkpoint": "runs", "run_record": "runs", "run_lock": "runs",
    "logs": "runs", "runs_table": "runs", "engine": "training", "events": "training", "losses": "training",
    "metrics": "training", "augment": "training", "handlers": "training", "standard": "training",
    "graceful": "training", "console": "training", "tracking": "training", "epoch_scalars": "training",
    "tensorboard_epoch": "training", "run": "training", "launch": "training", "runtime": "training",
    "preflight": "training", "model_files": "use", "ensemble": "use", "inference": "use", "predictor": "use",
    "evaluation": "use", "report": "use", "writers": "use", "cv": "experiments", "cv_report": "experiments",
    "sweep": "experiments", "sweep_report": "experiments", "sweep_space": "experiments",
}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((root / "ignite_trainer").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def wing(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in WINGS else FLAT_TO_WING.get(parts[1], "data" if parts[1] == "data" else None)


def imports(mods: dict[str, Path]) -> list[tuple[str, str, bool, int]]:
    """``(importer, imported, inside_a_function, line)`` for every import statement of the package, wherever
    it sits (module level, a function, ``if TYPE_CHECKING:``); ``from pkg import submodule`` names the submodule."""
    rows = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(anchor[:len(anchor) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                rows.append((name, t, id(node) in nested, node.lineno))
    return rows


def circles(mods: dict[str, Path], rows) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    graph = {m: set() for m in mods}
    for a, b, *_ in rows:
        if b in mods and a != "ignite_trainer" and a != b:
            graph[a].add(b)
    index, low, stack, on, found = {}, {}, [], set(), []
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def longest_function(mods: dict[str, Path]) -> tuple[int, str]:
    best = (0, "")
    for name, path in mods.items():
        for f in ast.walk(ast.parse(path.read_text())):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                best = max(best, (f.end_lineno - f.lineno + 1, f"{name}.{f.name}"))
    return best


def public_names(root: Path) -> int:
    tree = ast.parse((root / "ignite_trainer" / "__init__.py").read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and isinstance(node.value, (ast.List, ast.Tuple)):
            return len(node.value.elts)
    for node in tree.body:  # the flat layout listed its names in a dict, public name -> module
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and isinstance(node.value, ast.Dict):
            return len(node.value.keys)
    return 0


def figures(root: Path) -> dict[str, str]:
    mods = modules(root)
    rows = imports(mods)
    per_wing = Counter(wing(m) for m in mods if m != "ignite_trainer" and not m.endswith(tuple(f".{w}" for w in WINGS)))
    flat = sum(1 for m in mods if m.count(".") == 1 and m.split(".")[1] not in WINGS + ("data",))
    up = sum(1 for a, b, *_ in rows if b.startswith("ignite_trainer.") and a != "ignite_trainer" and wing(a) and wing(b)
             and WINGS.index(wing(b)) > WINGS.index(wing(a)))
    inside = [r for r in rows if r[2]]
    longest = max((len(p.read_text().splitlines()), m) for m, p in mods.items())
    fn_lines, fn_name = longest_function(mods)
    readme = root / "README.md"
    return {
        "modules": str(len(mods)),
        "modules in the package's top folder": str(flat),
        "modules per wing": ", ".join(f"{w} {per_wing.get(w, 0)}" for w in WINGS),
        "import circles": str(len(circles(mods, rows))),
        "imports running up the wings": str(up),
        "imports inside functions (of the package / all)":
            f"{sum(1 for r in inside if r[1].startswith('ignite_trainer'))} / {len(inside)}",
        "longest module": f"{longest[1]} ({longest[0]} lines)",
        "longest function": f"{fn_name} ({fn_lines} lines)",
        "public names": str(public_names(root)),
        "README lines": str(len(readme.read_text().splitlines())) if readme.is_file() else "-",
    }


def main(argv: list[str]) -> None:
    roots = [Path(a) for a in argv] or [Path(__file__).resolve().parents[1]]
    columns = [figures(r) for r in roots]
    width = max(len(k) for k in columns[0])
    print(f"| {'':{width}} | " + " | ".join(str(r) for r in roots) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("---" for _ in roots) + "|")
    for key in columns[0]:
        print(f"| {key:{width}} | " + " | ".join(c[key] for c in columns) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
