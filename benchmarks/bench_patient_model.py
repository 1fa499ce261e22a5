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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv_rows import (SCORES, UNKNOWN_RECALL, add_arguments, base_config, cell, echo_row, pooled, prepare, print_table,
                     run_row, unknown_patients)

ROWS = {"window": False, "patient": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, patients=30, seeds=[0], epochs=1, batch_size=16, out="/tmp/patient_bench")
    parser.add_argument("--patient-batch-size", type=int, default=None,
                        help="patient model: patients per step (default batch-size / 4)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()
    data, split_file = prepare(args)

    patient_batch = args.patient_batch_size or max(2, args.batch_size // 4)
    results: dict[str, dict[str, list]] = {}
    for row in args.rows:
        patient = ROWS[row]
        config = base_config(args, data=str(data), epochs=args.epochs, split_seed=args.split_seed,
                             patient_model=patient, batch_size=patient_batch if patient else args.batch_size)
        summary, exp_dir, seconds = run_row(row, config, args, split_file)
        values = pooled(summary, args.seeds, [key for key, _ in SCORES] + [UNKNOWN_RECALL])
        echo_row(row, values, seconds)
        values["unknown_patients"] = [unknown_patients(exp_dir, s) for s in args.seeds]
        results[row] = values

    print_table(["model"] + [title for _, title in SCORES],
                [(row, [cell(values[key]) for key, _ in SCORES]) for row, values in results.items()])
    print_table(["model", "Unknown recall (among Unknown patients)", "Unknown patients per seed"],
                [(row, [cell(values[UNKNOWN_RECALL]), ", ".join(map(str, sorted(set(values["unknown_patients"]))))])
                 for row, values in results.items()])
    print(f"\nmean ± sd over seeds {args.seeds} of each seed's pooled out-of-fold score; {args.folds} folds from one "
          f"split file; {args.epochs} epoch(s) per member; batches: window {args.batch_size} recordings, patient "
          f"{patient_batch} patients; {args.patients} hard synthetic patients (data seed {args.data_seed})")


if __name__ == "__main__":
    main()
