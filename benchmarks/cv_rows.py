"""What the option-against-option benchmarks share: one hard synthetic set, one split file, one cross-validation
per row, and mean ± sd over seeds of each seed's pooled out-of-fold scores.

Every row of such a benchmark is a `cross_validate` of one `TrainConfig` over the same folds (a split file
written once), so rows differ only in the option they test. `pooled` reads each seed's pooled out-of-fold
scores from the summary (``sets.seed<S>.pooled``); `cell` prints mean ± sd (``n/a`` where no seed has a
value). Used by ``bench_pretraining.py``, ``bench_patient_model.py`` and ``bench_annotations.py``.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

SCORES = (("murmur_weighted_accuracy", "murmur W.acc ↑"), ("outcome_cost", "outcome cost ↓"),
          ("heart.auroc", "heart AUROC ↑"), ("murmur.auroc", "murmur AUROC ↑"))
#: The official per-class murmur accuracy of the Unknown class: its recall among the Unknown patients.
UNKNOWN_RECALL = "murmur_accuracy.Unknown"


def unknown_patients(exp_dir: Path, seed: int) -> int:
    """How many of a seed's out-of-fold patients are truly Unknown (``oof_predictions.csv``)."""
    with open(exp_dir / "oof_predictions.csv", newline="") as f:
        return sum(1 for row in csv.DictReader(f) if int(row["seed"]) == seed and row["murmur_class"] == "Unknown")


def add_arguments(parser: argparse.ArgumentParser, *, patients: int, seeds: Sequence[int], epochs: int,
                  batch_size: int, out: str) -> None:
    """The data, split, budget and output arguments every row benchmark takes."""
    parser.add_argument("--patients", type=int, default=patients)
    parser.add_argument("--data-seed", type=int, default=2022)
    parser.add_argument("--n-mels", type=int, default=16)
    parser.add_argument("--window-seconds", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--epochs", type=int, default=epochs, help="epochs per cv member, every row")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(out))


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The hard synthetic set (written once per size and seed) and the split file every row uses."""
    from ignite_trainer.data.readers import read_recordings
    from ignite_trainer.data.splits import assign_folds, write_split_file
    from ignite_trainer.data.synthetic import write_synthetic

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"hard_{args.patients}_{args.data_seed}"
    if not data.exists():
        write_synthetic(data, args.patients, args.data_seed, difficulty="hard", progress=False)
    recordings = read_recordings(data, "circor2022")
    split_file = write_split_file(assign_folds(recordings, args.folds, args.split_seed), args.out / "splits.json",
                                  split_seed=args.split_seed)
    print(f"data: {data} ({len({r.patient_id for r in recordings})} patients, {len(recordings)} recordings), "
          f"split {split_file} ({args.folds} folds, split_seed {args.split_seed})", flush=True)
    return data, split_file


def base_config(args: argparse.Namespace, **fields: Any):
    """A CPU `TrainConfig` with the benchmark's feature, batch and output settings, plus ``fields``."""
    from ignite_trainer import TrainConfig

    fields.setdefault("batch_size", args.batch_size)
    return TrainConfig(n_mels=args.n_mels, window_seconds=args.window_seconds, cache_dir=str(args.out / "cache"),
                       output_dir=str(args.out / "runs"), progress=False, device="cpu", **fields)


def run_row(name: str, config: Any, args: argparse.Namespace, split_file: Path) -> tuple[dict[str, Any], Path, float]:
    """Cross-validate ``config`` over the split file and ``args.seeds``: the summary, the experiment folder, the
    wall time. A failed member stops the benchmark with one line."""
    from ignite_trainer.experiments.cv import cross_validate

    exp_dir = args.out / f"cv_{name}"
    start = time.perf_counter()
    summary = cross_validate(config, folds=args.folds, seeds=args.seeds, splits=split_file, jobs=args.jobs,
                             exp_dir=exp_dir, overwrite=True, bootstrap=100, figures=False, echo=lambda _: None)
    if summary.get("failed"):
        raise SystemExit(f"error: {name}: members failed: {summary['failed']}")
    return summary, exp_dir, time.perf_counter() - start


def pooled(summary: dict[str, Any], seeds: Iterable[int], keys: Iterable[str]) -> dict[str, list]:
    """Per key, each seed's pooled out-of-fold score (None where a seed has none)."""
    sets = [summary["sets"][f"seed{s}"]["pooled"] for s in seeds]
    return {key: [s.get(key) for s in sets] for key in keys}


def cell(values: Sequence[float | None]) -> str:
    """``mean ± sd`` (sample sd; 0 for one value) over the values that are known; ``n/a`` if none is."""
    import numpy as np

    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    if np.isnan(v).all():
        return "n/a"
    sd = np.nanstd(v, ddof=1) if np.sum(~np.isnan(v)) > 1 else 0.0
    return f"{np.nanmean(v):.3f} ± {sd:.3f}"


def print_table(header: Sequence[str], rows: Iterable[tuple[str, Sequence[str]]]) -> None:
    """A markdown table: one name column, then the given cells."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")


def echo_row(name: str, values: dict[str, list], seconds: float, write: Callable[[str], None] = print) -> None:
    """One progress line per finished row."""
    write(f"{name:>12}: " + "  ".join(f"{key}={cell(v)}" for key, v in values.items()) + f"  ({seconds:.0f} s)")
