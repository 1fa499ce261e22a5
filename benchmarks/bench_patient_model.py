"""The patient model (``--patient-model``: attention MIL over a patient's recordings) against the default window
model, whose patients come from today's fixed aggregation and decision layer.

On the hard synthetic set: one split file (``--folds`` patient folds, written once) is used by both rows, so
they differ only in the model. Each row is a cross-validation over ``--seeds`` with the same epoch budget
(``--epochs`` per member). ``--batch-size`` counts recordings for the window model; the patient model's batch
counts patients (``--patient-batch-size``, default a quarter of it: about as many recordings per step, CirCor
patients having about four).

Per row, from each seed's pooled out-of-fold decisions (the experiment's ``report/summary.json``,
``sets.seed<S>``): murmur weighted accuracy, outcome cost (lower is better), heart and murmur AUROC, as
mean ± sd over the seeds; and, apart, the recall of the Unknown murmur class among the Unknown patients (the
official per-class murmur accuracy), with how many Unknown patients it rests on. Prints a markdown table.

    nice python benchmarks/bench_patient_model.py --patients 80 --n-mels 16 --folds 5 --seeds 0 1 2 \\
        --epochs 6 --out /tmp/patient_bench
    python benchmarks/bench_patient_model.py --patients 30 --epochs 1 --seeds 0 --out /tmp/patient_smoke  # smoke
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

ROWS = {"window": False, "patient": True}
SCORES = (("murmur_weighted_accuracy", "murmur W.acc ↑"), ("outcome_cost", "outcome cost ↓"),
          ("heart.auroc", "heart AUROC ↑"), ("murmur.auroc", "murmur AUROC ↑"))
UNKNOWN_RECALL = "murmur_accuracy.Unknown"


def _unknown_patients(exp_dir: Path, seed: int) -> int:
    """How many of a seed's out-of-fold patients are truly Unknown (``oof_predictions.csv``)."""
    with open(exp_dir / "oof_predictions.csv", newline="") as f:
        return sum(1 for row in csv.DictReader(f) if int(row["seed"]) == seed and row["murmur_class"] == "Unknown")


def _cell(values: list) -> str:
    import numpy as np

    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    if np.isnan(v).all():
        return "n/a"
    sd = np.nanstd(v, ddof=1) if np.sum(~np.isnan(v)) > 1 else 0.0
    return f"{np.nanmean(v):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--data-seed", type=int, default=2022)
    parser.add_argument("--n-mels", type=int, default=16)
    parser.add_argument("--window-seconds", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=16, help="window model: recordings per step")
    parser.add_argument("--patient-batch-size", type=int, default=None,
                        help="patient model: patients per step (default batch-size / 4)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per cv member, both rows")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/patient_bench"))
    args = parser.parse_args()
    args.out = args.out.resolve()

    from ignite_trainer import TrainConfig
    from ignite_trainer.data.readers import read_recordings
    from ignite_trainer.data.splits import assign_folds, write_split_file
    from ignite_trainer.data.synthetic import write_synthetic
    from ignite_trainer.experiments.cv import cross_validate

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"hard_{args.patients}_{args.data_seed}"
    if not data.exists():
        write_synthetic(data, args.patients, args.data_seed, difficulty="hard", progress=False)
    recordings = read_recordings(data, "circor2022")
    split_file = write_split_file(assign_folds(recordings, args.folds, args.split_seed), args.out / "splits.json",
                                  split_seed=args.split_seed)
    print(f"data: {data} ({len({r.patient_id for r in recordings})} patients, {len(recordings)} recordings), "
          f"split {split_file} ({args.folds} folds, split_seed {args.split_seed})", flush=True)

    patient_batch = args.patient_batch_size or max(2, args.batch_size // 4)
    results: dict[str, dict[str, list]] = {}
    for row in args.rows:
        patient = ROWS[row]
        config = TrainConfig(data=str(data), n_mels=args.n_mels, window_seconds=args.window_seconds,
                             batch_size=patient_batch if patient else args.batch_size, epochs=args.epochs,
                             split_seed=args.split_seed, patient_model=patient, cache_dir=str(args.out / "cache"),
                             output_dir=str(args.out / "runs"), progress=False, device="cpu")
        exp_dir = args.out / f"cv_{row}"
        start = time.perf_counter()
        summary = cross_validate(config, folds=args.folds, seeds=args.seeds, splits=split_file, jobs=args.jobs,
                                 exp_dir=exp_dir, overwrite=True, bootstrap=100, figures=False, echo=lambda _: None)
        if summary.get("failed"):
            raise SystemExit(f"error: {row}: members failed: {summary['failed']}")
        sets = [summary["sets"][f"seed{s}"]["pooled"] for s in args.seeds]
        values = {key: [s[key] for s in sets] for key, _ in SCORES + ((UNKNOWN_RECALL, ""),)}
        values["unknown_patients"] = [_unknown_patients(exp_dir, s) for s in args.seeds]
        results[row] = values
        print(f"{row:>8}: " + "  ".join(f"{key}={_cell(v)}" for key, v in values.items() if key != "unknown_patients")
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)

    print("\n| model | " + " | ".join(title for _, title in SCORES) + " |")
    print("|---|" + "---|" * len(SCORES))
    for row, values in results.items():
        print(f"| {row} | " + " | ".join(_cell(values[key]) for key, _ in SCORES) + " |")
    print("\n| model | Unknown recall (among Unknown patients) | Unknown patients per seed |")
    print("|---|---|---|")
    for row, values in results.items():
        counts = sorted(set(values["unknown_patients"]))
        print(f"| {row} | {_cell(values[UNKNOWN_RECALL])} | {', '.join(map(str, counts))} |")
    print(f"\nmean ± sd over seeds {args.seeds} of each seed's pooled out-of-fold score; {args.folds} folds from one "
          f"split file; {args.epochs} epoch(s) per member; batches: window {args.batch_size} recordings, patient "
          f"{patient_batch} patients; {args.patients} hard synthetic patients (data seed {args.data_seed})")


if __name__ == "__main__":
    main()
