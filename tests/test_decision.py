"""The Challenge decision layer: planted optima are found, probabilities are real, fits are deterministic,
degenerate validation sets fall back, and the layer survives checkpoints and safetensors metadata."""

import math

import numpy as np
import pytest
import safetensors.torch
import torch

from ignite_trainer.scoring.challenge import MURMUR_CLASSES, challenge_scores
from ignite_trainer.scoring.decision import (
    DecisionLayer,
    MurmurBand,
    MurmurLogistic,
    OutcomeThreshold,
    PatientFeatures,
    patient_features,
)
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.scoring.predictions import LevelPredictions, murmur_classes

WEIGHTS = np.array([5.0, 3.0, 1.0])


def weighted_accuracy(truth, calls):
    """Written out here from the Challenge's definition, independent of the module under test."""
    w = {"Present": 5, "Unknown": 3, "Absent": 1}
    return sum(w[t] for t, c in zip(truth, calls) if t == c) / sum(w[t] for t in truth)


def logit(p):
    return math.log(p / (1 - p))


def clip(p):
    return min(max(p, 1e-6), 1 - 1e-6)


# A planted three-class model on the features (bias, murmur logit, spread, heart logit); Absent scores 0.
PLANTED = np.array([[-1.0, 2.0, 0.0, 0.0],   # Present
                    [-2.0, 0.0, 1.0, 0.0]])  # Unknown: likelier when recordings disagree


def planted_patients(n, seed):
    rng = np.random.default_rng(seed)
    murmur = rng.uniform(0.02, 0.98, n)
    spread = rng.uniform(0.0, 0.6, n)
    heart = rng.uniform(0.05, 0.95, n)
    feats = [PatientFeatures(float(m), float(h), float(min(1.0, m + s / 2)), float(max(0.0, m - s / 2)))
             for m, h, s in zip(murmur, heart, spread)]
    x = np.column_stack([np.ones(n), [logit(m) for m in murmur],
                         [logit(clip(f.murmur_max)) - logit(clip(f.murmur_min)) for f in feats],
                         [logit(h) for h in heart]])
    scores = np.column_stack([x @ PLANTED.T, np.zeros(n)])
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    truth = [MURMUR_CLASSES[rng.choice(3, p=row)] for row in p]
    return feats, truth, p


def test_logistic_recovers_a_planted_model_and_its_bayes_decision():
    feats, truth, _ = planted_patients(3000, seed=0)
    fitted = MurmurLogistic.fit(feats, truth)
    coef = np.array([fitted.present, fitted.unknown])
    assert np.abs(coef - PLANTED).max() < 0.35
    test_feats, test_truth, true_p = planted_patients(3000, seed=1)
    oracle = [MURMUR_CLASSES[j] for j in np.argmax(true_p * WEIGHTS, axis=1)]
    calls = fitted.decide(test_feats)
    assert np.mean([a == b for a, b in zip(calls, oracle)]) > 0.95
    assert weighted_accuracy(test_truth, calls) == pytest.approx(weighted_accuracy(test_truth, oracle), abs=0.01)
    # ... and beats the band that ignores the spread, tuned on the same patients.
    band = MurmurBand.fit(feats[:500], truth[:500])
    assert weighted_accuracy(test_truth, calls) > weighted_accuracy(test_truth, band.decide(test_feats))


def test_logistic_probabilities_are_real_and_sum_to_one():
    feats, truth, _ = planted_patients(200, seed=2)
    probs = MurmurLogistic.fit(feats, truth).probabilities(feats)
    assert probs.shape == (200, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (probs > 0).all()
    assert probs[:, 1].std() > 0.05  # Unknown has a probability of its own, not a constant
    assert set(MurmurLogistic.fit(feats, truth).decide(feats)) == set(MURMUR_CLASSES)


def test_fit_is_deterministic():
    feats, truth, _ = planted_patients(120, seed=3)
    outcome = ["Abnormal" if f.heart_prob > 0.6 else "Normal" for f in feats]
    a = DecisionLayer.fit(feats, truth, outcome).to_dict()
    b = DecisionLayer.fit(list(feats), list(truth), list(outcome)).to_dict()
    assert a == b


def test_band_fit_finds_a_planted_band():
    p = [0.05, 0.1, 0.2, 0.28, 0.42, 0.5, 0.55, 0.72, 0.8, 0.95]
    truth = ["Absent"] * 4 + ["Unknown"] * 3 + ["Present"] * 3
    band = MurmurBand.fit([PatientFeatures.single(x, 0.5) for x in p], truth)
    assert 0.28 < band.low < 0.42 and 0.55 < band.high < 0.72
    assert band.low == pytest.approx(0.35) and band.high == pytest.approx(0.635)


def test_fixed_band_is_the_earlier_rule():
    p = np.random.default_rng(4).random(50)
    feats = [PatientFeatures.single(float(x), 0.5) for x in p]
    assert MurmurBand.fixed(0.45, 0.1).decide(feats) == murmur_classes(p, 0.45, 0.1)
    np.testing.assert_array_equal(MurmurBand.fixed(0.45, 0.1).probabilities(feats)[:, 1], 0.0)


def brute_force_cost(q, abnormal, t):
    """Official cost per patient of referring ``q >= t``, written out from the definition."""
    referred = q >= t
    n = q.size
    tp, fp, fn = np.sum(referred & abnormal), np.sum(referred & ~abnormal), np.sum(~referred & abnormal)
    r = (tp + fp) / n
    return (10 * n + (25 + 397 * r - 1718 * r**2 + 11296 * r**4) * n + 10000 * tp + 50000 * fn) / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outcome_threshold_reaches_the_lowest_cost(seed):
    rng = np.random.default_rng(seed)
    n = 80
    abnormal = rng.random(n) < 0.4
    q = np.clip(np.where(abnormal, rng.normal(0.6, 0.2, n), rng.normal(0.4, 0.2, n)), 0, 1)
    feats = [PatientFeatures.single(0.5, float(v)) for v in q]
    fitted = OutcomeThreshold.fit(feats, ["Abnormal" if a else "Normal" for a in abnormal])
    grid_best = min(brute_force_cost(q, abnormal, t) for t in np.linspace(-0.001, 1.001, 4001))
    assert brute_force_cost(q, abnormal, fitted.threshold) == pytest.approx(grid_best, rel=1e-12)


def test_outcome_threshold_planted_gap_and_tie_break():
    q = [0.1, 0.2, 0.25, 0.4, 0.45, 0.9]
    truth = ["Normal"] * 3 + ["Abnormal"] * 3
    feats = [PatientFeatures.single(0.5, v) for v in q]
    assert OutcomeThreshold.fit(feats, truth).threshold == pytest.approx(0.325)
    # Missing an Abnormal patient costs 50000, so the cut goes below it even at the price of false referrals.
    truth2 = ["Normal", "Abnormal", "Normal", "Normal", "Normal", "Normal"]
    assert OutcomeThreshold.fit(feats, truth2).threshold == pytest.approx(0.15)


def test_degenerate_validation_sets_fall_back_and_never_raise():
    prior = MurmurLogistic.prior()
    one = [PatientFeatures.single(0.3, 0.4)]
    # A single class: the prior calibration; the outcome keeps 0.5.
    assert MurmurLogistic.fit(one * 5, ["Absent"] * 5) == prior
    assert OutcomeThreshold.fit(one * 5, ["Normal"] * 5).threshold == 0.5
    assert MurmurBand.fit(one * 5, ["Absent"] * 5) == MurmurBand.fixed(0.5, 0.1)
    # No patients at all, or no true class at all.
    layer = DecisionLayer.fit([], [], [])
    assert layer.murmur == prior and layer.outcome.threshold == 0.5
    assert DecisionLayer.fit(one, [None], [None]).murmur == prior
    # Two patients: a fit close to the prior, valid probabilities.
    two = [PatientFeatures.single(0.8, 0.7), PatientFeatures.single(0.2, 0.3)]
    layer = DecisionLayer.fit(two, ["Present", "Absent"], ["Abnormal", "Normal"])
    labels, probs = layer.outputs(two)
    assert labels.tolist() == [[1, 0, 0, 1, 0], [0, 0, 1, 0, 1]]
    np.testing.assert_allclose(probs[:, :3].sum(axis=1), 1.0)
    assert 0.2 < layer.outcome.threshold < 0.7
    # No Unknown patient: Unknown stays possible but rare; calls follow the murmur probability.
    feats, truth, _ = planted_patients(200, seed=5)
    no_unknown = [(f, t) for f, t in zip(feats, truth) if t != "Unknown"]
    fitted = MurmurLogistic.fit([f for f, _ in no_unknown], [t for _, t in no_unknown])
    probs = fitted.probabilities(feats)
    assert probs[:, 1].max() < 0.1
    assert "Unknown" not in fitted.decide(feats)


def test_prior_decision_is_the_5_to_1_bayes_rule():
    # With the identity calibration, Present wins exactly where 5·p/(1-p) > 1, i.e. p > 1/6.
    calls = MurmurLogistic.prior().decide([PatientFeatures.single(p, 0.5) for p in (0.15, 0.18, 0.5)])
    assert calls == ["Absent", "Present", "Present"]


def test_outputs_score_as_the_challenge_scores_them():
    feats, truth, _ = planted_patients(60, seed=6)
    outcome = ["Abnormal" if f.heart_prob > 0.5 else "Normal" for f in feats]
    layer = DecisionLayer.fit(feats, truth, outcome)
    labels, probs = layer.outputs(feats)
    scores = challenge_scores(truth, outcome, labels[:, :3], probs[:, :3], labels[:, 3:], probs[:, 3:])
    assert scores.murmur.weighted_accuracy == pytest.approx(weighted_accuracy(truth, layer.murmur.decide(feats)))
    assert (labels[:, :3].sum(axis=1) == 1).all() and (labels[:, 3:].sum(axis=1) == 1).all()


def test_serialisation_round_trips_through_checkpoint_and_safetensors(tmp_path):
    feats, truth, _ = planted_patients(100, seed=7)
    outcome = ["Abnormal" if f.heart_prob > 0.5 else "Normal" for f in feats]
    for kind in ("logistic", "band"):
        layer = DecisionLayer.fit(feats, truth, outcome, murmur=kind)
        d = layer.to_dict()
        assert all(isinstance(v, (str, float)) for v in d.values())
        torch.save({"decision": d}, tmp_path / "ckpt.pt")
        loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["decision"]
        assert DecisionLayer.from_dict(loaded) == layer
        safetensors.torch.save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"),
                                    metadata={"decision": layer.to_json()})
        with safetensors.safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
            again = DecisionLayer.from_json(f.metadata()["decision"])
        assert again == layer
        np.testing.assert_array_equal(again.outputs(feats)[1], layer.outputs(feats)[1])


def good_dict():
    return DecisionLayer(MurmurLogistic.prior(), OutcomeThreshold(0.4)).to_dict()


@pytest.mark.parametrize("change, key", [
    (lambda d: d.pop("murmur.Present.bias"), "murmur.Present.bias"),
    (lambda d: d.update({"murmur.Unknown.heart_logit": "1.0"}), "murmur.Unknown.heart_logit"),
    (lambda d: d.update({"outcome.threshold": float("nan")}), "outcome.threshold"),
    (lambda d: d.update({"outcome.threshold": True}), "outcome.threshold"),
    (lambda d: d.update({"murmur.kind": "tree"}), "murmur.kind"),
    (lambda d: d.update({"murmur.features": "murmur_logit"}), "murmur.features"),
    (lambda d: d.update({"murmur.extra": 1.0}), "murmur.extra"),
    (lambda d: d.update({"other": 1.0}), "other"),
    (lambda d: d.update({"format": "v0"}), "format"),
    (lambda d: d.pop("outcome.kind"), "outcome.kind"),
    (lambda d: d.update({"murmur.patients": -1.0}), "murmur.patients"),
    (lambda d: d.update({"fitted_patients.murmur": 3.0}), "fitted_patients.outcome"),
    (lambda d: d.update({"fitted_patients.murmur": 1.5, "fitted_patients.outcome": 2.0}), "fitted_patients.murmur"),
    (lambda d: d.update({"fitted_patients.heart": 2.0}), "fitted_patients.heart"),
])
def test_malformed_dicts_are_refused_naming_the_key(change, key):
    d = good_dict()
    change(d)
    with pytest.raises(CheckpointError, match=f"'{key}'"):
        DecisionLayer.from_dict(d)


def test_malformed_band_and_non_dicts_are_refused():
    d = DecisionLayer.legacy(0.5, 0.5).to_dict()
    d["murmur.low"] = 0.9
    with pytest.raises(CheckpointError, match="'murmur.low'"):
        DecisionLayer.from_dict(d)
    with pytest.raises(CheckpointError, match="must be a dict"):
        DecisionLayer.from_dict([1, 2])
    with pytest.raises(CheckpointError, match="not JSON"):
        DecisionLayer.from_json("{")


def test_patient_features_from_level_predictions():
    def level(name, ids, pids, probs):
        n = len(ids)
        return LevelPredictions(name, ids, np.array(probs, dtype=np.float64), np.zeros((n, 2)), np.ones((n, 2), bool),
                                pids, [None] * n, np.ones(n, dtype=np.int64))
    recs = level("recording", ["a_AV", "a_MV", "b_AV"], ["a", "a", "b"], [[0.2, 0.1], [0.4, 0.7], [0.9, 0.5]])
    patients = level("patient", ["a", "b"], ["a", "b"], [[0.3, 0.4], [0.9, 0.5]])
    assert patient_features(patients, recs) == [PatientFeatures(0.4, 0.3, 0.7, 0.1),
                                                PatientFeatures(0.5, 0.9, 0.5, 0.5)]
    with pytest.raises(ValueError, match="murmur_prob"):
        MurmurLogistic.prior().probabilities([PatientFeatures.single(1.5, 0.5)])


def test_calibrated_outcome_threshold_minimises_expected_cost_of_a_planted_calibration():
    # Outcomes drawn from a calibrated q: the expected-cost cut on a big sample lands where the brute-force
    # expected cost (computed here from the true P(Abnormal) = q) is lowest, and is stable across samples.
    rng = np.random.default_rng(8)
    q = rng.uniform(0.01, 0.99, 2000)
    abnormal = rng.random(q.size) < q
    feats = [PatientFeatures.single(0.5, float(v)) for v in q]
    fitted = OutcomeThreshold.fit(feats, ["Abnormal" if a else "Normal" for a in abnormal], method="calibrated")

    def expected_cost(t):
        referred = q >= t
        n, m = q.size, referred.sum()
        tp, fn = q[referred].sum(), q[~referred].sum()
        r = m / n
        return (10 * n + (25 + 397 * r - 1718 * r**2 + 11296 * r**4) * n + 10000 * tp + 50000 * fn) / n

    grid = np.linspace(0.0, 1.0, 1001)
    best = grid[np.argmin([expected_cost(t) for t in grid])]
    assert abs(fitted.threshold - best) < 0.03
    assert expected_cost(fitted.threshold) == pytest.approx(min(expected_cost(t) for t in grid), rel=1e-3)
    # Degenerate sets fall back the same way as the observed method.
    assert OutcomeThreshold.fit(feats[:3], ["Normal"] * 3, method="calibrated").threshold == 0.5
    two = OutcomeThreshold.fit(feats[:2], ["Abnormal", "Normal"], method="calibrated")
    assert 0.0 <= two.threshold <= 1.0
    with pytest.raises(ValueError, match="method"):
        OutcomeThreshold.fit(feats, ["Normal"] * len(feats), method="guess")


def test_a_layer_records_how_many_patients_held_each_label_and_names_a_task_fitted_on_none():
    feats, truth, _ = planted_patients(30, seed=8)
    outcome = ["Abnormal" if f.heart_prob > 0.5 else "Normal" for f in feats]
    truth[:4] = [None] * 4  # patients without a murmur class (a format that has none) are not counted
    layer = DecisionLayer.fit(feats, truth, outcome)
    assert layer.fitted_patients == (26, 30) and layer.unfitted_tasks() == []
    assert DecisionLayer.from_dict(layer.to_dict()) == layer
    # PhysioNet 2016 patients: outcomes only. The murmur calls are the prior calibration, fitted to nothing.
    heart_only = DecisionLayer.fit(feats, [None] * 30, outcome)
    assert heart_only.fitted_patients == (0, 30) and heart_only.unfitted_tasks() == ["murmur"]
    assert DecisionLayer.fit([], [], []).unfitted_tasks() == ["murmur", "outcome"]
    # a layer written before the counts were kept still loads, and names no task
    old = layer.to_dict()
    del old["fitted_patients.murmur"], old["fitted_patients.outcome"]
    assert DecisionLayer.from_dict(old).fitted_patients is None and DecisionLayer.from_dict(old).unfitted_tasks() == []
