"""Score a trained model the way the field does: every window, then recordings, then patients.

`evaluate` reproduces the run's own validation split from the config stored with the model (same reader,
same feature cache, same `split_recordings` rule) or reads another labelled folder, runs the model over
every window and aggregates. Two kinds of figures come out, kept apart:

- the 2022 Challenge's scores (``challenge`` in ``metrics.json``, ``report/challenge_scores.csv`` in the
  official scores file's layout): every metric of the official evaluator (`challenge_scores`), computed
  from exactly the calls and probabilities ``predict --challenge-dir`` writes for these patients, i.e. the
  decision layer stored with the model (`decision`), or the legacy threshold ± margin rule for a file
  without one;
- the project's own per-level, per-label figures (``levels``; `ignite_trainer.scoring.scores`: accuracy,
  precision, recall = sensitivity, specificity, F1, AUROC, AUPRC, and the 2016 MAcc on the heart label)
  at the per-label thresholds tuned on validation.

An ensemble (a cross-validation experiment directory, an `export.export_ensemble` file or a list of
models) is scored the same way on recordings and patients: each recording's probability is the mean of
its members' probabilities, decided by the ensemble's out-of-fold thresholds and decision layer. Its
members trained on every patient of their dataset between them, so an ensemble needs ``data`` (held-out
recordings), and has no window level (members may cut windows differently).

It writes ``report/metrics.json``, ``report/challenge_scores.csv``, ``report/patients.csv``,
``report/recordings.csv`` and ``report/report.md`` with figures (`report`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ignite_trainer.core.atomic import atomic_directory
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.discovery import detect_format, has_labels
from ignite_trainer.data.prepare import prepare_data, split_recordings
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.scoring.challenge import ChallengeScores, challenge_scores, write_scores_csv
from ignite_trainer.data.records import Recording
from ignite_trainer.scoring.calibration import (ECE_BINS, apply_temperatures, calibrated_windows, ece_per_label,
                                                reliability_per_label)
from ignite_trainer.scoring.decision import DecisionLayer, patient_features, patient_truth
from ignite_trainer.core.errors import ConfigError, DataError
from ignite_trainer.use.ensemble import Ensemble, is_ensemble, load_model
from ignite_trainer.use.heads_output import heads_section, plot_heart_cycle
from ignite_trainer.use.model_files import TrainedModel
from ignite_trainer.scoring.predictions import LevelPredictions, patient_predictions
from ignite_trainer.use.report import write_report
from ignite_trainer.runs.record import read_split
from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.scoring.scores import auprc, auroc, binary_stats, macc
from ignite_trainer.core.vocabulary import AGGREGATIONS, LABELS
from ignite_trainer.use.mc_dropout import check_passes, write_mc_csv
from ignite_trainer.use.mc_dropout import mc_dropout as run_mc_dropout
from ignite_trainer.use.windows import run_windows
from ignite_trainer.use.writers import PATIENT_COLUMNS, write_json, write_patients_csv, write_recordings_csv

__all__ = ["evaluate", "label_scores", "level_scores", "challenge_section", "calibration_section", "PATIENT_COLUMNS", "LEVELS"]

log = logging.getLogger("ignite_trainer")

LEVELS = ("window", "recording", "patient")


# ---------------------------------------------------------------------------------------------- scores
def label_scores(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Every per-label score at one decision threshold (``prob >= threshold`` is positive); a score that
    does not exist on this data (zero denominator, AUROC of one class) is None.

    Example:

        >>> s = label_scores(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.3, 0.1]), 0.5)
        >>> (s["tp"], s["fp"], s["precision"], s["recall"], s["auroc"])
        (1, 1, 0.5, 0.5, 0.75)
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    stats: dict[str, float | int | None] = dict(binary_stats(y_true, prob >= threshold))
    stats.update(auroc=auroc(y_true, prob), auprc=auprc(y_true, prob), support=int(y_true.size),
                 positives=int(y_true.sum()), threshold=float(threshold))
    return stats


def level_scores(level: LevelPredictions, thresholds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """`label_scores` per label over the items where the label is present; MAcc (2016) on the heart label.

    A label present nowhere (murmur on PhysioNet 2016 data) is left out: it has no score at all.
    """
    result = {}
    for label in LABELS:
        y_true, prob = level.label(label)
        if y_true.size:
            result[label] = label_scores(y_true, prob, thresholds[label])
    heart = result.get("heart")
    if heart is not None:
        se, sp = heart["sensitivity"], heart["specificity"]
        heart["macc"] = None if se is None or sp is None else macc(se, sp)
    return result


def challenge_section(patients: LevelPredictions, recordings: LevelPredictions, layer: DecisionLayer
                      ) -> tuple[dict[str, Any], ChallengeScores | None]:
    """The 2022 Challenge's scores of ``layer``'s calls, as the official evaluator computes them.

    The calls and probabilities are exactly those `writers.write_challenge_outputs` writes for these
    patients. Scored are the patients with both a murmur class (Present/Unknown/Absent) and an outcome;
    without any (e.g. the 2016 format), every score is None. Returns the ``metrics.json`` section and the
    `ChallengeScores` (None when nothing could be scored).
    """
    labels, probs = layer.outputs(patient_features(patients, recordings))
    murmur_truth, outcome_truth = patient_truth(patients)
    keep = [i for i, (m, o) in enumerate(zip(murmur_truth, outcome_truth)) if m is not None and o is not None]
    section: dict[str, Any] = {"murmur_weighted_accuracy": None, "outcome_cost": None, "scored_patients": len(keep),
                               "decision_layer": layer.to_dict(), "murmur": None, "outcome": None}
    if not keep:
        return section, None
    scores = challenge_scores([murmur_truth[i] for i in keep], [outcome_truth[i] for i in keep],
                              labels[keep, :3], probs[keep, :3], labels[keep, 3:], probs[keep, 3:])
    section.update(scores.as_dict())
    section.pop("patients", None)
    section["murmur_weighted_accuracy"] = scores.murmur.weighted_accuracy
    section["outcome_cost"] = scores.outcome.cost
    return section, scores


def calibration_section(before: LevelPredictions, after: LevelPredictions, temperatures: dict[str, float],
                        source: str, applied: bool) -> dict[str, Any]:
    """``metrics.json``'s ``calibration``: per label the expected calibration error and reliability bins of
    the patients' probabilities before and after the temperatures (`scoring.calibration`, `ECE_BINS` bins)."""
    return {"level": "patient", "bins": ECE_BINS, "temperatures": dict(temperatures), "source": source,
            "applied": applied, "ece_before": ece_per_label(before), "ece_after": ece_per_label(after),
            "reliability_before": reliability_per_label(before), "reliability_after": reliability_per_label(after)}


def _calibration(trained: Any, ensemble: bool, run: Any, levels: dict[str, LevelPredictions], how: str
                 ) -> dict[str, Any] | None:
    """Before: the model's own probabilities; after: with its temperatures (an ensemble's: on its recordings).
    None for a model or experiment stored without a calibration, and for a patient model (its run has no windows)."""
    if trained.calibration is None or (not ensemble and getattr(run, "raw_windows", None) is None):
        return None
    if ensemble:
        recs, calibration = levels["recording"], trained.calibration
        temperatures = calibration.temperatures
        after_recs = LevelPredictions("recording", recs.ids, apply_temperatures(recs.probs, temperatures), recs.targets,
                                      recs.mask, recs.patient_ids, recs.murmur_classes, recs.n_windows)
        used = [r for r in run]  # the recordings behind recs, in its order
        return calibration_section(levels["patient"], patient_predictions(after_recs, used, how), temperatures,
                                   "fitted on the members' out-of-fold predictions", False)
    temperatures = trained.temperatures
    before = run.patients(run.raw_windows, how)
    after = run.patients(calibrated_windows(run.raw_windows, temperatures), how)
    return calibration_section(before, after, temperatures, "fitted on the validation patients at training time",
                               trained.applies_calibration)


# ---------------------------------------------------------------------------------------------- data
def _select_recordings(trained: TrainedModel, data: str | Path | None, fmt: str | None,
                       split: Literal["val", "all"]) -> tuple[list[Recording], str, str, list[str]]:
    """The recordings to evaluate, where they came from, their format, and the patients of the run's data
    folder that are in neither side of its saved split (added after training: never scored as validation)."""
    config = trained.config
    new_patients: list[str] = []
    if data is None:
        prepared = prepare_data(config)
        chosen = prepared.val if split == "val" else prepared.train + prepared.val
        saved = read_split(trained.run_dir)
        if saved is not None and split == "val":  # the patients the run held out, whatever the folder holds now
            everyone = prepared.train + prepared.val
            chosen = [r for r in everyone if r.patient_id in saved["val"]]
            new_patients = sorted({r.patient_id for r in everyone} - saved["train"] - saved["val"])
        return chosen, str(prepared.source), config.format if config.data else "circor2022", new_patients
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    detected = detect_format(root)
    if fmt is not None and detected is not None and detected != fmt and not has_labels(root, fmt):
        raise DataError(f"{root}: is laid out as {detected}, not format={fmt}; drop --format or pass --format {detected}")
    fmt = fmt or detected or config.format
    if not has_labels(root, fmt):
        raise DataError(f"{root}: has no labels; use predict to run the model on unlabelled recordings")
    recordings = read_recordings(root, fmt, unknown_murmur=config.unknown_murmur,
                                 policy=BadInputPolicy(skip=config.skip_bad))
    if split == "val":
        _, recordings = split_recordings(recordings, config)
    return recordings, str(root), fmt, new_patients


# ---------------------------------------------------------------------------------------------- entry
def evaluate(path, data: str | Path | None = None, fmt: str | None = None,
             split: Literal["val", "all"] | None = None, aggregation: Literal["mean", "any"] | None = None,
             unknown_margin: float = 0.1, out_dir: str | Path | None = None, device: str = "cpu",
             figures: bool = True, mc_dropout: int | None = None, mc_seed: int = 0) -> dict[str, Any]:
    """Evaluate a run directory, checkpoint or safetensors export, or an ensemble (experiment directory,
    `export_ensemble` file, list of models); returns what ``metrics.json`` holds.

    Without ``data`` the run's own validation split is scored (``split="all"``: train and validation);
    with ``data`` every recording of that labelled folder is (``split="val"``: its validation split by the
    run's split settings). ``aggregation`` (recordings -> patients) defaults to the run's. ``unknown_margin``
    only applies to a model saved without a decision layer (the legacy Unknown band). Output goes to
    ``<run>/report/`` (or ``<checkpoint stem>_report/`` beside a file outside a run, ``EXP_DIR/evaluation/``
    for an experiment, or ``out_dir``). ``mc_dropout`` (N passes, seeded by ``mc_seed``; one model only) adds
    ``mc_dropout.csv``: each patient's mean probability and its sd over the passes (`mc_dropout`).

    Example::

        result = evaluate("runs/quick")
        print(result["challenge"]["murmur_weighted_accuracy"], result["challenge"]["outcome_cost"])
        print(result["levels"]["patient"]["murmur"]["f1"])  # the project's own per-label figure
    """
    if split not in (None, "val", "all"):
        raise ConfigError(f"split={split!r} is not one of: val, all")
    if aggregation is not None and aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation={aggregation!r} is not one of: {', '.join(AGGREGATIONS)}")
    if not (isinstance(unknown_margin, (int, float)) and 0.0 <= unknown_margin <= 0.5):
        raise ConfigError(f"unknown_margin={unknown_margin!r} must be a number in [0, 0.5]")
    if mc_dropout is not None:
        check_passes(mc_dropout, "mc_dropout (--mc-dropout)")
        if isinstance(mc_seed, bool) or not isinstance(mc_seed, int) or mc_seed < 0:
            raise ConfigError(f"mc_seed={mc_seed!r} must be an integer >= 0")
    trained = load_model(path)
    ensemble = isinstance(trained, Ensemble)
    if ensemble and mc_dropout is not None:
        raise ConfigError(f"{trained.source}: --mc-dropout runs one model; evaluate a member's run directory instead")
    if ensemble and data is None:
        raise ConfigError(f"{trained.source}: an ensemble's members trained on every patient of their dataset "
                          "between them; evaluate it on held-out recordings (data=/--data)")
    out = _output_dir(trained, out_dir, check_only=True)
    split = split or ("val" if data is None else "all")
    how = aggregation or trained.config.aggregation
    recordings, source, data_format, new_patients = _select_recordings(trained, data, fmt, split)
    if not recordings:
        raise DataError(f"{source}: no recordings to evaluate in the {split!r} split")

    if ensemble:
        recs, patients, warnings = trained.levels(recordings, how, device=device)
        levels = {"recording": recs, "patient": patients}
        by_id = {r.recording_id: r for r in recordings}
        calibration = _calibration(trained, True, [by_id[i] for i in recs.ids], levels, how)
    else:
        run = run_windows(trained, recordings, device=device)
        levels = {name: level for name, level in zip(LEVELS, run.levels(how)) if level is not None}
        warnings = run.warnings
        calibration = _calibration(trained, False, run, levels, how)
    heads = None if ensemble or getattr(run, "heads", None) is None else heads_section(run.heads, run.dataset,
                                                                                        levels["recording"])
    mc = None if mc_dropout is None else run_mc_dropout(trained, recordings, mc_dropout, mc_seed, how, device)
    thresholds = trained.thresholds
    layer = trained.decision_layer(unknown_margin)
    challenge, scores = challenge_section(levels["patient"], levels["recording"], layer)
    if trained.decision is None:
        challenge["decision"] = f"legacy rule: murmur threshold ± {unknown_margin:g} is Unknown, heart threshold"
    else:
        challenge["decision"] = (f"the ensemble's: {trained.decision_source}" if ensemble
                                 else "fitted on the validation patients at training time")
    results: dict[str, Any] = {
        "model": str(trained.source),
        "epoch": trained.epoch,
        "data": source,
        "format": data_format,
        "split": split,
        "aggregation": how,
        "patient_model": bool(getattr(trained.config, "patient_model", False)),
        "thresholds": dict(thresholds),
        "thresholds_tuned": trained.thresholds_tuned,
        "threshold_objective": trained.config.threshold_objective if trained.thresholds_tuned else "fixed",
        "unknown_margin": float(unknown_margin),
        "counts": {name: len(level) for name, level in levels.items()},
        "members": [str(m.source) for m in trained.members] if ensemble else None,
        "combine": "mean of the members' probabilities" if ensemble else None,
        "levels": {name: level_scores(level, thresholds) for name, level in levels.items()},
        "challenge": challenge,
        "new_patients": new_patients,
        "warnings": ([f"{len(new_patients)} patient(s) added to {source} after training are in neither side of "
                      f"the run's split and were not scored as validation: {', '.join(new_patients)}"]
                     if new_patients else []) + list(warnings),
    }
    # a model without a calibration (every file from before it existed) reports exactly what it did before
    if calibration is not None:
        results["calibration"] = calibration
    if mc is not None:
        results["mc_dropout"] = {"passes": mc.passes, "seed": mc.seed, "dropout_modules": mc.dropout_modules,
                                 "mean_sd": {label: float(np.mean(mc.patient_sd[:, j])) for j, label in enumerate(LABELS)}}
    if "window" not in levels:  # an ensemble's windows were counted by its first member; a patient model has no window level
        results["counts"]["window"] = int(np.sum(levels["recording"].n_windows))
    if heads is not None:
        results["heads"] = heads
    results["project"] = {"heart_macc": results["levels"]["recording"].get("heart", {}).get("macc"),
                          "note": "the project's own figures (levels, heart_macc = 2016 MAcc per recording), "
                                  "not the 2022 Challenge's; those are under 'challenge'"}

    out = _output_dir(trained, out_dir)
    names = {"metrics": "metrics.json", "patients": "patients.csv", "recordings": "recordings.csv",
             "report": "report.md"}
    if scores is not None:
        names["challenge_scores"] = "challenge_scores.csv"
    if mc is not None:
        names["mc_dropout"] = "mc_dropout.csv"
    results["files"] = {k: str(out / name) for k, name in names.items()}
    run_dir = None if ensemble else trained.run_dir
    metrics_log = RunDirectory(run_dir).metrics_log.path if run_dir is not None else None
    try:  # the whole report is written aside and swapped in: a failure leaves the previous report whole
        with atomic_directory(out, replace=True) as staging:
            staging.mkdir()
            if scores is not None:
                write_scores_csv(scores, staging / names["challenge_scores"])
            write_patients_csv(levels["patient"], thresholds, staging / names["patients"])
            write_recordings_csv(levels["recording"], thresholds, staging / names["recordings"])
            if mc is not None:
                write_mc_csv(mc, staging / names["mc_dropout"])
            written = write_report(staging, results, levels, metrics_log, figures=figures)
            if figures and heads is not None and "segmentation" in heads:
                written.append(plot_heart_cycle(trained.model, run.dataset, staging / "figures" / "heart_cycle.png"))
            results["files"]["figures"] = [str(out / Path(p).relative_to(staging)) for p in written]
            write_json(staging / names["metrics"], results)
    except (OSError, DataError) as e:  # a writer names its file in the staging folder: name the real one
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).replace(str(staging), str(out))
        raise DataError(f"{out}: cannot write the report ({reason}); any previous report there is unchanged") from None
    return results


def _output_dir(trained, out_dir: str | Path | None, check_only: bool = False) -> Path:
    """Where the report goes; ``check_only`` tells before any work whether there is a default place."""
    if out_dir is not None:
        out = Path(out_dir)
    elif isinstance(trained, Ensemble):
        if trained.source.is_dir():
            out = trained.source / "evaluation"
        elif is_ensemble(trained.source):  # an export_ensemble file
            out = trained.source.parent / f"{trained.source.stem}_report"
        else:
            raise ConfigError("a list of models has no report folder of its own; give out_dir (--output-dir)")
    elif trained.run_dir is not None:
        out = RunDirectory(trained.run_dir).report
    else:
        out = trained.source.parent / f"{trained.source.stem}_report"
    if check_only:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the report folder ({e.strerror or e})") from None
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    return out
