"""Scores of the auxiliary heads, read the way a clinician reads them.

* **Murmur descriptors** are properties of a patient's murmur. A patient's descriptor probabilities are the mean
  of its recordings' (each the mean of its windows'), each recording weighted by its murmur probability, so the
  recordings where the model hears the murmur speak for it (as a clinician describes the murmur where it is
  loudest). They are scored on the patients the descriptor is known for (`annotations.describes_murmur`):
  balanced accuracy (the mean recall over the classes present, so a rare grade counts as much as a common one)
  and the confusion matrix. The same figures on recordings (those the descriptor describes) are given too.
* **Heart-cycle states** are scored per annotated frame: accuracy and each state's F1 from the confusion matrix.

Example::

    scores = attribute_scores(probs, window_recording, recordings, murmur_prob, "systolic_timing")
    print(scores["patient"]["balanced_accuracy"], scores["patient"]["confusion"])
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ignite_trainer.core.vocabulary import HEART_STATES, MURMUR_ATTRIBUTES
from ignite_trainer.data.annotations import MISSING, attribute_class
from ignite_trainer.data.records import Recording


def confusion(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``[true class, predicted class]`` counts."""
    pairs = np.asarray(truth, dtype=np.int64) * n_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_accuracy(matrix: np.ndarray) -> float | None:
    """Mean recall over the classes that occur (rows with a count); None if none does."""
    support = matrix.sum(axis=1)
    present = support > 0
    if not present.any():
        return None
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def f1_per_class(matrix: np.ndarray) -> list[float | None]:
    """Each class's F1 from a confusion matrix (None where the class is neither true nor predicted)."""
    tp = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)
    return [float(2 * t / d) if d > 0 else None for t, d in zip(tp, denominator)]


def recording_probabilities(window_probs: np.ndarray, window_recording: Sequence[int], n_recordings: int) -> np.ndarray:
    """``[recordings, classes]``: the mean of each recording's windows."""
    rows = np.asarray(window_recording, dtype=np.int64)
    sums = np.zeros((n_recordings, window_probs.shape[1]))
    np.add.at(sums, rows, window_probs)
    counts = np.bincount(rows, minlength=n_recordings)[:, None]
    return sums / np.maximum(counts, 1)


def patient_probabilities(recording_probs: np.ndarray, recordings: Sequence[Recording],
                          murmur_prob: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``(patient ids in first-seen order, [patients, classes])``: murmur-probability-weighted means of recordings."""
    patients = list(dict.fromkeys(r.patient_id for r in recordings))
    row = {p: i for i, p in enumerate(patients)}
    sums = np.zeros((len(patients), recording_probs.shape[1]))
    weights = np.zeros(len(patients))
    w = np.clip(np.asarray(murmur_prob, dtype=np.float64), 1e-6, None)  # a patient heard nowhere: a plain mean
    for k, rec in enumerate(recordings):
        sums[row[rec.patient_id]] += w[k] * recording_probs[k]
        weights[row[rec.patient_id]] += w[k]
    return patients, sums / weights[:, None]


def _level(truth: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    known = truth != MISSING
    matrix = confusion(truth[known], probs[known].argmax(axis=1), len(classes))
    return {"balanced_accuracy": balanced_accuracy(matrix), "support": int(known.sum()),
            "classes": list(classes), "confusion": matrix.tolist()}


def attribute_scores(window_probs: np.ndarray, window_recording: Sequence[int], recordings: Sequence[Recording],
                     murmur_prob: np.ndarray, head: str) -> dict[str, Any]:
    """Balanced accuracy and confusion of descriptor ``head`` on recordings and patients (module docstring)."""
    classes = MURMUR_ATTRIBUTES[head][1]
    rec_probs = recording_probabilities(window_probs, window_recording, len(recordings))
    rec_truth = np.array([attribute_class(r, head) for r in recordings], dtype=np.int64)
    patients, pat_probs = patient_probabilities(rec_probs, recordings, murmur_prob)
    pat_truth = np.full(len(patients), MISSING, dtype=np.int64)
    row = {p: i for i, p in enumerate(patients)}
    for rec, t in zip(recordings, rec_truth):
        if t != MISSING:
            pat_truth[row[rec.patient_id]] = t
    return {"recording": _level(rec_truth, rec_probs, classes), "patient": _level(pat_truth, pat_probs, classes)}


def segmentation_scores(matrix: np.ndarray) -> dict[str, Any]:
    """Frame accuracy and per-state F1 from the ``[true, predicted]`` state confusion over annotated frames."""
    total = int(matrix.sum())
    f1 = f1_per_class(matrix)
    defined = [v for v in f1 if v is not None]
    return {"frame_accuracy": float(np.trace(matrix) / total) if total else None, "frames": total,
            "f1": dict(zip(HEART_STATES, f1)), "macro_f1": float(np.mean(defined)) if defined else None,
            "confusion": matrix.tolist(), "states": list(HEART_STATES)}
