"""From window probabilities to recording and patient predictions, and the thresholds that cut them.

The evaluator sees windows, but the field scores recordings (PhysioNet 2016) and patients (CirCor 2022).
This module (1) aggregates windows -> recordings -> patients with the labels each level really has
(`recording_predictions`, `patient_predictions`; a patient's own labels are `data.splits.patient_labels`),
and (2) turns probabilities into decisions: per-label thresholds tuned on validation (`tune_thresholds`)
and the Present/Unknown/Absent band of the 2022 murmur task (`unknown_band`). It needs no Ignite: the
evaluator's `training.metrics.PredictionCollector` gathers the windows, and `training.decisions` tunes
after each validation.

A level's predictions are a `LevelPredictions`: one row per item, ``probs``/``targets``/``mask`` of shape
``[n, 2]`` in `LABELS` order, ``mask`` False where a label is missing (it then counts nowhere).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ignite_trainer.core.vocabulary import AGGREGATIONS, LABELS, OBJECTIVES
from ignite_trainer.data.records import Recording
from ignite_trainer.data.splits import patient_labels
from ignite_trainer.scoring.scores import binary_stats, probs_to_murmur_class, tune_threshold

__all__ = [
    "WindowPredictions", "LevelPredictions", "aggregate", "window_level",
    "recording_predictions", "patient_predictions", "tune_thresholds", "unknown_band",
    "murmur_classes", "scores_at_thresholds", "DEFAULT_THRESHOLDS",
]

log = logging.getLogger("ignite_trainer")

Aggregation = Literal[AGGREGATIONS]
Objective = Literal[OBJECTIVES]
DEFAULT_THRESHOLDS: dict[str, float] = {label: 0.5 for label in LABELS}


def _choices(names: Sequence[str]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


# ---------------------------------------------------------------------------------------------- containers
@dataclass(frozen=True)
class WindowPredictions:
    """Every evaluated window once, sorted by its dataset index: probabilities, targets, label mask."""

    probs: np.ndarray  # [N, 2] float64, sigmoid of the logits
    targets: np.ndarray  # [N, 2] float64
    mask: np.ndarray  # [N, 2] bool
    index: np.ndarray  # [N] int64, ascending

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class LevelPredictions:
    """One level (windows, recordings or patients): ids, probabilities, labels and label mask per item.

    ``patient_ids`` names each item's patient; ``murmur_classes`` is the true CirCor class per item
    (``"Present"``/``"Unknown"``/``"Absent"``, None where the format has none); ``n_windows`` how many
    windows went into each item.
    """

    level: str
    ids: list[str]
    probs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    patient_ids: list[str]
    murmur_classes: list[str | None]
    n_windows: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(y_true, prob)`` of label ``name`` over the items where it is present."""
        i = LABELS.index(name)
        keep = self.mask[:, i]
        return self.targets[keep, i].astype(np.int64), self.probs[keep, i]


# ---------------------------------------------------------------------------------------------- aggregating
def aggregate(values: np.ndarray, groups: Sequence[Hashable],
              how: Aggregation = "mean") -> tuple[list[Hashable], np.ndarray]:
    """Reduce the rows of ``values`` that share a group key; groups in order of first appearance.

    ``"mean"`` averages probabilities. ``"any"`` takes the maximum: a group is positive at threshold t
    exactly when *any* member is (``max >= t``), and unlike a 0/1 vote the maximum still ranks groups,
    so AUROC/AUPRC and threshold tuning keep working. That is why no threshold is needed here.

    Example:

        >>> keys, out = aggregate(np.array([[0.2], [0.6], [0.9]]), ["a", "a", "b"], "any")
        >>> keys, out.ravel().tolist()
        (['a', 'b'], [0.6, 0.9])
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be {_choices(AGGREGATIONS)}, got {how!r}")
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] != len(groups):
        raise ValueError(f"values has {values.shape[0]} rows but groups has {len(groups)} keys")
    keys: list[Hashable] = list(dict.fromkeys(groups))
    position = {k: i for i, k in enumerate(keys)}
    codes = np.fromiter((position[g] for g in groups), dtype=np.int64, count=len(groups))
    out = np.zeros((len(keys),) + values.shape[1:], dtype=np.float64)
    if how == "mean":
        np.add.at(out, codes, values)
        out /= np.bincount(codes, minlength=len(keys)).reshape((-1,) + (1,) * (values.ndim - 1))
    else:
        out[:] = -np.inf
        np.maximum.at(out, codes, values)
    return keys, out


def window_level(windows: WindowPredictions, window_recording: Sequence[int],
                 recordings: Sequence[Recording]) -> LevelPredictions:
    """The windows themselves as a level (targets are their recording's labels), ids ``<recording>#<k>``."""
    rec_of = np.asarray(window_recording, dtype=np.int64)[windows.index]
    seen: dict[int, int] = {}
    ids = []
    for r in rec_of.tolist():
        ids.append(f"{recordings[r].recording_id}#{seen.get(r, 0)}")
        seen[r] = seen.get(r, 0) + 1
    return LevelPredictions("window", ids, windows.probs, windows.targets, windows.mask,
                            [recordings[r].patient_id for r in rec_of.tolist()],
                            [recordings[r].murmur_class for r in rec_of.tolist()], np.ones(len(ids), dtype=np.int64))


def recording_predictions(windows: WindowPredictions, window_recording: Sequence[int],
                          recordings: Sequence[Recording], how: Aggregation = "mean") -> LevelPredictions:
    """Windows -> recordings (mean of window probabilities by default), labels from each `Recording`.

    ``window_recording[i]`` is the recording index of window ``i`` (`EvalWindows.window_recording`).

    Example::

        recs = recording_predictions(windows, dataset.window_recording, dataset.recordings)
    """
    rec_of = np.asarray(window_recording, dtype=np.int64)[windows.index]
    keys, probs = aggregate(windows.probs, rec_of.tolist(), how)
    missing = sorted(set(range(len(recordings))) - set(keys))
    if missing:
        raise ValueError(f"{len(missing)} recording(s) have no window, e.g. {recordings[missing[0]].recording_id}")
    order = np.argsort(np.asarray(keys, dtype=np.int64))
    probs = probs[order]
    n_windows = np.bincount(rec_of, minlength=len(recordings))
    return LevelPredictions(
        level="recording",
        ids=[r.recording_id for r in recordings],
        probs=probs,
        targets=np.array([[v if m else 0.0 for v, m in zip(r.labels, r.mask)] for r in recordings],
                         dtype=np.float64).reshape(-1, 2),
        mask=np.array([list(r.mask) for r in recordings], dtype=bool).reshape(-1, 2),
        patient_ids=[r.patient_id for r in recordings],
        murmur_classes=[r.murmur_class for r in recordings],
        n_windows=n_windows,
    )


def patient_predictions(recs: LevelPredictions, recordings: Sequence[Recording],
                        how: Aggregation = "mean") -> LevelPredictions:
    """Recordings -> patients: mean recording probability, or ``"any"`` recording positive (the maximum).

    ``recordings`` are the `Recording` objects behind ``recs`` (same order); patient labels come from
    `patient_labels`, not from the recordings' own (location-level) murmur labels.

    Example::

        patients = patient_predictions(recs, dataset.recordings, how="any")
    """
    if len(recordings) != len(recs):
        raise ValueError(f"{len(recordings)} recordings for {len(recs)} recording predictions")
    keys, probs = aggregate(recs.probs, recs.patient_ids, how)
    by_patient: dict[str, list[Recording]] = {}
    for r in recordings:
        by_patient.setdefault(r.patient_id, []).append(r)
    labels = [patient_labels(by_patient[str(k)]) for k in keys]
    position = {k: i for i, k in enumerate(keys)}
    n_windows = np.bincount([position[p] for p in recs.patient_ids], weights=recs.n_windows, minlength=len(keys))
    return LevelPredictions(
        level="patient",
        ids=[str(k) for k in keys],
        probs=probs,
        targets=np.array([lab[0] for lab in labels], dtype=np.float64).reshape(-1, 2),
        mask=np.array([lab[1] for lab in labels], dtype=bool).reshape(-1, 2),
        patient_ids=[str(k) for k in keys],
        murmur_classes=[lab[2] for lab in labels],
        n_windows=n_windows.astype(np.int64),
    )


# ---------------------------------------------------------------------------------------------- decisions
def tune_thresholds(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                    objective: Objective = "f1") -> dict[str, float]:
    """Per-label decision thresholds that maximise ``objective`` on these (validation) predictions.

    Call it with *recording*-level predictions of the validation split. Windows are the wrong scale: a
    recording's prediction is a mean over windows, which pulls probabilities towards the middle, so a
    window-optimal cut is not a recording-optimal one. Patients are the scored level but far fewer (a 20 %
    split of CirCor holds ~190 patients and ~630 recordings), so a threshold tuned on them is noisier;
    recording means live on the same scale as patient means (a mean of means), so the recording-level cut
    carries over. ``"f1"`` maximises F1, ``"challenge"`` the 2022 5:1 weighted accuracy (both through
    `scores.tune_threshold`); ``"fixed"`` keeps 0.5. A label with no present example keeps 0.5.

    Example:

        >>> tune_thresholds(np.array([[0.1, 0.5], [0.3, 0.5]]), np.array([[0, 0], [1, 0]]),
        ...                 np.array([[True, False], [True, False]]))
        {'heart': 0.2, 'murmur': 0.5}
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be {_choices(OBJECTIVES)}, got {objective!r}")
    probs, targets, mask = np.asarray(probs, dtype=np.float64), np.asarray(targets), np.asarray(mask, dtype=bool)
    thresholds = dict(DEFAULT_THRESHOLDS)
    if objective == "fixed":
        return thresholds
    for i, label in enumerate(LABELS):
        keep = mask[:, i]
        if keep.any():
            thresholds[label], _ = tune_threshold(targets[keep, i].astype(np.int64), probs[keep, i], objective)
    return thresholds


def scores_at_thresholds(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                         thresholds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per-label confusion counts and ratios (`scores.binary_stats`) at the given thresholds, over present items.

    This is what the tuned thresholds achieve on the data they were tuned on: the numbers a run's summary
    reports for its best epoch. A label with no present item is left out (there is nothing to score).

    Example:

        >>> s = scores_at_thresholds(np.array([[0.9, 0.5]]), np.array([[1, 0]]), np.array([[True, False]]),
        ...                          {"heart": 0.5, "murmur": 0.5})
        >>> list(s), s["heart"]["f1"]
        (['heart'], 1.0)
    """
    probs, targets, mask = np.asarray(probs, dtype=np.float64), np.asarray(targets), np.asarray(mask, dtype=bool)
    out: dict[str, dict[str, Any]] = {}
    for i, label in enumerate(LABELS):
        keep = mask[:, i]
        if keep.any():
            out[label] = binary_stats(targets[keep, i].astype(np.int64), probs[keep, i] >= thresholds[label])
    return out


def unknown_band(threshold: float, margin: float) -> tuple[float, float]:
    """``[low, high)`` of murmur probabilities called "Unknown": ``threshold ± margin``, clipped to [0, 1].

    With ``margin=0`` the band is empty and the three-class call agrees with the binary prediction.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return max(0.0, threshold - margin), min(1.0, threshold + margin)


def murmur_classes(probs: np.ndarray, threshold: float, margin: float) -> list[str]:
    """Present/Unknown/Absent per murmur probability, through `unknown_band` and `scores.probs_to_murmur_class`."""
    low, high = unknown_band(threshold, margin)
    return probs_to_murmur_class(np.asarray(probs, dtype=np.float64).reshape(-1), low, high)
