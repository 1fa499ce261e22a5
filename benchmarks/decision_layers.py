"""Challenge decisions on the synthetic set: today's threshold + fixed band vs the fitted decision layer.

    python benchmarks/decision_layers.py                       # 3 seeds, 120 patients, 6 epochs
    python benchmarks/decision_layers.py --seeds 0 1 2 3 --patients 200 --epochs 10

For each seed: write a synthetic CirCor set, train the default model with tiny features through the public
API (``train``), ``evaluate`` its validation patients, and read their full-precision patient and recording
probabilities from the report. The truth (murmur class, outcome) comes from the patients' ``.txt`` files.

Fitting a decision and scoring it on the same patients flatters it, so the held-out patients are split in
two halves (alternating in sorted id order): each decision is fitted on one half and scored on the other,
both ways round, and the table reports the mean of the two. The legacy rule (the run's tuned binary
thresholds, murmur Unknown within ±0.1) is scored on the same halves; its thresholds were tuned during
training on the recordings of *all* validation patients, so it has seen the half it is scored on (it is
the optimistic one here); "legacy band, half-tuned" is the same rule with both thresholds tuned by the
run's objective on the fitting half's patients only, the fair comparison. "tuned band" and "logistic"
fit the outcome threshold on observed outcomes, "calibrated outcome" on calibrated probabilities
(expected cost).
Scores are the official ones (`challenge_scores`): murmur weighted accuracy (higher is better), outcome
cost (lower is better), and per-class recall (the official per-class accuracy).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite_trainer import TrainConfig, evaluate, train, write_synthetic  # noqa: E402
from ignite_trainer.scoring.challenge import MURMUR_CLASSES, OUTCOME_CLASSES, challenge_scores  # noqa: E402
from ignite_trainer.scoring.decision import DecisionLayer, PatientFeatures  # noqa: E402
from ignite_trainer.scoring.scores import tune_threshold  # noqa: E402

METHODS = ("legacy band", "legacy band, half-tuned", "tuned band", "logistic", "logistic, calibrated outcome")


def read_truth(data: Path, pid: str) -> tuple[str, str]:
    murmur = outcome = None
    for line in (data / "training_data" / f"{pid}.txt").read_text().splitlines():
        if line.startswith("#Murmur:"):
            murmur = line.split(":", 1)[1].strip()
        elif line.startswith("#Outcome:"):
            outcome = line.split(":", 1)[1].strip()
    if murmur not in MURMUR_CLASSES or outcome not in OUTCOME_CLASSES:
        raise SystemExit(f"{data}/training_data/{pid}.txt: no murmur/outcome label")
    return murmur, outcome


def held_out_patients(report: Path) -> tuple[list[str], list[PatientFeatures]]:
    """Patient ids and features from ``patients.csv`` and ``recordings.csv`` (both at full precision)."""
    spread: dict[str, list[float]] = {}
    with open(report / "recordings.csv") as f:
        for row in csv.DictReader(f):
            spread.setdefault(row["patient_id"], []).append(float(row["murmur_prob"]))
    ids, feats = [], []
    with open(report / "patients.csv") as f:
        for row in csv.DictReader(f):
            pid, murmur = row["patient_id"], float(row["murmur_prob"])
            recs = spread.get(pid, [murmur])
            ids.append(pid)
            feats.append(PatientFeatures(murmur, float(row["heart_prob"]), max(recs), min(recs)))
    return ids, feats


def score(layer: DecisionLayer, feats: list[PatientFeatures], truth: list[tuple[str, str]]) -> dict[str, float | None]:
    labels, probs = layer.outputs(feats)
    s = challenge_scores([t[0] for t in truth], [t[1] for t in truth], labels[:, :3], probs[:, :3],
                         labels[:, 3:], probs[:, 3:])
    out: dict[str, float | None] = {"wacc": s.murmur.weighted_accuracy, "cost": s.outcome.cost}
    out.update({f"rec_{c}": v for c, v in zip(MURMUR_CLASSES, s.murmur.accuracy_classes)})
    out.update({f"rec_{c}": v for c, v in zip(OUTCOME_CLASSES, s.outcome.accuracy_classes)})
    return out


def legacy_on_half(feats: list[PatientFeatures], truth: list[tuple[str, str]], objective: str) -> DecisionLayer:
    """Today's rule with its two thresholds tuned (as training tunes them) on these patients only.

    Unknown patients are left out of the murmur threshold, as training masks them.
    """
    if objective == "fixed":
        return DecisionLayer.legacy(0.5, 0.5, 0.1)
    known = [(f.murmur_prob, t[0] == "Present") for f, t in zip(feats, truth) if t[0] != "Unknown"]
    murmur, _ = tune_threshold([int(y) for _, y in known], [p for p, _ in known], objective)
    heart, _ = tune_threshold([int(t[1] == "Abnormal") for t in truth], [f.heart_prob for f in feats], objective)
    return DecisionLayer.legacy(murmur, heart, 0.1)


def run_seed(seed: int, args: argparse.Namespace, base: Path) -> dict[str, dict[str, float | None]]:
    data = write_synthetic(base / f"data{seed}", args.patients, 2022 + seed)
    config = TrainConfig(data=str(data), epochs=args.epochs, batch_size=16, progress=False, seed=seed,
                         cache_dir=str(base / "cache"), output_dir=str(base / "runs"), name=f"s{seed}",
                         n_mels=16, sample_rate=1000, hop_ms=20.0, n_fft=64, window_seconds=4.0,
                         val_fraction=0.5, device="cpu", early_stopping_patience=0)
    run_dir = Path(train(config)["run_dir"])
    result = evaluate(run_dir, figures=False)
    ids, feats = held_out_patients(Path(result["files"]["patients"]).parent)
    truth = [read_truth(data, pid) for pid in ids]
    legacy = DecisionLayer.legacy(result["thresholds"]["murmur"], result["thresholds"]["heart"], 0.1)
    order = np.argsort(ids, kind="stable")
    halves = [sorted(order[0::2]), sorted(order[1::2])]
    rows: dict[str, list[dict[str, float | None]]] = {m: [] for m in METHODS}
    for fit_half, score_half in ((halves[0], halves[1]), (halves[1], halves[0])):
        fit_f, fit_t = [feats[i] for i in fit_half], [truth[i] for i in fit_half]
        sc_f, sc_t = [feats[i] for i in score_half], [truth[i] for i in score_half]
        layers = {
            "legacy band": legacy,
            "legacy band, half-tuned": legacy_on_half(fit_f, fit_t, result["threshold_objective"]),
            "tuned band": DecisionLayer.fit(fit_f, [t[0] for t in fit_t], [t[1] for t in fit_t], murmur="band"),
            "logistic": DecisionLayer.fit(fit_f, [t[0] for t in fit_t], [t[1] for t in fit_t], murmur="logistic"),
            "logistic, calibrated outcome": DecisionLayer.fit(fit_f, [t[0] for t in fit_t], [t[1] for t in fit_t],
                                                              murmur="logistic", outcome="calibrated"),
        }
        for name, layer in layers.items():
            rows[name].append(score(layer, sc_f, sc_t))
    counts = {c: sum(t[0] == c for t in truth) for c in MURMUR_CLASSES}
    print(f"seed {seed}: {len(ids)} held-out patients {counts}", flush=True)
    return {m: mean_rows(r) for m, r in rows.items()}


def mean_rows(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.fmean(values) if values else None
    return out


def cell(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    keys = ["wacc", "cost", "rec_Present", "rec_Unknown", "rec_Absent", "rec_Abnormal", "rec_Normal"]
    results: dict[int, dict[str, dict[str, float | None]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results[seed] = run_seed(seed, args, Path(tmp))
    header = ("| seed | decision | murmur WAcc | outcome cost | rec Present | rec Unknown | rec Absent "
              "| rec Abnormal | rec Normal |")
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for seed, by_method in results.items():
        for m in METHODS:
            r = by_method[m]
            print(f"| {seed} | {m} | " + " | ".join(cell(r[k], ".0f" if k == "cost" else ".3f") for k in keys) + " |")
    for m in METHODS:
        means = mean_rows([results[s][m] for s in results])
        print(f"| mean | {m} | " + " | ".join(cell(means[k], ".0f" if k == "cost" else ".3f") for k in keys) + " |")


if __name__ == "__main__":
    main()
