"""Cross-validation on the embedded synthetic set: wall time with --jobs 1 and --jobs 2, and the fold ensemble
against the mean single-fold model.

For each ``--jobs`` value the same experiment (``--folds`` x ``--seeds``, ``--epochs`` each) runs into its own
directory from a warm feature cache; the per-run out-of-fold predictions of the two are compared (they must be
equal when the member processes use the same thread count). Then a held-out synthetic set (another generator
seed, never seen by any member) is predicted by the ensemble (mean of the members' probabilities) and by each
member alone, all decided by the experiment's out-of-fold thresholds and decision layer. Prints markdown tables.

    nice python benchmarks/bench_cv.py --folds 5 --epochs 3 --jobs 1 2 --out /tmp/cv_bench
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--patients", type=int, default=300, help="embedded synthetic set size")
    parser.add_argument("--holdout-patients", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cv_bench"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()

    import torch

    from ignite_trainer import TrainConfig
    from ignite_trainer.experiments.cv import cross_validate
    from ignite_trainer.experiments.cv_report import METRICS, Decisions, OOFSet, score_patients
    from ignite_trainer.data.synthetic import write_synthetic
    from ignite_trainer.use.ensemble import load_ensemble
    from ignite_trainer.data.discovery import discover_recordings
    from ignite_trainer.use.windows import run_windows
    from ignite_trainer.data.readers import read_recordings
    from ignite_trainer.scoring.decision import patient_features
    from ignite_trainer.data.splits import patient_labels

    args.out.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(epochs=args.epochs, synthetic_patients=args.patients, cache_dir=str(args.out / "cache"),
                         progress=False, device="cpu")
    start = time.perf_counter()
    from ignite_trainer.experiments.cv import dataset_recordings

    dataset_recordings(config)  # fill the embedded set and the feature cache once, outside the timings
    print(f"embedded set and feature cache ready in {time.perf_counter() - start:.1f} s")

    timings, experiments = {}, {}
    for jobs in args.jobs:
        exp_dir = args.out / f"exp_jobs{jobs}"
        shutil.rmtree(exp_dir, ignore_errors=True)
        start = time.perf_counter()
        summary = cross_validate(config, args.folds, args.seeds, exp_dir=exp_dir, jobs=jobs, bootstrap=args.bootstrap,
                                 echo=lambda line: print("  " + line, flush=True))
        timings[jobs] = time.perf_counter() - start
        experiments[jobs] = (exp_dir, summary)
        assert not summary["failed"], summary["failed"]

    cores = len(os.sched_getaffinity(0))
    print(f"\nmachine: {cores} cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads in this process")
    print(f"\n| experiment | --jobs | threads per run | wall s | vs --jobs {args.jobs[0]} |\n|---|---|---|---|---|")
    for jobs, seconds in timings.items():
        threads = torch.get_num_threads() if jobs == 1 else max(1, cores // jobs)
        print(f"| {args.folds} folds x {len(args.seeds)} seed(s), {args.epochs} epochs, {args.patients} patients | "
              f"{jobs} | {threads} | {seconds:.1f} | {seconds / timings[args.jobs[0]]:.2f} |")
    if len(experiments) > 1:
        texts = [(d / "oof_predictions.csv").read_text() for d, _ in experiments.values()]
        print(f"\nout-of-fold predictions identical across --jobs values: {all(t == texts[0] for t in texts)}")

    exp_dir, summary = experiments[args.jobs[-1]]
    print("\n| score | pooled out-of-fold [95 % CI] | mean ± sd of the folds |\n|---|---|---|")
    final = list(summary["sets"])[-1]
    for metric in ("murmur_weighted_accuracy", "outcome_cost", "murmur_accuracy.Present", "murmur_accuracy.Unknown",
                   "murmur_accuracy.Absent", "heart.f1", "murmur.f1", "heart.auroc", "murmur.auroc"):
        v, ci, runs = summary["pooled"][metric], summary["sets"][final]["pooled_interval"][metric], summary["runs"][metric]
        print(f"| {metric} | {_n(v)} {'' if ci is None else f'[{ci[0]:.3f}, {ci[1]:.3f}]'} | {_n(runs['mean'])} ± "
              f"{_n(runs['sd'])} |")

    holdout = write_synthetic(args.out / "holdout", args.holdout_patients, seed=7)
    labelled = read_recordings(holdout, "circor2022")
    truth = {}
    for r in labelled:
        truth.setdefault(r.patient_id, []).append(r)
    recordings = discover_recordings([holdout])
    ensemble = load_ensemble(exp_dir)
    thresholds = ensemble.thresholds

    layer = ensemble.decision_layer()

    def scores(recs, patients) -> dict:
        labels = [patient_labels(truth[p]) for p in patients.ids]
        spread = [(f.murmur_max, f.murmur_min) for f in patient_features(patients, recs)]
        oof = OOFSet("holdout", list(patients.ids), np.zeros(len(patients.ids), dtype=np.int64), patients.probs,
                     np.array([lab[0] for lab in labels]), np.array([lab[1] for lab in labels]), [lab[2] for lab in labels],
                     np.array(spread, dtype=np.float64).reshape(-1, 2))
        rows = np.tile([thresholds["heart"], thresholds["murmur"]], (len(patients.ids), 1))
        return score_patients(Decisions.make(oof, rows, [layer] * len(patients.ids)))

    ens = scores(*ensemble.levels(recordings)[:2])
    singles = [scores(*run_windows(m, recordings).levels(m.config.aggregation)[1:]) for m in ensemble.members]
    print(f"\nheld-out synthetic set ({args.holdout_patients} patients, generator seed 7), out-of-fold thresholds "
          f"heart {thresholds['heart']:.3f} murmur {thresholds['murmur']:.3f}:\n")
    print(f"| score | ensemble of {len(singles)} (mean probability) | single-fold models: mean ± sd | best single |")
    print("|---|---|---|---|")
    for metric in METRICS:
        values = [s[metric] for s in singles if s[metric] is not None]
        if not values:
            continue
        best = min(values) if metric == "outcome_cost" else max(values)
        print(f"| {metric} | {_n(ens[metric])} | {np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f} "
              f"| {best:.3f} |")


def _n(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
