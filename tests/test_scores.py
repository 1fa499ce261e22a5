"""Challenge scores and per-label statistics, checked on worked examples computed by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from ignite_trainer.scoring.scores import (
    auprc,
    auroc,
    binary_stats,
    binary_weighted_accuracy,
    macc,
    probs_to_murmur_class,
    stats_from_counts,
    tune_threshold,
)


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    # "no warnings spilled": any warning from numpy or scikit-learn fails the test.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------- per-label statistics
def test_binary_stats_worked_example() -> None:
    # y_true 1 1 1 0 0 0 0 0 / y_pred 1 1 0 1 0 0 0 0 -> TP 2, FN 1, FP 1, TN 4
    s = binary_stats([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0])
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (2, 1, 1, 4)
    assert s["accuracy"] == pytest.approx(6 / 8)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == s["sensitivity"] == pytest.approx(2 / 3)
    assert s["specificity"] == pytest.approx(4 / 5)
    assert s["f1"] == pytest.approx(2 / 3)  # 2·2 / (2·2 + 1 + 1)


def test_binary_stats_matches_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        t, p = rng.integers(0, 2, n), rng.integers(0, 2, n)
        s = binary_stats(t, p)
        prec, rec, f1, _ = precision_recall_fscore_support(t, p, average="binary", zero_division=np.nan)
        tn, fp, fn, tp = confusion_matrix(t, p, labels=[0, 1]).ravel()
        assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (tp, fp, fn, tn)
        for ours, theirs in ((s["precision"], prec), (s["recall"], rec), (s["f1"], f1)):
            # scikit-learn's undefined (zero_division=nan) is our None
            assert ours is None if np.isnan(theirs) else ours == pytest.approx(theirs)


def test_binary_stats_edge_cases_are_none_not_zero_or_nan() -> None:
    empty = binary_stats([], [])
    assert (empty["tp"], empty["fp"], empty["fn"], empty["tn"]) == (0, 0, 0, 0)
    assert all(empty[k] is None for k in ("accuracy", "precision", "recall", "specificity", "f1"))

    no_positives = binary_stats([0, 0, 0], [0, 0, 0])  # nothing to find, nothing predicted
    assert no_positives["accuracy"] == 1.0 and no_positives["specificity"] == 1.0
    assert no_positives["precision"] is None and no_positives["recall"] is None and no_positives["f1"] is None

    false_alarm = binary_stats([0, 0], [1, 0])  # no positives, one predicted: precision and F1 exist (0)
    assert false_alarm["precision"] == 0.0 and false_alarm["f1"] == 0.0 and false_alarm["recall"] is None

    all_positive = binary_stats([1, 1], [1, 1])
    assert all_positive["f1"] == 1.0 and all_positive["specificity"] is None  # no negatives: 0/0 is undefined

    none_predicted = binary_stats([1, 0], [0, 0])
    assert none_predicted["precision"] is None and none_predicted["recall"] == 0.0

    assert all(v is None for v in stats_from_counts(0, 0, 0, 0).values())


def test_binary_stats_rejects_non_binary_or_mismatched_input() -> None:
    with pytest.raises(ValueError):
        binary_stats([0, 2], [0, 1])
    with pytest.raises(ValueError):
        binary_stats([0, 1, 1], [0, 1])


def test_macc_is_mean_of_sensitivity_and_specificity() -> None:
    s = binary_stats([1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 1])  # Se 3/4, Sp 1/2
    assert macc(s["sensitivity"], s["specificity"]) == pytest.approx(0.625)
    assert macc(0.8, 0.6) == pytest.approx(0.7)


# ---------------------------------------------------------------- 2022 weighted accuracy
def test_binary_weighted_accuracy_worked_example() -> None:
    # TP 2, FN 1, FP 1, TN 3: (5·2 + 3) / (5·3 + 4) = 13/19
    assert binary_weighted_accuracy([1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0]) == pytest.approx(13 / 19)
    # all positives predicted, no negatives right: (5·2 + 0) / (5·2 + 2) = 10/12
    assert binary_weighted_accuracy([1, 1, 0, 0], [1, 1, 1, 1]) == pytest.approx(10 / 12)
    assert binary_weighted_accuracy([], []) == 0.0


# ---------------------------------------------------------------- ranking scores
def test_auroc_and_auprc_worked_example() -> None:
    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # of the 4 (positive, negative) pairs, only (0.35, 0.4) is misordered
    assert auroc(y, p) == pytest.approx(0.75)
    # ranked: 0.8 (+), 0.4 (−), 0.35 (+): AP = 0.5·1 + 0.5·(2/3)
    assert auprc(y, p) == pytest.approx(0.5 + 1 / 3)


@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1, 1], []])
def test_auroc_and_auprc_single_class_or_empty_are_none_without_warnings(y) -> None:
    p = [0.2, 0.5, 0.9][: len(y)]
    assert auroc(y, p) is None
    assert auprc(y, p) is None


def test_auroc_rejects_non_finite_probabilities() -> None:
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, float("nan")])


# ---------------------------------------------------------------- threshold tuning
def test_tune_threshold_f1_finds_the_best_cut() -> None:
    y = [0, 1, 0, 0, 1, 1]
    p = [0.1, 0.2, 0.3, 0.4, 0.6, 0.9]
    # F1 per cut: ≤0.1: 6/9, (0.1,0.2]: 6/8, (0.2,0.3]: 4/7, (0.3,0.4]: 4/6, (0.4,0.6]: 4/5, (0.6,0.9]: 2/4
    threshold, score = tune_threshold(y, p, "f1")
    assert score == pytest.approx(0.8)
    assert threshold == pytest.approx(0.5)  # midpoint of 0.4 and 0.6


def test_tune_threshold_challenge_favours_sensitivity() -> None:
    y = [0, 1, 0, 0, 1, 1]
    p = [0.1, 0.2, 0.3, 0.4, 0.6, 0.9]
    # (5·TP + TN) / 18 per cut: ≤0.1: 15, (0.1,0.2]: 16, (0.2,0.3]: 11, (0.3,0.4]: 12, (0.4,0.6]: 13, (0.6,0.9]: 8
    threshold, score = tune_threshold(y, p, "challenge")
    assert score == pytest.approx(16 / 18)
    assert threshold == pytest.approx(0.15)
    assert binary_weighted_accuracy(y, np.asarray(p) >= threshold) == pytest.approx(score)


def test_tune_threshold_prefers_a_midpoint_on_ties() -> None:
    # 0.5 and 0.8 split the data identically; the midpoint keeps a margin to both probabilities
    assert tune_threshold([0, 1], [0.2, 0.8]) == (0.5, 1.0)


def test_tune_threshold_can_predict_nothing_on_negative_only_data() -> None:
    threshold, score = tune_threshold([0, 0, 0], [0.2, 0.4, 0.6], "challenge")
    assert score == 1.0 and threshold > 0.6 and threshold <= 1.0


@pytest.mark.parametrize("objective", ["f1", "challenge"])
def test_tune_threshold_is_optimal_against_a_brute_force_scan(objective: str) -> None:
    rng = np.random.default_rng(1)
    score_fn = (lambda t, p: binary_stats(t, p)["f1"]) if objective == "f1" else binary_weighted_accuracy
    for _ in range(10):
        n = int(rng.integers(2, 30))
        y = rng.integers(0, 2, n)
        prob = np.round(rng.random(n), 2)  # rounding creates ties between probabilities
        threshold, score = tune_threshold(y, prob, objective)
        brute = max(score_fn(y, prob >= t) for t in np.linspace(0, 1, 1001))
        assert score == pytest.approx(brute)
        assert score_fn(y, prob >= threshold) == pytest.approx(score)


def test_tune_threshold_degenerate_inputs() -> None:
    assert tune_threshold([], []) == (0.5, 0.0)
    threshold, score = tune_threshold([0, 0], [0.3, 0.7], "f1")  # no positive: F1 is 0 everywhere
    assert score == 0.0 and 0.0 <= threshold <= 1.0
    with pytest.raises(ValueError):
        tune_threshold([0, 1], [0.2, 0.8], "auc")
    with pytest.raises(ValueError):
        tune_threshold([0, 1], [0.2, 1.5])


# ---------------------------------------------------------------- three-class murmur call
def test_probs_to_murmur_class_bands() -> None:
    assert probs_to_murmur_class([0.9, 0.7, 0.69, 0.3, 0.29, 0.0], low=0.3, high=0.7) == [
        "Present",
        "Present",  # >= high
        "Unknown",
        "Unknown",  # >= low
        "Absent",
        "Absent",
    ]
    assert probs_to_murmur_class(0.5, low=0.3, high=0.7) == "Unknown"
    assert probs_to_murmur_class([0.5, 0.49], low=0.5, high=0.5) == ["Present", "Absent"]  # no Unknown band
    assert probs_to_murmur_class([], 0.3, 0.7) == []
    with pytest.raises(ValueError):
        probs_to_murmur_class(0.5, low=0.7, high=0.3)
