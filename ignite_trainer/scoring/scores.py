"""The scores the heart-sound field reports, as plain numpy functions (no Ignite, no torch).

Evaluation and reports compute results that must compare with published ones (PhysioNet/CinC
2016 and 2022), so every formula lives here, once. A per-label ratio whose denominator is zero, and an
AUROC/AUPRC of single-class input, does not exist: it is None (``n/a`` in text, ``null`` in JSON), never
NaN and never a 0.0 that would read as a bad model and drag averages down. Never a warning, never a crash.
Predictions are positive when ``prob >= threshold``, the same rule as `metrics.PerLabelMetrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score

from ignite_trainer.core.vocabulary import CLASS_WEIGHTS, OUTCOME_CLASSES

__all__ = [
    "stats_from_counts",
    "binary_stats",
    "macc",
    "binary_weighted_accuracy",
    "auroc",
    "auprc",
    "tune_threshold",
    "probs_to_murmur_class",
]



def _ratio(num: float, den: float) -> float:
    """A Challenge score's ratio: the official code scores an empty denominator as 0 (``float('nan')`` nowhere)."""
    return float(num) / float(den) if den else 0.0


def _defined_ratio(num: float, den: float) -> float | None:
    """A per-label ratio: None (undefined) when the denominator is zero."""
    return float(num) / float(den) if den else None


def stats_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | None]:
    """Per-label ratios from confusion counts; shared by `binary_stats` and the Ignite metric.

    Returns accuracy, precision, recall, sensitivity (= recall), specificity and F1. F1 is
    ``2·TP / (2·TP + FP + FN)``, which equals the harmonic mean of precision and recall and stays
    defined when one of them is zero. A ratio with a zero denominator is None: recall without any
    positive, precision without any positive prediction, F1 with neither.

    Example:

        >>> stats_from_counts(tp=0, fp=0, fn=0, tn=5)["recall"] is None
        True
    """
    recall = _defined_ratio(tp, tp + fn)
    return {
        "accuracy": _defined_ratio(tp + tn, tp + fp + fn + tn),
        "precision": _defined_ratio(tp, tp + fp),
        "recall": recall,
        "sensitivity": recall,
        "specificity": _defined_ratio(tn, tn + fp),
        "f1": _defined_ratio(2 * tp, 2 * tp + fp + fn),
    }


def _binary(values: ArrayLike, name: str) -> np.ndarray:
    """1-D boolean array from 0/1 (or bool) input; anything else is a caller's bug, so it raises."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1")
    return arr.astype(bool)


def _probabilities(values: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{names} differ in length: {a.shape[0]} vs {b.shape[0]}")


def _counts(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[int, int, int, int]:
    t, p = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    _same_length(t, p, "y_true and y_pred")
    tp = int(np.sum(t & p))
    fp = int(np.sum(~t & p))
    fn = int(np.sum(t & ~p))
    tn = int(np.sum(~t & ~p))
    return tp, fp, fn, tn


def binary_stats(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float | None]:
    """Confusion counts (``tp``, ``fp``, ``fn``, ``tn``, as ints) and the ratios of `stats_from_counts`.

    Example:

        >>> s = binary_stats([1, 1, 0, 0], [1, 0, 0, 0])
        >>> (s["tp"], s["fn"], s["precision"], s["recall"], s["specificity"])
        (1, 1, 1.0, 0.5, 1.0)
    """
    tp, fp, fn, tn = _counts(y_true, y_pred)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, **stats_from_counts(tp, fp, fn, tn)}


def macc(se: float, sp: float) -> float:
    """PhysioNet/CinC 2016 score on the heart label: the mean of sensitivity and specificity."""
    return (float(se) + float(sp)) / 2.0


def binary_weighted_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Two-class form of the 2022 weighted accuracy: ``(5·TP + TN) / (5·(TP+FN) + (FP+TN))``."""
    tp, fp, fn, tn = _counts(y_true, y_pred)
    positive, negative = CLASS_WEIGHTS[OUTCOME_CLASSES]
    return _ratio(positive * tp + negative * tn, positive * (tp + fn) + negative * (fp + tn))


def _single_class(t: np.ndarray) -> bool:
    return t.size == 0 or bool(t.all()) or not bool(t.any())


def auroc(y_true: ArrayLike, prob: ArrayLike) -> float | None:
    """Area under the ROC curve (scikit-learn).

    The AUROC is undefined when only one class is present (or the input is empty); this returns
    None then, instead of scikit-learn's error or NaN.
    """
    t, p = _binary(y_true, "y_true"), _probabilities(prob, "prob")
    _same_length(t, p, "y_true and prob")
    if _single_class(t):
        return None
    return float(roc_auc_score(t, p))


def auprc(y_true: ArrayLike, prob: ArrayLike) -> float | None:
    """Area under the precision-recall curve as scikit-learn's average precision.

    Like `auroc`, a single-class (or empty) input gives None, including all-positive input whose
    average precision would trivially be 1: with one class there is no ranking to measure.
    """
    t, p = _binary(y_true, "y_true"), _probabilities(prob, "prob")
    _same_length(t, p, "y_true and prob")
    if _single_class(t):
        return None
    return float(average_precision_score(t, p))


def _threshold_candidates(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique probabilities and the midpoints between neighbours, with a flag marking midpoints.

    The midpoint between the highest probability and 1 is included too (when there is room): it is
    the only cut that predicts nothing positive, which the 2022 score can prefer on negative-only data.
    """
    uniq = np.unique(prob)
    mids = (uniq[:-1] + uniq[1:]) / 2.0
    if uniq[-1] < 1.0:
        mids = np.append(mids, (uniq[-1] + 1.0) / 2.0)
    mids = mids[~np.isin(mids, uniq)]  # neighbours one ulp apart have no float strictly between
    values = np.concatenate([uniq, mids])
    is_mid = np.concatenate([np.zeros(uniq.size, dtype=bool), np.ones(mids.size, dtype=bool)])
    return values, is_mid


def tune_threshold(
    y_true: ArrayLike, prob: ArrayLike, objective: Literal["f1", "challenge"] = "f1"
) -> tuple[float, float]:
    """The decision threshold that maximises ``objective`` on this data, and the score it reaches.

    ``"f1"`` maximises F1; ``"challenge"`` maximises the binary weighted accuracy (the 2022 rule,
    which favours sensitivity 5:1). Candidates are the unique probabilities and the midpoints between
    neighbouring ones (and between the highest one and 1). A midpoint and the probability just above
    it split the data the same way, but the midpoint keeps a margin on both sides, so ties go to
    midpoints first, then to the threshold nearest 0.5. Probabilities must lie in [0, 1], so the
    result is a valid `metrics.PerLabelMetrics` threshold. Empty input gives ``(0.5, 0.0)``.

    Example:

        >>> tune_threshold([0, 0, 1, 1], [0.125, 0.25, 0.75, 0.875])
        (0.5, 1.0)
    """
    if objective not in ("f1", "challenge"):
        raise ValueError(f"objective must be 'f1' or 'challenge', got {objective!r}")
    t, p = _binary(y_true, "y_true"), _probabilities(prob, "prob")
    _same_length(t, p, "y_true and prob")
    if p.size == 0:
        return 0.5, 0.0
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("prob must lie in [0, 1]")

    candidates, is_mid = _threshold_candidates(p)
    order = np.argsort(p, kind="stable")
    sorted_p = p[order]
    # positives_before[i] = positives among the i lowest probabilities.
    positives_before = np.concatenate([[0], np.cumsum(t[order])])
    n_pos = int(t.sum())
    n_neg = p.size - n_pos
    first_positive = np.searchsorted(sorted_p, candidates, side="left")  # predictions prob >= candidate
    tp = n_pos - positives_before[first_positive]
    fp = (p.size - first_positive) - tp
    fn = n_pos - tp
    tn = n_neg - fp

    if objective == "f1":
        num, den = 2.0 * tp, 2.0 * tp + fp + fn
    else:
        num, den = 5.0 * tp + tn, np.full(candidates.shape, 5.0 * n_pos + n_neg)
    score = np.divide(num, den, out=np.zeros(candidates.shape), where=den > 0)

    # lexsort sorts by the last key first: best score, then midpoints, then nearest to 0.5.
    best = np.lexsort((np.abs(candidates - 0.5), ~is_mid, -score))[0]
    return float(candidates[best]), float(score[best])


@overload
def probs_to_murmur_class(prob: float, low: float, high: float) -> str: ...
@overload
def probs_to_murmur_class(prob: Sequence[float] | np.ndarray, low: float, high: float) -> list[str]: ...


def probs_to_murmur_class(prob: float | Sequence[float] | np.ndarray, low: float, high: float) -> str | list[str]:
    """Three-class murmur call from a murmur probability: Present ``>= high``, Absent ``< low``, else Unknown.

    The band ``[low, high)`` turns uncertain outputs into the Challenge's "Unknown" class, which
    costs less (weight 3) than a missed Present (weight 5). A scalar gives a string, an array a list.

    Example:

        >>> probs_to_murmur_class([0.9, 0.5, 0.1], low=0.3, high=0.7)
        ['Present', 'Unknown', 'Absent']
    """
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    arr = np.asarray(prob, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("prob must be finite")
    classes = np.where(arr >= high, "Present", np.where(arr < low, "Absent", "Unknown"))
    if arr.ndim == 0:
        return str(classes)
    return [str(c) for c in classes.reshape(-1)]
