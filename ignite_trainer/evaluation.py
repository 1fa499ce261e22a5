"""Score a trained model the way the field does: every window, then recordings, then patients.

`evaluate` reproduces the run's own validation split from the config stored with the model (same reader,
same feature cache, same `split_patients` arguments) or reads another labelled folder, runs the model over
every window, aggregates, and scores each level and label with the functions of `ignite_trainer.scores`
(accuracy, precision, recall = sensitivity, specificity, F1, AUROC, AUPRC; MAcc on the heart label) plus
the 2022 Challenge's patient scores: the murmur weighted accuracy and the outcome cost. Decisions use the
thresholds tuned on validation and stored with the model. It writes ``report/metrics.json``,
``report/patients.csv``, ``report/recordings.csv`` and ``report/report.md`` with figures (`report`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ignite_trainer.atomic import atomic_directory
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.datasets import split_patients
from ignite_trainer.data.discovery import detect_format, has_labels
from ignite_trainer.data.prepare import prepare_data
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.data.records import Recording
from ignite_trainer.errors import ConfigError, DataError
from ignite_trainer.inference import run_windows
from ignite_trainer.model_files import TrainedModel, load_trained_model
from ignite_trainer.predictions import LevelPredictions, murmur_classes, unknown_band
from ignite_trainer.report import write_report
from ignite_trainer.run_record import read_split
from ignite_trainer.rundir import RunDirectory
from ignite_trainer.scores import (
    auprc, auroc, binary_stats, binary_weighted_accuracy, macc, murmur_weighted_accuracy, outcome_cost,
)
from ignite_trainer.vocabulary import AGGREGATIONS, LABELS
from ignite_trainer.writers import PATIENT_COLUMNS, write_json, write_patients_csv, write_recordings_csv

__all__ = ["evaluate", "label_scores", "level_scores", "challenge_scores", "PATIENT_COLUMNS", "LEVELS"]

log = logging.getLogger("ignite_trainer")

LEVELS = ("window", "recording", "patient")


# ---------------------------------------------------------------------------------------------- scores
def label_scores(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Every per-label score at one decision threshold (``prob >= threshold`` is positive).

    Example:

        >>> s = label_scores(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.3, 0.1]), 0.5)
        >>> (s["tp"], s["fp"], s["precision"], s["recall"], s["auroc"])
        (1, 1, 0.5, 0.5, 0.75)
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    stats: dict[str, float | int] = dict(binary_stats(y_true, prob >= threshold))
    stats.update(auroc=auroc(y_true, prob), auprc=auprc(y_true, prob), support=int(y_true.size),
                 positives=int(y_true.sum()), threshold=float(threshold))
    return stats


def level_scores(level: LevelPredictions, thresholds: dict[str, float]) -> dict[str, dict[str, float | int]]:
    """`label_scores` per label over the items where the label is present; MAcc (2016) on the heart label."""
    result = {}
    for label in LABELS:
        y_true, prob = level.label(label)
        result[label] = label_scores(y_true, prob, thresholds[label])
    heart = result["heart"]
    heart["macc"] = macc(heart["sensitivity"], heart["specificity"])
    return result


def _true_murmur_class(patients: LevelPredictions, i: int) -> str | None:
    """The patient's true Present/Unknown/Absent, from CirCor's class or, lacking one, the binary label."""
    if patients.murmur_classes[i] is not None:
        return patients.murmur_classes[i]
    if not patients.mask[i, 1]:
        return None
    return "Present" if patients.targets[i, 1] > 0.5 else "Absent"


def challenge_scores(patients: LevelPredictions, thresholds: dict[str, float], unknown_margin: float) -> dict[str, Any]:
    """The 2022 patient scores: murmur weighted accuracy and outcome cost (None where no label allows them).

    When the truth holds "Unknown" patients, the binary murmur output is mapped to Present/Unknown/Absent
    through the band ``threshold ± unknown_margin`` and scored 5/3/1; otherwise the two-class form
    ``(5·TP + TN) / (5·(TP+FN) + FP + TN)`` is used. The outcome cost scores the heart label's binary
    decisions as referrals.
    """
    truth = [_true_murmur_class(patients, i) for i in range(len(patients))]
    keep = [i for i, t in enumerate(truth) if t is not None]
    low, high = unknown_band(thresholds["murmur"], unknown_margin)
    murmur: dict[str, Any] = {"murmur_weighted_accuracy": None, "murmur_scoring": None, "murmur_patients": len(keep),
                              "murmur_unknown_band": [low, high]}
    if keep:
        probs = patients.probs[keep, 1]
        if any(truth[i] == "Unknown" for i in keep):
            predicted = murmur_classes(probs, thresholds["murmur"], unknown_margin)
            murmur["murmur_weighted_accuracy"] = murmur_weighted_accuracy([truth[i] for i in keep], predicted)
            murmur["murmur_scoring"] = "three_class"
        else:
            y_true = np.array([truth[i] == "Present" for i in keep], dtype=np.int64)
            murmur["murmur_weighted_accuracy"] = binary_weighted_accuracy(y_true, probs >= thresholds["murmur"])
            murmur["murmur_scoring"] = "binary"
    y_heart, p_heart = patients.label("heart")
    cost = outcome_cost(y_heart, p_heart >= thresholds["heart"]) if y_heart.size else None
    return {**murmur, "outcome_cost": cost, "outcome_patients": int(y_heart.size)}


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
        _, recordings = split_patients(recordings, config.val_fraction, config.seed,
                                       n_folds=config.n_folds, fold=config.fold)
    return recordings, str(root), fmt, new_patients


# ---------------------------------------------------------------------------------------------- entry
def evaluate(path: str | Path, data: str | Path | None = None, fmt: str | None = None,
             split: Literal["val", "all"] | None = None, aggregation: Literal["mean", "any"] | None = None,
             unknown_margin: float = 0.1, out_dir: str | Path | None = None, device: str = "cpu",
             figures: bool = True) -> dict[str, Any]:
    """Evaluate a run directory, checkpoint or safetensors export; returns what ``metrics.json`` holds.

    Without ``data`` the run's own validation split is scored (``split="all"``: train and validation);
    with ``data`` every recording of that labelled folder is (``split="val"``: its validation split by the
    run's split settings). ``aggregation`` (recordings -> patients) defaults to the run's. Output goes to
    ``<run>/report/`` (or ``<checkpoint stem>_report/`` beside a file outside a run, or ``out_dir``).

    Example::

        result = evaluate("runs/quick")
        print(result["levels"]["patient"]["murmur"]["f1"], result["challenge"]["outcome_cost"])
    """
    if split not in (None, "val", "all"):
        raise ConfigError(f"split={split!r} is not one of: val, all")
    if aggregation is not None and aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation={aggregation!r} is not one of: {', '.join(AGGREGATIONS)}")
    if not (isinstance(unknown_margin, (int, float)) and 0.0 <= unknown_margin <= 0.5):
        raise ConfigError(f"unknown_margin={unknown_margin!r} must be a number in [0, 0.5]")
    trained = load_trained_model(path)
    split = split or ("val" if data is None else "all")
    how = aggregation or trained.config.aggregation
    recordings, source, data_format, new_patients = _select_recordings(trained, data, fmt, split)
    if not recordings:
        raise DataError(f"{source}: no recordings to evaluate in the {split!r} split")

    run = run_windows(trained, recordings, device=device)
    levels = dict(zip(LEVELS, run.levels(how)))
    thresholds = trained.thresholds
    results: dict[str, Any] = {
        "model": str(trained.source),
        "epoch": trained.epoch,
        "data": source,
        "format": data_format,
        "split": split,
        "aggregation": how,
        "thresholds": dict(thresholds),
        "thresholds_tuned": trained.thresholds_tuned,
        "threshold_objective": trained.config.threshold_objective if trained.thresholds_tuned else "fixed",
        "unknown_margin": float(unknown_margin),
        "counts": {name: len(level) for name, level in levels.items()},
        "levels": {name: level_scores(level, thresholds) for name, level in levels.items()},
        "challenge": {"heart_macc": None, **challenge_scores(levels["patient"], thresholds, unknown_margin)},
        "new_patients": new_patients,
        "warnings": ([f"{len(new_patients)} patient(s) added to {source} after training are in neither side of "
                      f"the run's split and were not scored as validation: {', '.join(new_patients)}"]
                     if new_patients else []) + list(run.warnings),
    }
    results["challenge"]["heart_macc"] = results["levels"]["recording"]["heart"]["macc"]

    out = _output_dir(trained, out_dir)
    names = {"metrics": "metrics.json", "patients": "patients.csv", "recordings": "recordings.csv",
             "report": "report.md"}
    results["files"] = {k: str(out / name) for k, name in names.items()}
    metrics_log = RunDirectory(trained.run_dir).metrics_log.path if trained.run_dir is not None else None
    try:  # the whole report is written aside and swapped in: a failure leaves the previous report whole
        with atomic_directory(out, replace=True) as staging:
            staging.mkdir()
            write_patients_csv(levels["patient"], thresholds, staging / names["patients"])
            write_recordings_csv(levels["recording"], thresholds, staging / names["recordings"])
            written = write_report(staging, results, levels, metrics_log, figures=figures)
            results["files"]["figures"] = [str(out / Path(p).relative_to(staging)) for p in written]
            write_json(staging / names["metrics"], results)
    except (OSError, DataError) as e:  # a writer names its file in the staging folder: name the real one
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).replace(str(staging), str(out))
        raise DataError(f"{out}: cannot write the report ({reason}); any previous report there is unchanged") from None
    return results


def _output_dir(trained: TrainedModel, out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        out = Path(out_dir)
    elif trained.run_dir is not None:
        out = trained.run_dir / "report"
    else:
        out = trained.source.parent / f"{trained.source.stem}_report"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the report folder ({e.strerror or e})") from None
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    return out
