"""Patient decisions the 2022 Challenge rewards, fitted on validation predictions.

The model gives two probabilities per patient (murmur present, outcome abnormal); the Challenge scores
three murmur calls (Present, Unknown, Absent, weighted 5/3/1 by the true class) and a referral decision
priced by its cost. This module turns patient-level predictions into those calls.

Murmur (`MurmurLogistic`, the default): a three-class multinomial logistic calibration on a few patient
features (`PatientFeatures`: the murmur probability's logit, how far apart the recordings' murmur logits
are, the outcome probability's logit), fitted on validation patients. Because the weighted accuracy's denominator
depends on the truth only, the call that maximises its expectation for a patient is ``argmax_c w_c·P(c)``
with ``w = (5, 3, 1)``: calibrated probabilities plus that fixed rule tune the decision to the Challenge
without searching any threshold. The probabilities written are the calibrated ``P(c)`` (they sum to 1).
The fit is a convex penalised likelihood started and pulled towards an "identity" calibration (Present vs
Absent by the model's own probability, Unknown rare), so a small or lopsided validation set moves it only
as far as the evidence goes, and a set with fewer than two classes leaves it there. Eight numbers in all;
L-BFGS from a fixed start, so the same patients always give the same decision.

`MurmurBand` is the earlier rule (Present at or above ``high``, Unknown in ``[low, high)``, Absent below),
kept for comparison: fixed as threshold ± margin, or with the band tuned for weighted accuracy.

Outcome (`OutcomeThreshold`): Abnormal when the outcome probability is at or above a threshold chosen to
minimise the official cost on the validation patients (ties: the cut nearest 0.5, then the lower one),
counting either their observed outcomes or, for a steadier cut, their calibrated P(Abnormal).

`DecisionLayer` holds both, plus the validation patients' class frequencies (``prior``: the answer for a
patient with no usable recording) and how many of them had a murmur class and an outcome
(``fitted_patients``: a task fitted on none is refused for Challenge output), and serialises to a flat
dict of strings and floats: it fits in a checkpoint loaded with ``weights_only=True`` and, as JSON, in
safetensors metadata; a malformed dict is refused with a `CheckpointError` naming the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_softmax, softmax

from ignite_trainer.core.vocabulary import CHALLENGE_OUTPUT_CLASSES, CLASS_WEIGHTS, MURMUR_CLASSES, OUTCOME_CLASSES
from ignite_trainer.scoring.challenge import challenge_cost
from ignite_trainer.core.errors import CheckpointError

__all__ = [
    "PatientFeatures",
    "patient_features",
    "MurmurLogistic",
    "MurmurBand",
    "OutcomeThreshold",
    "DecisionLayer",
    "DECISION_WEIGHTS",
    "FALLBACK_PRIOR",
    "patient_truth",
    "class_frequencies",
    "fit_decision",
]

#: Weight of a correct murmur call by true class (the Challenge's), used as ``argmax w·P``.
DECISION_WEIGHTS: tuple[float, ...] = tuple(float(w) for w in CLASS_WEIGHTS[MURMUR_CLASSES])
#: Features of `MurmurLogistic`, in the order of its coefficients.
FEATURES: tuple[str, ...] = ("murmur_logit", "murmur_spread", "heart_logit")
#: Probabilities are clipped this far from 0 and 1 before a logit, so a saturated model stays finite.
_EPS = 1e-6
#: Prior Unknown score: P(Unknown) stays below 1/7 and ``3·P(U)`` never beats ``max(5·P(P), P(A))``.
_PRIOR_UNKNOWN_BIAS = math.log(1.0 / 6.0)
#: Class frequencies assumed where a layer stores none (a legacy model) or a task had no true class:
#: every class equally likely, in `CHALLENGE_OUTPUT_CLASSES` order. With the 5/3/1 weights that calls
#: a patient nobody could hear Present, and Abnormal at any outcome threshold up to 0.5: refer when in doubt.
FALLBACK_PRIOR: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class PatientFeatures:
    """What the decision sees of one patient.

    ``murmur_prob`` and ``heart_prob`` are the patient-level probabilities (recordings aggregated as the
    run aggregates them); ``murmur_max`` and ``murmur_min`` the extremes over the patient's recordings
    (equal to ``murmur_prob`` with one recording).

    Example::

        PatientFeatures(murmur_prob=0.4, heart_prob=0.3, murmur_max=0.7, murmur_min=0.1)
    """

    murmur_prob: float
    heart_prob: float
    murmur_max: float
    murmur_min: float

    @classmethod
    def single(cls, murmur_prob: float, heart_prob: float) -> PatientFeatures:
        """A patient known only by its two probabilities (no per-recording spread)."""
        return cls(murmur_prob, heart_prob, murmur_prob, murmur_prob)


def patient_features(patients: Any, recordings: Any) -> list[PatientFeatures]:
    """`PatientFeatures` for each patient of a patient-level `LevelPredictions`, in its order.

    ``recordings`` is the recording-level `LevelPredictions` the patients were aggregated from (its
    ``patient_ids`` group the recordings). Column 0 is ``heart``, column 1 ``murmur``.

    Example::

        windows, recordings, patients = run.levels("mean")
        layer.outputs(patient_features(patients, recordings))
    """
    by_patient: dict[str, list[float]] = {}
    for pid, p in zip(recordings.patient_ids, np.asarray(recordings.probs)[:, 1]):
        by_patient.setdefault(str(pid), []).append(float(p))
    out = []
    for i, pid in enumerate(patients.ids):
        murmur, heart = float(patients.probs[i, 1]), float(patients.probs[i, 0])
        recs = by_patient.get(str(pid), [murmur])
        out.append(PatientFeatures(murmur, heart, max(recs), min(recs)))
    return out


def _probability_column(features: Sequence[PatientFeatures], name: str) -> np.ndarray:
    values = np.array([getattr(f, name) for f in features], dtype=np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return values


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def _design(features: Sequence[PatientFeatures]) -> np.ndarray:
    """[N, 1 + len(FEATURES)]: a constant, then the features in `FEATURES` order.

    All three live on the logit scale (the spread is ``logit(max) − logit(min)``), so one penalty
    strength suits every coefficient without storing a standardisation.
    """
    murmur = _probability_column(features, "murmur_prob")
    heart = _probability_column(features, "heart_prob")
    spread = _logit(_probability_column(features, "murmur_max")) - _logit(_probability_column(features, "murmur_min"))
    return np.column_stack([np.ones(murmur.size), _logit(murmur), np.abs(spread), _logit(heart)])


def _known(features: Sequence[PatientFeatures], truth: Sequence[str | None], classes: tuple[str, ...]
           ) -> tuple[list[PatientFeatures], np.ndarray]:
    """The patients with a true class (None is skipped) and each one's class index."""
    if len(features) != len(truth):
        raise ValueError(f"{len(features)} patients but {len(truth)} true classes")
    kept, index = [], []
    for f, t in zip(features, truth):
        if t is None:
            continue
        if t not in classes:
            raise ValueError(f"true class {t!r} is not one of {', '.join(classes)}")
        kept.append(f)
        index.append(classes.index(t))
    return kept, np.asarray(index, dtype=np.int64)


def _weighted_calls(probs: np.ndarray) -> list[str]:
    """``argmax_c w_c·P(c)``; an exact tie goes to the earlier class (Present, then Unknown)."""
    best = np.argmax(probs * np.asarray(DECISION_WEIGHTS), axis=1)
    return [MURMUR_CLASSES[j] for j in best]


# ---------------------------------------------------------------------------------------------- murmur
@dataclass(frozen=True)
class MurmurLogistic:
    """Calibrated P(Present), P(Unknown), P(Absent) from `PatientFeatures`; the call is ``argmax w·P``.

    ``present`` and ``unknown`` are the score coefficients ``(bias, *FEATURES)`` of those classes; Absent's
    score is 0. ``patients`` is how many validation patients the fit saw (0: the identity prior).

    Example:

        >>> layer = MurmurLogistic.prior()
        >>> layer.decide([PatientFeatures.single(0.9, 0.5), PatientFeatures.single(0.1, 0.5)])
        ['Present', 'Absent']
    """

    present: tuple[float, ...]
    unknown: tuple[float, ...]
    patients: int = 0

    kind = "logistic"

    @classmethod
    def prior(cls) -> MurmurLogistic:
        """The identity calibration: Present vs Absent as the model says, Unknown rare and never chosen."""
        present = (0.0, 1.0) + (0.0,) * (len(FEATURES) - 1)
        unknown = (_PRIOR_UNKNOWN_BIAS,) + (0.0,) * len(FEATURES)
        return cls(present, unknown, 0)

    def _coef(self) -> np.ndarray:
        return np.array([self.present, self.unknown], dtype=np.float64)

    def probabilities(self, features: Sequence[PatientFeatures]) -> np.ndarray:
        """[N, 3] in the order Present, Unknown, Absent; each row sums to 1."""
        x = _design(features)
        scores = np.column_stack([x @ self._coef().T, np.zeros(len(x))])
        return softmax(scores, axis=1)

    def decide(self, features: Sequence[PatientFeatures]) -> list[str]:
        return _weighted_calls(self.probabilities(features))

    @classmethod
    def fit(cls, features: Sequence[PatientFeatures], truth: Sequence[str | None], strength: float = 1.0
            ) -> MurmurLogistic:
        """Penalised maximum likelihood on the patients with a true class (None: left out).

        Minimises ``Σ −log P(y_i | x_i) + strength/2 · ‖θ − θ_prior‖²`` (strictly convex: one optimum,
        found by L-BFGS from the prior). Fewer than two distinct true classes: the prior, unchanged.
        """
        if not strength > 0:
            raise ValueError(f"strength must be > 0, got {strength}")
        kept, y = _known(features, truth, MURMUR_CLASSES)
        prior = cls.prior()
        if len(np.unique(y)) < 2:
            return prior
        x = _design(kept)
        theta0 = prior._coef().reshape(-1)
        onehot = np.eye(3)[y]

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            coef = theta.reshape(2, -1)
            scores = np.column_stack([x @ coef.T, np.zeros(len(x))])
            logp = log_softmax(scores, axis=1)
            diff = theta - theta0
            value = -float(np.sum(logp[np.arange(len(y)), y])) + 0.5 * strength * float(diff @ diff)
            grad = ((np.exp(logp) - onehot)[:, :2].T @ x).reshape(-1) + strength * diff
            return value, grad

        result = minimize(objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 500})
        theta = result.x if np.isfinite(result.x).all() else theta0
        coef = theta.reshape(2, -1)
        return cls(tuple(float(v) for v in coef[0]), tuple(float(v) for v in coef[1]), len(y))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "features": ",".join(FEATURES), "patients": float(self.patients)}
        for name, coef in (("Present", self.present), ("Unknown", self.unknown)):
            for term, value in zip(("bias",) + FEATURES, coef):
                d[f"{name}.{term}"] = float(value)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "") -> MurmurLogistic:
        _expect_keys(d, prefix, {"kind", "features", "patients"}
                     | {f"{c}.{t}" for c in ("Present", "Unknown") for t in ("bias",) + FEATURES})
        features = _string(d, prefix, "features")
        if features != ",".join(FEATURES):
            raise CheckpointError(f"decision key '{prefix}features' is {features!r}; this version uses "
                                  f"{','.join(FEATURES)!r}")
        coef = {c: tuple(_number(d, prefix, f"{c}.{t}") for t in ("bias",) + FEATURES) for c in ("Present", "Unknown")}
        patients = _number(d, prefix, "patients")
        if patients < 0 or patients != int(patients):
            raise CheckpointError(f"decision key '{prefix}patients' is {patients!r}; expected a count")
        return cls(coef["Present"], coef["Unknown"], int(patients))


@dataclass(frozen=True)
class MurmurBand:
    """Present at or above ``high``, Unknown in ``[low, high)``, Absent below ``low`` (murmur probability).

    Its probabilities are ``p, 0, 1 − p``: the band has no probability of its own for Unknown.

    Example:

        >>> MurmurBand.fixed(0.5, 0.1).decide([PatientFeatures.single(p, 0.5) for p in (0.7, 0.5, 0.3)])
        ['Present', 'Unknown', 'Absent']
    """

    low: float
    high: float

    kind = "band"

    def __post_init__(self) -> None:
        if not (0.0 <= self.low <= self.high <= 1.0):
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")

    @classmethod
    def fixed(cls, threshold: float, margin: float) -> MurmurBand:
        """The earlier rule: ``threshold ± margin``, clipped to [0, 1]."""
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        return cls(max(0.0, threshold - margin), min(1.0, threshold + margin))

    def probabilities(self, features: Sequence[PatientFeatures]) -> np.ndarray:
        p = _probability_column(features, "murmur_prob")
        return np.column_stack([p, np.zeros_like(p), 1.0 - p])

    def decide(self, features: Sequence[PatientFeatures]) -> list[str]:
        p = _probability_column(features, "murmur_prob")
        return [str(c) for c in np.where(p >= self.high, "Present", np.where(p < self.low, "Absent", "Unknown"))]

    @classmethod
    def fit(cls, features: Sequence[PatientFeatures], truth: Sequence[str | None]) -> MurmurBand:
        """The band with the highest weighted accuracy on these patients.

        Cuts are the midpoints between neighbouring probabilities (and beyond both ends); ties go to the
        narrowest band, then the one centred nearest 0.5, then the lower one. Fewer than two true classes:
        the fixed 0.5 ± 0.1.
        """
        kept, y = _known(features, truth, MURMUR_CLASSES)
        if len(np.unique(y)) < 2:
            return cls.fixed(0.5, 0.1)
        p = _probability_column(kept, "murmur_prob")
        cuts = _cuts(p)
        # Counts of each true class strictly below each cut.
        below = np.array([np.searchsorted(np.sort(p[y == k]), cuts, side="left") for k in range(3)], dtype=np.float64)
        total = np.bincount(y, minlength=3).astype(np.float64)
        w = np.asarray(DECISION_WEIGHTS)
        lo, hi = np.meshgrid(np.arange(cuts.size), np.arange(cuts.size), indexing="ij")
        valid = lo <= hi
        correct = (w[0] * (total[0] - below[0][hi]) + w[1] * (below[1][hi] - below[1][lo]) + w[2] * below[2][lo])
        score = np.where(valid, correct / float(w @ total), -np.inf)
        low, high = cuts[lo].ravel(), cuts[hi].ravel()
        best = np.lexsort((low, np.abs((low + high) / 2 - 0.5), high - low, -score.ravel()))[0]
        return cls(float(np.clip(low[best], 0.0, 1.0)), float(np.clip(high[best], 0.0, 1.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": float(self.low), "high": float(self.high)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "") -> MurmurBand:
        _expect_keys(d, prefix, {"kind", "low", "high"})
        low, high = _number(d, prefix, "low"), _number(d, prefix, "high")
        if not (0.0 <= low <= high <= 1.0):
            raise CheckpointError(f"decision keys '{prefix}low'={low!r}, '{prefix}high'={high!r}: "
                                  "need 0 <= low <= high <= 1")
        return cls(low, high)


def _cuts(p: np.ndarray) -> np.ndarray:
    """Midpoints between neighbouring distinct values, one cut below all and one above all."""
    uniq = np.unique(p)
    below = uniq[0] / 2.0 if uniq[0] > 0 else 0.0
    above = (uniq[-1] + 1.0) / 2.0 if uniq[-1] < 1.0 else np.nextafter(1.0, 2.0)
    return np.concatenate([[below], (uniq[:-1] + uniq[1:]) / 2.0, [above]])


# ---------------------------------------------------------------------------------------------- outcome
@dataclass(frozen=True)
class OutcomeThreshold:
    """Abnormal when the outcome probability is at or above ``threshold``; probabilities ``q, 1 − q``.

    Example:

        >>> OutcomeThreshold(0.3).decide([PatientFeatures.single(0.5, q) for q in (0.4, 0.2)])
        ['Abnormal', 'Normal']
    """

    threshold: float = 0.5

    kind = "threshold"

    def probabilities(self, features: Sequence[PatientFeatures]) -> np.ndarray:
        q = _probability_column(features, "heart_prob")
        return np.column_stack([q, 1.0 - q])

    def decide(self, features: Sequence[PatientFeatures]) -> list[str]:
        q = _probability_column(features, "heart_prob")
        return ["Abnormal" if v >= self.threshold else "Normal" for v in q]

    @classmethod
    def fit(cls, features: Sequence[PatientFeatures], truth: Sequence[str | None],
            method: str = "observed") -> OutcomeThreshold:
        """The threshold with the lowest official cost on these patients (None truths left out).

        ``"observed"`` counts the patients' true outcomes; ``"calibrated"`` counts each patient's
        calibrated P(Abnormal) instead (a one-feature logistic calibration of the probability's logit,
        pulled towards the identity like `MurmurLogistic`), which minimises the *expected* cost and moves
        less with one patient more or less. Candidates are the midpoints between neighbouring
        probabilities and one cut beyond each end; equal costs go to the cut nearest 0.5, then the lower.
        Without both classes: 0.5.
        """
        if method not in ("observed", "calibrated"):
            raise ValueError(f"method must be 'observed' or 'calibrated', got {method!r}")
        kept, y = _known(features, truth, OUTCOME_CLASSES)
        if len(np.unique(y)) < 2:
            return cls(0.5)
        q = _probability_column(kept, "heart_prob")
        abnormal = (y == 0).astype(np.float64)
        if method == "calibrated":
            abnormal = _calibrated(q, abnormal)
        cuts = _cuts(q)
        costs = []
        for c in cuts:
            referred = q >= c
            tp, fn = float(abnormal[referred].sum()), float(abnormal[~referred].sum())
            costs.append(challenge_cost(tp, float(referred.sum()) - tp, fn, float((~referred).sum()) - fn))
        best = np.lexsort((cuts, np.abs(cuts - 0.5), np.asarray(costs)))[0]
        return cls(float(cuts[best]))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": float(self.threshold)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "") -> OutcomeThreshold:
        _expect_keys(d, prefix, {"kind", "threshold"})
        return cls(_number(d, prefix, "threshold"))


def _calibrated(q: np.ndarray, y: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """P(y = 1) = sigmoid(a + b·logit(q)), fitted with the penalty ``strength/2·(a² + (b − 1)²)``."""
    x = np.column_stack([np.ones(q.size), _logit(q)])
    theta0 = np.array([0.0, 1.0])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ theta
        diff = theta - theta0
        value = float(np.sum(np.logaddexp(0.0, z) - y * z)) + 0.5 * strength * float(diff @ diff)
        grad = x.T @ (expit(z) - y) + strength * diff
        return value, grad

    result = minimize(objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 200})
    theta = result.x if np.isfinite(result.x).all() else theta0
    return expit(x @ theta)


# ---------------------------------------------------------------------------------------------- layer
MurmurDecision = Union[MurmurLogistic, MurmurBand]
_MURMUR_KINDS: dict[str, type] = {"logistic": MurmurLogistic, "band": MurmurBand}
#: The layer's two tasks, in the order of ``fitted_patients``.
TASKS: tuple[str, str] = ("murmur", "outcome")
_FORMAT = "ignite_trainer.decision/1"


@dataclass(frozen=True)
class DecisionLayer:
    """The murmur and outcome decisions of a model, with the Challenge's output row for each patient.

    Example:

        >>> layer = DecisionLayer(MurmurLogistic.prior(), OutcomeThreshold(0.5))
        >>> DecisionLayer.from_dict(layer.to_dict()) == layer
        True
    """

    murmur: MurmurDecision
    outcome: OutcomeThreshold
    #: Validation class frequencies in `CHALLENGE_OUTPUT_CLASSES` order (None: `FALLBACK_PRIOR` is used).
    prior: tuple[float, ...] | None = None
    #: ``(murmur, outcome)``: how many patients the layer was fitted on had a true murmur class and a true
    #: outcome (None: not recorded, a layer built by hand or written before the count was kept).
    fitted_patients: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.prior is not None:
            _check_prior(self.prior, ValueError)
        if self.fitted_patients is not None and (
                len(self.fitted_patients) != len(TASKS) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in self.fitted_patients)):
            raise ValueError(f"fitted_patients {self.fitted_patients!r}: need two counts >= 0 (murmur, outcome)")

    def unfitted_tasks(self) -> list[str]:
        """The tasks (``"murmur"``, ``"outcome"``) fitted on no patient with that label: their calls are the
        layer's starting point, not fitted to anything. Empty when the counts were not recorded.

        Example:

            >>> DecisionLayer(MurmurLogistic.prior(), OutcomeThreshold(0.4), fitted_patients=(0, 25)).unfitted_tasks()
            ['murmur']
        """
        if self.fitted_patients is None:
            return []
        return [task for task, n in zip(TASKS, self.fitted_patients) if n == 0]

    @classmethod
    def fit(cls, features: Sequence[PatientFeatures], murmur_truth: Sequence[str | None],
            outcome_truth: Sequence[str | None], murmur: str = "logistic", outcome: str = "observed"
            ) -> DecisionLayer:
        """Fit both decisions on validation patients, and keep their class frequencies as the prior.

        ``murmur`` is ``"logistic"`` or ``"band"`` (tuned band); ``outcome`` is the `OutcomeThreshold.fit`
        method, ``"observed"`` or ``"calibrated"``.
        """
        if murmur not in _MURMUR_KINDS:
            raise ValueError(f"murmur must be one of {', '.join(_MURMUR_KINDS)}, got {murmur!r}")
        return cls(_MURMUR_KINDS[murmur].fit(features, murmur_truth),
                   OutcomeThreshold.fit(features, outcome_truth, method=outcome),
                   class_frequencies(murmur_truth, outcome_truth),
                   (sum(t is not None for t in murmur_truth), sum(t is not None for t in outcome_truth)))

    def prior_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """The answer for a patient the model cannot hear: binary calls [5] and probabilities [5].

        The probabilities are the stored class frequencies (`FALLBACK_PRIOR` without them); the murmur
        call is ``argmax w·P`` over them, the outcome call the layer's threshold applied to P(Abnormal).

        Example:

            >>> labels, probs = DecisionLayer(MurmurLogistic.prior(), OutcomeThreshold(0.4),
            ...                               (0.1, 0.1, 0.8, 0.3, 0.7)).prior_outputs()
            >>> labels.tolist(), probs.tolist()
            ([0, 0, 1, 0, 1], [0.1, 0.1, 0.8, 0.3, 0.7])
        """
        probs = np.asarray(self.prior if self.prior is not None else FALLBACK_PRIOR, dtype=np.float64)
        murmur = _weighted_calls(probs[None, :3])[0]
        outcome = "Abnormal" if probs[3] >= self.outcome.threshold else "Normal"
        labels = np.array([int(murmur == c) for c in MURMUR_CLASSES] + [int(outcome == c) for c in OUTCOME_CLASSES],
                          dtype=np.int64)
        return labels, probs

    @classmethod
    def legacy(cls, murmur_threshold: float, heart_threshold: float, margin: float = 0.1) -> DecisionLayer:
        """The earlier decisions: the murmur threshold ± a fixed margin, the heart threshold as is."""
        return cls(MurmurBand.fixed(murmur_threshold, margin), OutcomeThreshold(heart_threshold))

    def outputs(self, features: Sequence[PatientFeatures]) -> tuple[np.ndarray, np.ndarray]:
        """Binary calls [N, 5] (int) and probabilities [N, 5] in `CHALLENGE_OUTPUT_CLASSES` order."""
        murmur_calls = self.murmur.decide(features)
        outcome_calls = self.outcome.decide(features)
        labels = np.array([[int(m == c) for c in MURMUR_CLASSES] + [int(o == c) for c in OUTCOME_CLASSES]
                           for m, o in zip(murmur_calls, outcome_calls)], dtype=np.int64).reshape(-1, 5)
        probs = np.column_stack([self.murmur.probabilities(features), self.outcome.probabilities(features)])
        return labels, probs.reshape(-1, len(CHALLENGE_OUTPUT_CLASSES))

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{key: str | float}``: ``format``, then ``murmur.*`` and ``outcome.*`` keys."""
        d: dict[str, Any] = {"format": _FORMAT}
        d.update({f"murmur.{k}": v for k, v in self.murmur.to_dict().items()})
        d.update({f"outcome.{k}": v for k, v in self.outcome.to_dict().items()})
        if self.prior is not None:
            d.update({f"prior.{c}": float(p) for c, p in zip(CHALLENGE_OUTPUT_CLASSES, self.prior)})
        if self.fitted_patients is not None:
            d.update({f"fitted_patients.{t}": float(n) for t, n in zip(TASKS, self.fitted_patients)})
        return d

    @classmethod
    def from_dict(cls, d: Any) -> DecisionLayer:
        """Rebuild from `to_dict`'s output; anything else is a `CheckpointError` naming the key."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"decision layer must be a dict, got {type(d).__name__}")
        if _string(d, "", "format") != _FORMAT:
            raise CheckpointError(f"decision key 'format' is {d['format']!r}; expected {_FORMAT!r}")
        unknown = sorted(str(k) for k in d if k != "format"
                         and not str(k).startswith(("murmur.", "outcome.", "prior.", "fitted_patients.")))
        if unknown:
            raise CheckpointError(f"decision key '{unknown[0]}' is not part of a decision layer")
        kind = _string(d, "murmur.", "kind")
        if kind not in _MURMUR_KINDS:
            raise CheckpointError(f"decision key 'murmur.kind' is {kind!r}; expected one of {', '.join(_MURMUR_KINDS)}")
        if _string(d, "outcome.", "kind") != OutcomeThreshold.kind:
            raise CheckpointError(f"decision key 'outcome.kind' is {d['outcome.kind']!r}; expected 'threshold'")
        murmur = _MURMUR_KINDS[kind].from_dict({k: v for k, v in d.items() if str(k).startswith("murmur.")}, "murmur.")
        outcome = OutcomeThreshold.from_dict({k: v for k, v in d.items() if str(k).startswith("outcome.")}, "outcome.")
        return cls(murmur, outcome, _prior_from(d), _fitted_from(d))

    def to_json(self) -> str:
        """`to_dict` as JSON, for safetensors metadata (whose values are strings)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecisionLayer:
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"decision layer metadata is not JSON ({e})") from None
        return cls.from_dict(d)


def _prior_from(d: Mapping[str, Any]) -> tuple[float, ...] | None:
    """The ``prior.*`` keys (all or none: a layer written before priors were stored has none)."""
    keys = [f"prior.{c}" for c in CHALLENGE_OUTPUT_CLASSES]
    present = [k for k in keys if k in d]
    extra = sorted(str(k) for k in d if str(k).startswith("prior.") and k not in keys)
    if extra:
        raise CheckpointError(f"decision key '{extra[0]}' is not part of a decision layer")
    if not present:
        return None
    missing = [k for k in keys if k not in d]
    if missing:
        raise CheckpointError(f"decision key '{missing[0]}' is missing")
    prior = tuple(_number(d, "", k) for k in keys)
    _check_prior(prior, CheckpointError)
    return prior


def _fitted_from(d: Mapping[str, Any]) -> tuple[int, int] | None:
    """The ``fitted_patients.*`` keys (both or none: a layer written before the counts were kept has none)."""
    keys = [f"fitted_patients.{t}" for t in TASKS]
    extra = sorted(str(k) for k in d if str(k).startswith("fitted_patients.") and k not in keys)
    if extra:
        raise CheckpointError(f"decision key '{extra[0]}' is not part of a decision layer")
    if not any(k in d for k in keys):
        return None
    missing = [k for k in keys if k not in d]
    if missing:
        raise CheckpointError(f"decision key '{missing[0]}' is missing")
    counts = [_number(d, "", k) for k in keys]
    for k, n in zip(keys, counts):
        if n < 0 or n != int(n):
            raise CheckpointError(f"decision key '{k}' is {n!r}; expected a count")
    return int(counts[0]), int(counts[1])


def _check_prior(prior: Sequence[float], error: type[Exception]) -> None:
    values = [float(p) for p in prior]
    if (len(values) != len(CHALLENGE_OUTPUT_CLASSES) or not all(0.0 <= p <= 1.0 for p in values)
            or abs(sum(values[:3]) - 1.0) > 1e-9 or abs(sum(values[3:]) - 1.0) > 1e-9):
        raise error(f"decision prior {tuple(prior)!r}: need 5 frequencies in [0, 1] "
                    f"({', '.join(CHALLENGE_OUTPUT_CLASSES)}), the murmur three and the outcome two each summing to 1")


# ---------------------------------------------------------------------------------------------- fitting
def class_frequencies(murmur_truth: Sequence[str | None], outcome_truth: Sequence[str | None]) -> tuple[float, ...]:
    """Share of each class among the patients with a true class, in `CHALLENGE_OUTPUT_CLASSES` order.

    A task with no true class at all takes `FALLBACK_PRIOR`'s values.

    Example:

        >>> class_frequencies(["Present", "Absent", "Absent", None], ["Abnormal", None, "Normal", "Normal"])
        (0.3333333333333333, 0.0, 0.6666666666666666, 0.3333333333333333, 0.6666666666666666)
    """
    out: list[float] = []
    for truth, classes, fallback in ((murmur_truth, MURMUR_CLASSES, FALLBACK_PRIOR[:3]),
                                     (outcome_truth, OUTCOME_CLASSES, FALLBACK_PRIOR[3:])):
        known = [t for t in truth if t is not None]
        out.extend([known.count(c) / len(known) for c in classes] if known else fallback)
    return tuple(out)


def patient_truth(patients: Any) -> tuple[list[str | None], list[str | None]]:
    """The true murmur class and outcome of each patient of a patient-level `LevelPredictions`.

    The murmur class is CirCor's Present/Unknown/Absent (None where the format has none: the Challenge's
    murmur task needs all three); the outcome is "Abnormal" or "Normal" from the heart label (None where it
    is missing).

    Example::

        murmur_truth, outcome_truth = patient_truth(patients)
    """
    murmur = [c if c in MURMUR_CLASSES else None for c in patients.murmur_classes]
    outcome = [("Abnormal" if patients.targets[i, 0] > 0.5 else "Normal") if patients.mask[i, 0] else None
               for i in range(len(patients.ids))]
    return murmur, outcome


def fit_decision(patients: Any, recordings: Any, murmur: str = "logistic", outcome: str = "observed"
                 ) -> DecisionLayer:
    """Fit a `DecisionLayer` on validation predictions: patient- and recording-level `LevelPredictions`.

    This is what training does after each validation (the layer goes into the best checkpoint); with
    cross-validation, call it once on the out-of-fold predictions of all folds together.

    Example::

        windows, recordings, patients = run.levels("mean")
        layer = fit_decision(patients, recordings)
        labels, probs = layer.outputs(patient_features(patients, recordings))
    """
    murmur_truth, outcome_truth = patient_truth(patients)
    return DecisionLayer.fit(patient_features(patients, recordings), murmur_truth, outcome_truth,
                             murmur=murmur, outcome=outcome)


# ---------------------------------------------------------------------------------------------- validation
def _expect_keys(d: Mapping[str, Any], prefix: str, keys: set[str]) -> None:
    present = {str(k)[len(prefix):] for k in d if str(k).startswith(prefix)}
    missing = sorted(keys - present)
    if missing:
        raise CheckpointError(f"decision key '{prefix}{missing[0]}' is missing")
    extra = sorted(present - keys)
    if extra:
        raise CheckpointError(f"decision key '{prefix}{extra[0]}' is not part of a {d.get(prefix + 'kind')} decision")


def _string(d: Mapping[str, Any], prefix: str, key: str) -> str:
    if prefix + key not in d:
        raise CheckpointError(f"decision key '{prefix}{key}' is missing")
    value = d[prefix + key]
    if not isinstance(value, str):
        raise CheckpointError(f"decision key '{prefix}{key}' is {value!r}; expected a string")
    return value


def _number(d: Mapping[str, Any], prefix: str, key: str) -> float:
    value = d[prefix + key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"decision key '{prefix}{key}' is {value!r}; expected a finite number")
    return float(value)

