"""Training recipes compared by cross-validation: one `cli.py cv` experiment per recipe, one markdown table.

Each recipe is today's default plus a few ``--set`` overrides (one augmentation alone, all of them, demographics
fusion, the residual model). Every experiment runs the same folds and seeds on the same data, so the rows differ
only in the recipe. An experiment whose ``report/summary.json`` already exists is not run again: an interrupted
comparison is continued by running the same command, and ``--only`` adds rows later.

    nice python benchmarks/bench_recipes.py --epochs 4 --jobs 2 --out /tmp/recipes
    python benchmarks/bench_recipes.py --out /tmp/recipes --table-only      # print what is there

The table gives, per recipe, the mean ± sd over the fold x seed runs of the Challenge murmur weighted accuracy,
the outcome cost and the per-label AUROC, and the same Challenge scores of the pooled out-of-fold predictions
(seed mean). "beats default" marks a score whose difference from the default is larger than the default's sd.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: name -> (description, ``--set`` overrides). Probabilities are per sample and epoch.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "default": ("today's default (attention_cnn, no augmentation)", []),
    "gain": ("random gain alone (p=0.5, ±6 dB)", ["augment_gain_prob=0.5"]),
    "noise": ("coloured noise alone (p=0.5, SNR 5–30 dB)", ["augment_noise_prob=0.5"]),
    "shift": ("time shift alone (p=0.5, circular, up to half a window)", ["augment_shift_prob=0.5"]),
    "stretch": ("time stretch alone (p=0.5, ±10 %)", ["augment_stretch_prob=0.5"]),
    "time_mask": ("SpecAugment time masks alone (p=0.5, 2 × ≤40 frames)", ["augment_time_mask_prob=0.5"]),
    "freq_mask": ("SpecAugment frequency masks alone (p=0.5, 2 × ≤8 bands)", ["augment_freq_mask_prob=0.5"]),
    "mixup": ("mixup alone (p=0.5, alpha 0.4)", ["augment_mixup_prob=0.5"]),
    "all_augment": ("all augmentations together, each p=0.5",
                    [f"augment_{a}_prob=0.5" for a in ("gain", "noise", "shift", "stretch", "time_mask",
                                                        "freq_mask", "mixup")]),
    "demographics": ("demographics late fusion", ["demographics=true"]),
    "resnet_attention": ("resnet_attention", ["model=resnet_attention"]),
}

#: (summary key, column title, higher is better)
COLUMNS = (("murmur_weighted_accuracy", "murmur WAcc", True), ("outcome_cost", "outcome cost", False),
           ("heart.auroc", "heart AUROC", True), ("murmur.auroc", "murmur AUROC", True))


def run_recipe(name: str, args: argparse.Namespace) -> float | None:
    """Run one recipe's experiment unless its summary exists; returns the wall seconds it took (None if skipped)."""
    exp = args.out / name
    if (exp / "report" / "summary.json").exists():
        return None
    overrides = RECIPES[name][1] + [f"synthetic_difficulty={args.difficulty}", f"cache_dir={args.out / 'cache'}"]
    cmd = [sys.executable, str(ROOT / "cli.py"), "cv", "--folds", str(args.folds), "--seeds", args.seeds,
           "--epochs", str(args.epochs), "--jobs", str(args.jobs), "--no-progress", "--no-figures",
           "--bootstrap", str(args.bootstrap), "--output-dir", str(args.out), "--name", name]
    for o in overrides:
        cmd += ["--set", o]
    print(f"# {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    (exp / "report" / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def _fmt(v: float | None, key: str) -> str:
    if v is None:
        return "–"
    return f"{v:.0f}" if key == "outcome_cost" else f"{v:.3f}"


def table(args: argparse.Namespace) -> str:
    """The markdown table of every recipe whose experiment has finished, in `RECIPES` order."""
    summaries = {}
    for name in RECIPES:
        path = args.out / name / "report" / "summary.json"
        if path.exists():
            summaries[name] = json.loads(path.read_text())
    if not summaries:
        return "(no finished recipe under " + str(args.out) + ")"
    base = summaries.get("default")
    shapes = set()
    for name in summaries:
        exp = yaml.safe_load((args.out / name / "experiment.yaml").read_text())
        shapes.add(f"{exp['folds']} folds x seeds {exp['seeds']}, {exp['config']['epochs']} epochs, "
                   f"synthetic_difficulty {exp['config'].get('synthetic_difficulty')}")
    head = ["recipe"] + [f"{title} (runs mean ± sd)" for _, title, _ in COLUMNS] + \
        ["pooled OOF murmur WAcc", "pooled OOF outcome cost", "beats default by > sd", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        cells = [RECIPES[name][0]]
        better = []
        for key, title, higher in COLUMNS:
            run = s["runs"][key]
            cells.append(f"{_fmt(run['mean'], key)} ± {_fmt(run['sd'], key)}")
            if base is not None and name != "default" and run["mean"] is not None:
                b = base["runs"][key]
                diff = (run["mean"] - b["mean"]) * (1 if higher else -1)
                if diff > (b["sd"] or 0.0):
                    better.append(title)
        cells += [_fmt(s["pooled"]["murmur_weighted_accuracy"], "x"), _fmt(s["pooled"]["outcome_cost"], "outcome_cost")]
        cells.append("–" if name == "default" else (", ".join(better) or "no"))
        wall = args.out / name / "report" / "wall_seconds.txt"
        cells.append(wall.read_text().strip() if wall.exists() else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(sorted(shapes) + lines)  # more than one line on top: the experiments differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="one experiment folder per recipe goes here")
    parser.add_argument("--only", nargs="*", default=list(RECIPES), choices=list(RECIPES), metavar="RECIPE")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--difficulty", default="hard", choices=["default", "hard"])
    parser.add_argument("--table-only", action="store_true", help="print the table of what has finished")
    args = parser.parse_args()
    args.out = args.out.resolve()
    if not args.table_only:
        os.makedirs(args.out, exist_ok=True)
        for name in args.only:
            run_recipe(name, args)
    print(table(args))


if __name__ == "__main__":
    main()
