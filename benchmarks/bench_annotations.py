"""What CirCor annotates, used or not: today's default against each option alone and their combination.

On the hard synthetic set (whose murmur descriptors and heart-cycle states the signal carries): one split file
(``--folds`` patient folds, written once) for every row, so rows differ only in the option. Each row is a
cross-validation over ``--seeds`` with the same epoch budget. Rows (``--rows``):

- ``default``: today's defaults;
- ``systolic``: ``heads: [systolic]`` (the five systolic murmur descriptors as extra heads; the diastolic five
  need diastolic murmurs, rare in CirCor and absent from small synthetic sets);
- ``segmentation``: ``heads: [segmentation]`` (heart-cycle states per frame);
- ``patient``: ``patient_model: true`` (batch: ``--batch-size`` / 4 patients, about as many recordings);
- ``calibrate``: ``calibrate: true`` (decisions on temperature-scaled probabilities);
- ``combined``: systolic + segmentation + calibrate (the patient model refuses heads).

Table 1, per row, mean ± sd over the seeds of each seed's pooled out-of-fold figure: murmur weighted accuracy,
outcome cost, heart and murmur AUROC and the recall of the Unknown murmur class (``report/summary.json``,
``sets.seed<S>.pooled``; it rests on few patients, whose number is printed) and the expected
calibration error of the out-of-fold patient probabilities the decisions read (``oof_predictions.csv``; a
``calibrate`` row's are temperature-scaled, each fold's temperature fitted on that member's validation fold,
which is also the fold it is scored on, exactly as its thresholds are).

Table 2, for rows with heads: per descriptor the patient-level balanced accuracy and the heart-cycle macro F1
and frame accuracy, mean ± sd over the fold × seed members (each member's out-of-fold ``metrics.json``,
``heads``; a member whose fold holds no patient with a descriptor is left out of that mean).

    nice python benchmarks/bench_annotations.py --patients 80 --folds 5 --seeds 0 1 2 --epochs 8 --out /tmp/ann_bench
    python benchmarks/bench_annotations.py --patients 30 --folds 3 --seeds 0 --epochs 1 --out /tmp/ann_smoke  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv_rows import (SCORES, UNKNOWN_RECALL, add_arguments, base_config, cell, echo_row, pooled, prepare, print_table,
                     run_row, unknown_patients)

ROWS = {
    "default": {},
    "systolic": {"heads": ["systolic"]},
    "segmentation": {"heads": ["segmentation"]},
    "patient": {"patient_model": True},
    "calibrate": {"calibrate": True},
    "combined": {"heads": ["systolic", "segmentation"], "calibrate": True},
}
ECE = (("ece.murmur", "murmur ECE ↓"), ("ece.heart", "heart ECE ↓"))
COLUMNS = SCORES + ECE + ((UNKNOWN_RECALL, "Unknown recall ↑"),)


def oof_ece(exp_dir: Path, seeds: list[int]) -> dict[str, list[float | None]]:
    """Per label, each seed's expected calibration error over its pooled out-of-fold patients."""
    import numpy as np

    from ignite_trainer.experiments.cv_report import read_oof_predictions
    from ignite_trainer.scoring.calibration import expected_calibration_error

    rows = read_oof_predictions(exp_dir / "oof_predictions.csv")
    out: dict[str, list[float | None]] = {}
    for label in ("murmur", "heart"):
        values = []
        for seed in seeds:
            known = [r for r in rows if r["seed"] == seed and r[f"{label}_true"] != ""]
            values.append(expected_calibration_error(np.array([int(r[f"{label}_true"]) for r in known]),
                                                     np.array([r[f"{label}_prob"] for r in known])))
        out[f"ece.{label}"] = values
    return out


def member_heads(exp_dir: Path) -> dict[str, list[float]]:
    """Per descriptor (patient balanced accuracy) and for segmentation (macro F1, frame accuracy), the members'
    out-of-fold values that exist."""
    from ignite_trainer.experiments.layout import Experiment, oof_dir

    exp = Experiment.load(exp_dir)
    values: dict[str, list[float]] = {}
    for member in exp.members():
        metrics = oof_dir(exp.run_dir(member)) / "metrics.json"
        heads: dict[str, Any] = json.loads(metrics.read_text()).get("heads") or {}
        for head, scores in (heads.get("attributes") or {}).items():
            if scores["patient"]["balanced_accuracy"] is not None:
                values.setdefault(head, []).append(scores["patient"]["balanced_accuracy"])
        seg = heads.get("segmentation")
        for key in ("macro_f1", "frame_accuracy"):
            if seg and seg.get(key) is not None:
                values.setdefault(f"segmentation {key}", []).append(seg[key])
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, patients=80, seeds=[0, 1, 2], epochs=8, batch_size=32, out="/tmp/ann_bench")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()
    data, split_file = prepare(args)

    results: dict[str, dict[str, list]] = {}
    heads: dict[str, dict[str, list[float]]] = {}
    for row in args.rows:
        fields = dict(ROWS[row])
        if fields.get("patient_model"):
            fields["batch_size"] = max(2, args.batch_size // 4)
        config = base_config(args, data=str(data), epochs=args.epochs, split_seed=args.split_seed, **fields)
        summary, exp_dir, seconds = run_row(row, config, args, split_file)
        results[row] = {**pooled(summary, args.seeds, [key for key, _ in SCORES] + [UNKNOWN_RECALL]),
                        **oof_ece(exp_dir, args.seeds)}
        unknown = sorted({unknown_patients(exp_dir, s) for s in args.seeds})
        if "heads" in fields:
            heads[row] = member_heads(exp_dir)
        echo_row(row, results[row], seconds)

    print_table(["row"] + [title for _, title in COLUMNS],
                [(row, [cell(v[key]) for key, _ in COLUMNS]) for row, v in results.items()])
    if heads:
        names = list(dict.fromkeys(name for v in heads.values() for name in v))
        print_table(["row"] + names, [(row, [f"{cell(v[n])} (n={len(v[n])})" if n in v else "–" for n in names])
                                      for row, v in heads.items()])
    print(f"\nTable 1: mean ± sd over seeds {args.seeds} of each seed's pooled out-of-fold figure (Unknown recall: "
          f"among {', '.join(map(str, unknown))} Unknown patients per seed). Table 2: mean ± sd "
          f"over the fold × seed members (n). {args.folds} folds from one split file; {args.epochs} epoch(s) per "
          f"member; batch {args.batch_size} recordings (patient model {max(2, args.batch_size // 4)} patients); "
          f"{args.patients} hard synthetic patients (data seed {args.data_seed}), n_mels {args.n_mels}")


if __name__ == "__main__":
    main()
