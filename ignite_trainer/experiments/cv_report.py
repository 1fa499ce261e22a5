"""The report of a cross-validation experiment: out-of-fold tables, spread, intervals, figures, summary.json.

Everything here starts from the members' out-of-fold predictions (each patient predicted by the model
that never saw it) and is written under the experiment directory:

- ``oof_predictions.csv``: every patient once per seed, probabilities in full precision (``repr``);
- decisions (`tune_decision`): per fold, the per-label thresholds *and* the Challenge decision layer
  (`decision.DecisionLayer`: murmur Present/Unknown/Absent, outcome Abnormal/Normal) fitted on the *other*
  folds' out-of-fold predictions (cross-fitted), so no fold is scored with decisions tuned on itself, and
  the pooled scores are the pooled decisions; ``thresholds.json`` and ``decision.json`` hold the ones
  fitted on all of them, for new data (the ensemble's);
- the Challenge scores (``murmur_weighted_accuracy``, ``outcome_cost``, per-class accuracy and F-measure)
  are the official evaluator's (`challenge_scores`) over the layer's calls, per fold and pooled; the
  layer's features need each patient's recordings, read from the members' ``oof/recordings.csv``;
- ``report/report.md``: a table per metric (the Challenge's, the per-label ones) with every fold and
  seed, mean ± sd over runs, and the pooled out-of-fold score with a 95 % bootstrap interval over
  patients; ``report/scores.csv`` the same numbers in long form; ``report/summary.json`` for scripts;
- figures: per-fold scores as points with their mean, pooled ROC/PR curves, the validation curves of
  every run on one plot with the best and early-stop epochs marked.

With more than one seed, ``seed_mean`` is a set of its own: per patient, the mean over seeds of its
out-of-fold probabilities (the seeds' ensemble, still out of fold).

Undefined scores (no positive patient, one class only) are None (null in JSON, "–" in tables) and are
left out of means, which say over how many runs they are.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator
import yaml

from ignite_trainer.scoring.challenge import MURMUR_CLASSES, OUTCOME_CLASSES, challenge_scores
from ignite_trainer.data.records import LABELS, Recording
from ignite_trainer.scoring.decision import DecisionLayer, PatientFeatures, patient_truth
from ignite_trainer.core.errors import CheckpointError, DataError
from ignite_trainer.data.splits import patient_labels
from ignite_trainer.core.atomic import atomic_write
from ignite_trainer.scoring.calibration import (ECE_BINS, Calibration, apply_temperatures, ece_per_label,
                                                fit_temperature, logits_of, reliability_per_label)
from ignite_trainer.scoring.predictions import LevelPredictions, aggregate, tune_thresholds
from ignite_trainer.scoring.scores import auprc, auroc
from ignite_trainer.runs.checkpoint import find_best_checkpoint
from ignite_trainer.runs.rundir import RunDirectory, read_metrics_log
from ignite_trainer.use.ensemble import ENSEMBLE_FORMAT, ENSEMBLE_MANIFEST
from ignite_trainer.use.report import _figure, _save, plot_roc_pr
from ignite_trainer.experiments.layout import Experiment, Member, oof_dir

__all__ = ["OOF_COLUMNS", "METRICS", "OOFSet", "OOFDecision", "tune_decision", "score_patients", "bootstrap_interval",
           "build_report", "read_oof_predictions"]

OOF_COLUMNS = ("seed", "fold", "patient_id", "heart_true", "heart_prob", "murmur_true", "murmur_prob",
               "murmur_class")
#: The official Challenge scores of the decision layer's calls (per-class accuracy is the class's recall).
CHALLENGE_METRICS = (("murmur_weighted_accuracy", "outcome_cost", "outcome_weighted_accuracy", "murmur_f_measure",
                      "outcome_f_measure")
                     + tuple(f"murmur_{m}.{c}" for m in ("accuracy", "f_measure") for c in MURMUR_CLASSES)
                     + tuple(f"outcome_{m}.{c}" for m in ("accuracy", "f_measure") for c in OUTCOME_CLASSES))
LABEL_METRICS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auroc", "auprc")
METRICS = CHALLENGE_METRICS + tuple(f"{label}.{m}" for label in LABELS for m in LABEL_METRICS)
#: The metrics drawn as per-fold points.
FIGURE_METRICS = ("murmur_weighted_accuracy", "outcome_cost", "heart.f1", "murmur.f1", "heart.auroc", "murmur.auroc")


# ---------------------------------------------------------------------------------------------- out-of-fold sets
@dataclass
class OOFSet:
    """Patient-level out-of-fold predictions of one seed (or of the seeds' mean): one row per patient."""

    name: str
    ids: list[str]
    folds: np.ndarray  # [n] int
    probs: np.ndarray  # [n, 2]
    targets: np.ndarray  # [n, 2]
    mask: np.ndarray  # [n, 2] bool
    classes: list[str | None]  # true CirCor murmur class
    murmur_range: np.ndarray  # [n, 2]: highest and lowest murmur probability over the patient's recordings

    def rows(self, keep: np.ndarray) -> "OOFSet":
        return OOFSet(self.name, [self.ids[i] for i in np.flatnonzero(keep)], self.folds[keep], self.probs[keep],
                      self.targets[keep], self.mask[keep], [self.classes[i] for i in np.flatnonzero(keep)],
                      self.murmur_range[keep])

    def features(self) -> list[PatientFeatures]:
        """What the Challenge decision layer sees of each patient (`decision.PatientFeatures`)."""
        return [PatientFeatures(float(p[1]), float(p[0]), float(r[0]), float(r[1]))
                for p, r in zip(self.probs, self.murmur_range)]

    def level(self) -> LevelPredictions:
        return LevelPredictions("patient", list(self.ids), self.probs, self.targets, self.mask, list(self.ids),
                                list(self.classes), np.ones(len(self.ids), dtype=np.int64))


@dataclass(frozen=True)
class OOFDecision:
    """What decides patients: per-label thresholds (the project's own figures) and the Challenge layer."""

    thresholds: dict[str, float]
    layer: DecisionLayer


def tune_decision(oof: OOFSet, objective: str) -> OOFDecision:
    """The decisions tuned on out-of-fold predictions: per-label thresholds (`predictions.tune_thresholds`
    with the run's ``threshold_objective``) and the Challenge decision layer (`decision.DecisionLayer.fit`
    on the patients' `PatientFeatures` and true classes, as training fits it on validation).

    This is the one place decisions are tuned: `build_report` calls it once per fold on the *other*
    folds' patients and once on all of them (the ensemble's, written to ``thresholds.json`` and
    ``decision.json``).

    Example::

        decided = tune_decision(oof_set, "f1")   # decided.thresholds == {"heart": 0.41, "murmur": 0.37}
        labels, probs = decided.layer.outputs(oof_set.features())
    """
    thresholds = tune_thresholds(oof.probs, oof.targets, oof.mask, objective)  # type: ignore[arg-type]
    murmur_truth, outcome_truth = patient_truth(oof.level())
    return OOFDecision(thresholds, DecisionLayer.fit(oof.features(), murmur_truth, outcome_truth))


@dataclass
class Decisions:
    """Fixed per-patient decisions (so a bootstrap only resamples rows): the per-label calls at each row's
    thresholds, and the Challenge calls and probabilities of each row's decision layer."""

    oof: OOFSet
    positive: np.ndarray  # [n, 2] bool: prob >= the row's threshold
    challenge_labels: np.ndarray  # [n, 5] the layer's binary calls (CHALLENGE_OUTPUT_CLASSES)
    challenge_probs: np.ndarray  # [n, 5] the layer's probabilities
    murmur_true: list[str | None]
    outcome_true: list[str | None]

    @classmethod
    def make(cls, oof: OOFSet, row_thresholds: np.ndarray, row_decision: Sequence[DecisionLayer]) -> "Decisions":
        """``row_thresholds`` [n, 2] and ``row_decision`` (one layer per row, shared within a fold)."""
        features = oof.features()
        labels = np.zeros((len(oof.ids), 5), dtype=np.int64)
        probs = np.zeros((len(oof.ids), 5), dtype=np.float64)
        for layer in {id(layer): layer for layer in row_decision}.values():
            rows = [i for i, other in enumerate(row_decision) if other is layer]
            labels[rows], probs[rows] = layer.outputs([features[i] for i in rows])
        murmur_true, outcome_true = patient_truth(oof.level())
        return cls(oof, oof.probs >= row_thresholds, labels, probs, murmur_true, outcome_true)


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def score_patients(d: Decisions, index: np.ndarray | None = None) -> dict[str, float | None]:
    """Every metric of `METRICS` over the patients ``index`` (all by default) from fixed decisions.

    The Challenge metrics are the official evaluator's (`challenge_scores.challenge_scores`) over the
    patients with both a murmur class and an outcome (None without any); the per-label ones are the
    project's own, at each row's thresholds.

    Example::

        scores = score_patients(Decisions.make(oof, thresholds_per_row, layer_per_row))
    """
    oof = d.oof
    idx = np.arange(len(oof.ids)) if index is None else index
    out: dict[str, float | None] = dict.fromkeys(METRICS)
    for i, label in enumerate(LABELS):
        keep = idx[oof.mask[idx, i]]
        y = oof.targets[keep, i] > 0.5
        pred = d.positive[keep, i]
        tp, fp = int(np.sum(y & pred)), int(np.sum(~y & pred))
        fn, tn = int(np.sum(y & ~pred)), int(np.sum(~y & ~pred))
        out[f"{label}.accuracy"] = _ratio(tp + tn, y.size)
        out[f"{label}.precision"] = _ratio(tp, tp + fp)
        out[f"{label}.sensitivity"] = _ratio(tp, tp + fn)
        out[f"{label}.specificity"] = _ratio(tn, tn + fp)
        out[f"{label}.f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
        both = 0 < int(y.sum()) < y.size
        out[f"{label}.auroc"] = auroc(y.astype(np.int64), oof.probs[keep, i]) if both else None
        out[f"{label}.auprc"] = auprc(y.astype(np.int64), oof.probs[keep, i]) if both else None
    scored = [j for j in idx if d.murmur_true[j] is not None and d.outcome_true[j] is not None]
    if scored:
        s = challenge_scores([d.murmur_true[j] for j in scored], [d.outcome_true[j] for j in scored],
                             d.challenge_labels[scored, :3], d.challenge_probs[scored, :3],
                             d.challenge_labels[scored, 3:], d.challenge_probs[scored, 3:])
        out.update(murmur_weighted_accuracy=s.murmur.weighted_accuracy, outcome_cost=s.outcome.cost,
                   outcome_weighted_accuracy=s.outcome.weighted_accuracy, murmur_f_measure=s.murmur.f_measure,
                   outcome_f_measure=s.outcome.f_measure)
        for task in (s.murmur, s.outcome):
            name = "murmur" if task is s.murmur else "outcome"
            for c, acc, f in zip(task.classes, task.accuracy_classes, task.f_measure_classes):
                out[f"{name}_accuracy.{c}"], out[f"{name}_f_measure.{c}"] = acc, f
    return {k: out[k] for k in METRICS}


def challenge_details(d: Decisions) -> dict[str, Any] | None:
    """Every official score of all the set's scored patients (`ChallengeScores.as_dict`), None without any."""
    scored = [j for j in range(len(d.oof.ids)) if d.murmur_true[j] is not None and d.outcome_true[j] is not None]
    if not scored:
        return None
    return challenge_scores([d.murmur_true[j] for j in scored], [d.outcome_true[j] for j in scored],
                            d.challenge_labels[scored, :3], d.challenge_probs[scored, :3],
                            d.challenge_labels[scored, 3:], d.challenge_probs[scored, 3:]).as_dict()


def bootstrap_interval(d: Decisions, n: int, seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile ``level`` interval of every metric over ``n`` resamples of the patients (with
    replacement, decisions fixed); None for a metric undefined in more than half of the resamples.

    Example::

        ci = bootstrap_interval(decisions, n=1000)   # {"murmur.f1": [0.61, 0.74], ...}
    """
    if n <= 0 or not d.oof.ids:
        return {k: None for k in METRICS}
    rng = np.random.default_rng(seed)
    size = len(d.oof.ids)
    samples: dict[str, list[float]] = {k: [] for k in METRICS}
    for _ in range(n):
        scores = score_patients(d, rng.integers(0, size, size))
        for k, v in scores.items():
            if v is not None:
                samples[k].append(v)
    tail = (1.0 - level) / 2 * 100
    return {k: ([float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if len(v) * 2 > n else None)
            for k, v in samples.items()}


def _mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    return {"mean": float(np.mean(known)) if known else None,
            "sd": float(np.std(known, ddof=1)) if len(known) > 1 else None, "n": len(known), "of": len(values)}


# ---------------------------------------------------------------------------------------------- reading
def _truth(recordings: Sequence[Recording]) -> dict[str, tuple[tuple[float, float], tuple[bool, bool], str | None]]:
    by_patient: dict[str, list[Recording]] = {}
    for r in recordings:
        by_patient.setdefault(r.patient_id, []).append(r)
    return {pid: patient_labels(recs) for pid, recs in by_patient.items()}


def _member_probs(run_dir: Path) -> dict[str, tuple[tuple[float, float], dict[str, float]]]:
    """Per patient of a member's out-of-fold predictions: ``(heart, murmur)`` and its recordings' murmur
    probabilities (``oof/recordings.csv``; a member evaluated before that file existed gives the patient's
    own probability as its only recording, i.e. `PatientFeatures.single`)."""
    path = oof_dir(run_dir) / "patients.csv"
    try:
        with open(path, newline="") as f:
            patients = {row["patient_id"]: (float(row["heart_prob"]), float(row["murmur_prob"]))
                        for row in csv.DictReader(f)}
        recordings: dict[str, dict[str, float]] = {}
        rec_path = path.with_name("recordings.csv")
        if rec_path.is_file():
            path = rec_path
            with open(rec_path, newline="") as f:
                for row in csv.DictReader(f):
                    recordings.setdefault(row["patient_id"], {})[row["recording_id"]] = float(row["murmur_prob"])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: cannot read the member's out-of-fold predictions ({e})") from None
    return {pid: (probs, recordings.get(pid) or {pid: probs[1]}) for pid, probs in patients.items()}


_Row = tuple[int, tuple[float, float], dict[str, float]]  # fold, (heart, murmur), {recording: murmur prob}


def _oof_sets(exp: Experiment, done: Sequence[Member], truth: Mapping[str, Any]) -> list[OOFSet]:
    per_seed: dict[int, dict[str, _Row]] = {}
    for m in done:
        for pid, (probs, recs) in _member_probs(exp.run_dir(m)).items():
            if pid not in truth:
                raise DataError(f"{exp.run_dir(m)}: predicted patient {pid}, which the dataset no longer holds")
            per_seed.setdefault(m.seed, {})[pid] = (m.fold, probs, recs)
    sets = [_make_set(f"seed{s}", rows, truth) for s, rows in sorted(per_seed.items())]
    if len(per_seed) > 1:  # the seeds' ensemble, out of fold: the mean over seeds of each patient's predictions
        pooled: dict[str, tuple[int, list[tuple[float, float]], dict[str, list[float]]]] = {}
        for rows in per_seed.values():
            for pid, (fold, probs, recs) in rows.items():
                entry = pooled.setdefault(pid, (fold, [], {}))
                entry[1].append(probs)
                for rid, p in recs.items():
                    entry[2].setdefault(rid, []).append(p)
        mean = {pid: (fold, tuple(np.mean(np.array(p), axis=0).tolist()),
                      {rid: float(np.mean(v)) for rid, v in recs.items()})
                for pid, (fold, p, recs) in pooled.items()}
        sets.append(_make_set("seed_mean", mean, truth))
    return sets


def _make_set(name: str, rows: Mapping[str, _Row], truth: Mapping[str, Any]) -> OOFSet:
    ids = sorted(rows)
    return OOFSet(name, ids, np.array([rows[p][0] for p in ids], dtype=np.int64),
                  np.array([rows[p][1] for p in ids], dtype=np.float64).reshape(-1, 2),
                  np.array([truth[p][0] for p in ids], dtype=np.float64).reshape(-1, 2),
                  np.array([truth[p][1] for p in ids], dtype=bool).reshape(-1, 2), [truth[p][2] for p in ids],
                  np.array([(max(rows[p][2].values()), min(rows[p][2].values())) for p in ids],
                           dtype=np.float64).reshape(-1, 2))


def read_oof_predictions(path: str | Path) -> list[dict[str, Any]]:
    """``oof_predictions.csv`` as rows with probabilities as floats (exactly those written).

    Example::

        rows = read_oof_predictions("runs/cv-a/oof_predictions.csv")
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"], r["fold"] = int(r["seed"]), int(r["fold"])
        r["heart_prob"], r["murmur_prob"] = float(r["heart_prob"]), float(r["murmur_prob"])
    return rows


def _write_oof_csv(sets: Sequence[OOFSet], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=OOF_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for s in sets:
            if not s.name.startswith("seed") or s.name == "seed_mean":
                continue
            for i, pid in enumerate(s.ids):
                row = {"seed": int(s.name[4:]), "fold": int(s.folds[i]), "patient_id": pid,
                       "murmur_class": s.classes[i] or ""}
                for j, label in enumerate(LABELS):
                    row[f"{label}_true"] = int(s.targets[i, j]) if s.mask[i, j] else ""
                    row[f"{label}_prob"] = repr(float(s.probs[i, j]))
                writer.writerow(row)
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the report
def _member_calibration(run_dir: Path) -> dict[str, Any] | None:
    """The ``calibration`` section of a member's out-of-fold ``metrics.json`` (ECE before and after its own
    temperatures, on its own validation fold); None for a member evaluated before calibration existed."""
    path = oof_dir(run_dir) / "metrics.json"
    try:
        section = json.loads(path.read_text()).get("calibration")
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: cannot read the member's out-of-fold evaluation ({e})") from None
    return section if isinstance(section, dict) else None


def _calibration_report(exp: Experiment, done: Sequence[Member]) -> dict[str, Any]:
    """Per label, ECE before and after temperature scaling on each member's out-of-fold patients (each
    fold's temperature fitted on that fold's validation data), and mean ± sd over the fold × seed runs."""
    per_run = {m.name: _member_calibration(exp.run_dir(m)) for m in done}
    known = {name: c for name, c in per_run.items() if c is not None}
    summary: dict[str, Any] = {"bins": ECE_BINS, "level": "patient", "per_run": {
        name: {"temperatures": c["temperatures"], "ece_before": c["ece_before"], "ece_after": c["ece_after"]}
        for name, c in known.items()}, "runs_without": sorted(set(per_run) - set(known))}
    for when in ("before", "after"):
        summary[f"ece_{when}"] = {label: _mean_sd([c[f"ece_{when}"].get(label) for c in known.values()])
                                  for label in LABELS}
    return summary


def _ensemble_calibration(exp: Experiment, done: Sequence[Member], truth: Mapping[str, Any]) -> Calibration:
    """The ensemble's temperatures, fitted on its members' out-of-fold recordings: each recording predicted by
    the member that never trained on its patient (with several seeds, the mean over seeds), logits / T,
    aggregated to patients by the experiment's rule; no member's own training data is used."""
    per_recording: dict[str, list[tuple[float, float]]] = {}
    patient_of: dict[str, str] = {}
    for m in done:
        path = oof_dir(exp.run_dir(m)) / "recordings.csv"
        try:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    per_recording.setdefault(row["recording_id"], []).append(
                        (float(row["heart_prob"]), float(row["murmur_prob"])))
                    patient_of[row["recording_id"]] = row["patient_id"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{path}: cannot read the member's out-of-fold predictions ({e})") from None
    how = exp.config.aggregation
    ids = sorted(per_recording)
    probs = np.array([np.mean(per_recording[r], axis=0) for r in ids], dtype=np.float64).reshape(-1, 2)
    patients = list(dict.fromkeys(patient_of[r] for r in ids))
    position = {p: i for i, p in enumerate(patients)}
    patient_codes = np.array([position[patient_of[r]] for r in ids], dtype=np.int64)
    targets = np.array([truth[p][0] for p in patients], dtype=np.float64).reshape(-1, 2)
    mask = np.array([truth[p][1] for p in patients], dtype=bool).reshape(-1, 2)
    logits = logits_of(probs)
    temperatures, fitted = {}, {}
    for j, label in enumerate(LABELS):
        t = fit_temperature(logits[:, j], np.arange(len(ids)), patient_codes, targets[:, j], mask[:, j], how)
        temperatures[label], fitted[label] = (1.0, False) if t is None else (t, True)

    def level(p: np.ndarray) -> LevelPredictions:
        keys, agg = aggregate(p, patient_codes.tolist(), how)
        agg = agg[np.argsort(np.asarray(keys))]
        return LevelPredictions("patient", patients, agg, targets, mask, patients, [truth[p][2] for p in patients],
                                np.ones(len(patients), dtype=np.int64))

    before, after = level(probs), level(apply_temperatures(probs, temperatures))
    return Calibration(temperatures, fitted, how, None, False, {name: int(mask[:, j].sum()) for j, name in enumerate(LABELS)},
                       ece_per_label(before), ece_per_label(after), reliability_per_label(before),
                       reliability_per_label(after))


def build_report(exp: Experiment, done: Sequence[Member], recordings: Sequence[Recording], bootstrap: int = 1000,
                 figures: bool = True) -> dict[str, Any]:
    """Everything `cv.collect_experiment` writes from the finished members ``done``; returns ``summary.json``'s content.

    Example::

        summary = build_report(Experiment.load("runs/cv-a"), finished_members, recordings, bootstrap=200)
    """
    objective = exp.config.threshold_objective
    sets = _oof_sets(exp, done, _truth(recordings))
    all_patients = sorted({p for f in exp.folds() for p in f})
    report: dict[str, Any] = {"experiment": str(exp.exp_dir), "folds": exp.n_folds, "seeds": exp.seeds,
                              "split_seed": exp.split_seed, "splits_given": exp.splits_given,
                              "members_finished": [m.name for m in done],
                              "missing": [m.name for m in exp.members() if m not in done],
                              "threshold_objective": objective,
                              "bootstrap": {"resamples": bootstrap, "seed": 0, "level": 0.95}, "sets": {}}
    per_run: dict[str, dict[str, float | None]] = {}
    for s in sets:
        row_t = np.zeros_like(s.probs)
        row_layer: list[DecisionLayer] = [None] * len(s.ids)  # type: ignore[list-item]
        fold_decisions: dict[int, OOFDecision] = {}
        for k in sorted(set(s.folds.tolist())):
            others = s.rows(s.folds != k)
            decided = (tune_decision(others, objective) if len(others.ids) else
                       OOFDecision({label: 0.5 for label in LABELS}, DecisionLayer.legacy(0.5, 0.5)))
            fold_decisions[k] = decided
            row_t[s.folds == k] = [decided.thresholds[label] for label in LABELS]
            for i in np.flatnonzero(s.folds == k):
                row_layer[i] = decided.layer
        d = Decisions.make(s, row_t, row_layer)
        folds = {}
        for k in sorted(fold_decisions):
            folds[k] = score_patients(d, np.flatnonzero(s.folds == k))
            if s.name != "seed_mean":
                per_run[f"fold{k}_{s.name}"] = folds[k]
        report["sets"][s.name] = {
            "patients": len(s.ids), "patients_missing": len(set(all_patients) - set(s.ids)),
            "fold_thresholds": {str(k): v.thresholds for k, v in fold_decisions.items()},
            "fold_decisions": {str(k): v.layer.to_dict() for k, v in fold_decisions.items()},
            "per_fold": {str(k): v for k, v in folds.items()},
            "pooled": score_patients(d), "pooled_interval": bootstrap_interval(d, bootstrap),
            "pooled_challenge": challenge_details(d),
        }
    report["per_run"] = per_run
    report["runs"] = {k: _mean_sd([r[k] for r in per_run.values()]) for k in METRICS}
    final_set = sets[-1]  # the seeds' mean when there are several seeds
    final = tune_decision(final_set, objective)
    report["thresholds"] = final.thresholds
    report["decision"] = final.layer.to_dict()
    report["thresholds_tuned_on"] = f"{final_set.name}: {len(final_set.ids)} out-of-fold patients ({objective})"
    report["pooled"] = report["sets"][final_set.name]["pooled"]
    report["pooled_challenge"] = report["sets"][final_set.name]["pooled_challenge"]
    calibration_summary = _calibration_report(exp, done)
    ensemble_calibration = None
    if calibration_summary["per_run"]:  # members evaluated before calibration existed: collected as before
        report["calibration"] = calibration_summary
        ensemble_calibration = _ensemble_calibration(exp, done, _truth(recordings))
        report["calibration"]["ensemble"] = {"temperatures": ensemble_calibration.temperatures,
                                             "ece_before": ensemble_calibration.ece_before,
                                             "ece_after": ensemble_calibration.ece_after}

    exp_dir = exp.exp_dir
    out = exp.report_dir
    out.mkdir(parents=True, exist_ok=True)
    _write_oof_csv(sets, exp_dir / "oof_predictions.csv")
    _write_json(exp_dir / "thresholds.json", {"thresholds": report["thresholds"], "objective": objective,
                                              "tuned_on": report["thresholds_tuned_on"]})
    tmp = exp_dir / ".decision.json.tmp"
    tmp.write_text(final.layer.to_json() + "\n")
    os.replace(tmp, exp_dir / "decision.json")
    if ensemble_calibration is not None:
        with atomic_write(exp.calibration_file, durable=True) as f:
            f.write(ensemble_calibration.to_json())
    _write_json(exp_dir / ENSEMBLE_MANIFEST, {
        "format": ENSEMBLE_FORMAT, "members": [exp.run_dir(m).relative_to(exp_dir).as_posix() for m in done],
        "thresholds": report["thresholds"],
        "thresholds_source": f"tuned on the out-of-fold predictions ({report['thresholds_tuned_on']})",
        "decision": "decision.json",
        "decision_source": f"fitted on the out-of-fold predictions ({report['thresholds_tuned_on']})",
        **({"calibration": exp.calibration_file.name} if ensemble_calibration is not None else {}),
        "combine": "mean of the members' probabilities"})
    _write_scores_csv(report, out / "scores.csv")
    made = _figures(exp, done, sets, report, out / "figures") if figures else []
    report["figures"] = [str(p.relative_to(out)) for p in made]
    _write_json(exp.summary_file, _finite(report))
    (out / "report.md").write_text(_markdown(report))
    return report


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_scores_csv(report: Mapping[str, Any], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["set", "fold", "metric", "value", "low", "high"])
        for name, s in report["sets"].items():
            for k, scores in s["per_fold"].items():
                for metric, v in scores.items():
                    writer.writerow([name, k, metric, "" if v is None else repr(v), "", ""])
            for metric, v in s["pooled"].items():
                ci = s["pooled_interval"].get(metric)
                writer.writerow([name, "pooled", metric, "" if v is None else repr(v),
                                 "" if ci is None else repr(ci[0]), "" if ci is None else repr(ci[1])])


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _markdown(report: Mapping[str, Any]) -> str:
    sets = report["sets"]
    seed_sets = [n for n in sets if n != "seed_mean"]
    folds = sorted({int(k) for s in sets.values() for k in s["per_fold"]})
    lines = ["# Cross-validation report", "",
             f"- experiment: `{report['experiment']}`: {report['folds']} folds × seeds {report['seeds']}; folds "
             + (f"dealt with split_seed {report['split_seed']}" if report["split_seed"] is not None
                else f"from `{report['splits_given']}`") + ", stratified by heart × murmur",
             f"- finished runs: {len(report['members_finished'])} of {len(report['members_finished']) + len(report['missing'])}"
             + (f" (missing: {', '.join(report['missing'])})" if report["missing"] else ""),
             "- every patient is scored by the model that never saw it (out of fold); each fold is decided with "
             "thresholds and a Challenge decision layer tuned on the *other* folds' out-of-fold predictions "
             f"(thresholds: {report['threshold_objective']}), so no fold is scored with decisions tuned on itself",
             "- Challenge scores (murmur/outcome weighted accuracy, outcome cost, F-measure, per-class accuracy "
             "= recall and F-measure) are the official evaluator's, over the decision layer's calls; the other "
             "tables are the project's own per-label figures at the thresholds",
             "- decision layer for new data (the ensemble's): `decision.json`, fitted on all out-of-fold patients",
             f"- thresholds for new data (the ensemble's): heart {report['thresholds']['heart']:.4f}, murmur "
             f"{report['thresholds']['murmur']:.4f}, tuned on {report['thresholds_tuned_on']}",
             "- the ensemble of the members is the mean of their probabilities",
             f"- pooled: all patients of a seed together, with a 95 % bootstrap interval over patients "
             f"({report['bootstrap']['resamples']} resamples); mean ± sd: over the fold × seed runs (sample sd)",
             "- `seed_mean`: per patient, the mean over seeds of its out-of-fold probabilities" if "seed_mean" in sets else "",
             "- outcome cost: lower is better; – : undefined (no positive patient or one class only)", ""]
    for metric in METRICS:
        header = ["fold"] + seed_sets + (["seed_mean"] if "seed_mean" in sets else [])
        lines += [f"## {metric}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for k in folds:
            cells = [str(k)] + [_num(sets[n]["per_fold"].get(str(k), {}).get(metric)) for n in header[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        pooled = []
        for n in header[1:]:
            v, ci = sets[n]["pooled"][metric], sets[n]["pooled_interval"][metric]
            pooled.append(_num(v) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        lines.append("| pooled [95 % CI] | " + " | ".join(pooled) + " |")
        r = report["runs"][metric]
        spread = "–" if r["mean"] is None else f"{r['mean']:.3f}" + (f" ± {r['sd']:.3f}" if r["sd"] is not None else "")
        lines += ["", f"mean ± sd over runs: {spread} (n={r['n']} of {r['of']})", ""]
    cal = report.get("calibration")
    if cal:
        lines += ["## Calibration (expected calibration error)", "",
                  f"Per label on each run's out-of-fold patients ({cal['bins']} equal-width bins), before and after "
                  "that run's temperature (fitted on its own validation fold); mean ± sd over the fold × seed runs. "
                  "The ensemble's temperature is fitted on all out-of-fold recordings (`calibration.json`).", "",
                  "| label | ECE before | ECE after | ensemble T | ensemble ECE before | ensemble ECE after |",
                  "|---|---|---|---|---|---|"]
        for label in LABELS:
            cells = []
            for when in ("before", "after"):
                r = cal[f"ece_{when}"][label]
                cells.append("–" if r["mean"] is None else f"{r['mean']:.3f}"
                             + (f" ± {r['sd']:.3f}" if r["sd"] is not None else "") + f" (n={r['n']})")
            ens = cal["ensemble"]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ens['temperatures'][label]:.4g} | "
                         f"{_num(ens['ece_before'][label])} | {_num(ens['ece_after'][label])} |")
        lines.append("")
    if report.get("figures"):
        lines += ["## Figures", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in report["figures"]] + [""]
    lines += ["Every number: [summary.json](summary.json), [scores.csv](scores.csv); predictions: "
              "`../oof_predictions.csv`.", ""]
    return "\n".join(line for line in lines if line is not None)


# ---------------------------------------------------------------------------------------------- figures
def _figures(exp: Experiment, done: Sequence[Member], sets: Sequence[OOFSet], report: Mapping[str, Any],
             fig_dir: Path) -> list[Path]:
    made = []
    # per-fold scores as points, one colour per seed, the mean over runs as a line
    fig = _figure(3.2 * len(FIGURE_METRICS), 3.4)
    axes = fig.subplots(1, len(FIGURE_METRICS), squeeze=False)[0]
    for ax, metric in zip(axes, FIGURE_METRICS):
        for j, s in enumerate(n for n in report["sets"] if n != "seed_mean"):
            per_fold = report["sets"][s]["per_fold"]
            xs = [int(k) + (j - 0.5) * 0.08 for k, v in per_fold.items() if v[metric] is not None]
            ys = [v[metric] for v in per_fold.values() if v[metric] is not None]
            ax.plot(xs, ys, "o", label=s, alpha=0.8)
        mean = report["runs"][metric]["mean"]
        if mean is not None:
            ax.axhline(mean, color="black", lw=1, ls="--", label="mean")
        ax.set(title=metric, xlabel="fold")
        ax.set_xticks(range(exp.n_folds))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    made.append(_save(fig, fig_dir / "fold_scores.png"))
    # pooled ROC / PR per label, one curve per seed (and the seeds' mean)
    levels = {s.name: s.level() for s in sets}
    for label in LABELS:
        made.append(plot_roc_pr(levels, label, fig_dir / f"roc_pr_{label}.png"))
    # every run's validation loss, the best epoch (dot) and an early stop (cross) marked
    fig = _figure(7.0, 4.0)
    ax = fig.subplots()
    for m in done:
        run_dir = exp.run_dir(m)
        records = read_metrics_log(RunDirectory(run_dir).metrics_file)
        if not records:
            continue
        epochs = [r["epoch"] for r in records]
        loss = [r.get("val_loss") if isinstance(r.get("val_loss"), (int, float)) else math.nan for r in records]
        (line,) = ax.plot(epochs, loss, lw=1, label=m.name)
        best = _best_epoch(run_dir)
        if best is not None and best in epochs:
            ax.plot([best], [loss[epochs.index(best)]], "o", color=line.get_color(), ms=5)
        config_epochs = _configured_epochs(run_dir)
        if config_epochs is not None and epochs[-1] < config_epochs:
            ax.plot([epochs[-1]], [loss[-1]], "x", color=line.get_color(), ms=8, mew=2)
    ax.set(title="validation loss of every run (● best checkpoint, ✕ early stop)", xlabel="epoch", ylabel="val_loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(done) <= 12:
        ax.legend(fontsize=7)
    made.append(_save(fig, fig_dir / "training_curves.png"))
    return made


def _best_epoch(run_dir: Path) -> int | None:
    """The epoch of the run's best checkpoint (``best_checkpoint_<epoch>_<score>.pt``), None without one."""
    try:
        m = re.match(r"best_checkpoint_(\d+)_", find_best_checkpoint(run_dir).name)
    except CheckpointError:
        return None
    return int(m.group(1)) if m else None


def _configured_epochs(run_dir: Path) -> int | None:
    try:
        return int(yaml.safe_load(RunDirectory(run_dir).config_file.read_text())["epochs"])
    except Exception:  # noqa: BLE001
        return None
