"""Temperature scaling per label, expected calibration error and the data of a reliability diagram.

A model's sigmoid outputs rank well but are often over-confident: a window called 0.95 is not right 95 %
of the time. Temperature scaling fixes that with one number per label, ``T > 0``: every window's logit
``z`` becomes ``z / T`` (``T > 1`` softens, ``T < 1`` sharpens), so the ranking, AUROC and AUPRC do not
change, only how far the probabilities stand from 0.5.

**The level it is fitted at: patients.** The decision layer (`decision.patient_features`) reads patient
probabilities, aggregated the way the run aggregates them: windows' probabilities averaged per recording,
recordings reduced per patient by the run's ``aggregation`` (``mean``, or ``any``: the maximum). A
temperature fitted on windows would calibrate a level nobody reads: a mean of windows is already pulled
towards the middle, so a window-calibrated model is under-confident per patient. So `fit_temperatures`
divides the *windows'* logits by ``T`` (which is where the model's output is), then aggregates exactly as
`predictions.recording_predictions` and `predictions.patient_predictions` do, and minimises the negative
log-likelihood of the patients' own labels (`splits.patient_labels`, masked labels left out). The search
is scipy's bounded ``minimize_scalar`` on ``log T`` in ``[log 1/20, log 20]``: one dimension, one optimum
in practice, the same answer for the same data. A label with fewer than two classes among its patients
(nothing to calibrate against: the likelihood is best at an edge) keeps ``T = 1`` and is marked unfitted.

Logits come from the windows' probabilities (`WindowPredictions.probs`), clipped to ``[1e-7, 1 − 1e-7]``:
a float32 sigmoid cannot tell logits above about 16 apart, so nothing is lost that the model had given.

**Expected calibration error** (`expected_calibration_error`): the positive-class probability ``p`` of a
label is cut into `ECE_BINS` (10) equal-width bins ``[0, 0.1), …, [0.9, 1.0]`` (1.0 in the last bin); for
bin ``b`` with ``n_b`` items, ``conf_b`` the mean ``p`` and ``acc_b`` the share of items whose label is
present, ``ECE = Σ_b n_b / N · |acc_b − conf_b|``. 0 is perfect; an always-0.99 model on a 50 % label
scores 0.49. `reliability` gives the same bins (count, mean confidence, accuracy): the reliability diagram's
data. Both are pure functions of their input.

`Calibration` is what a run stores (`runs.rundir.RunDirectory.calibration_file`): the temperatures, the
epoch they belong to, whether decisions use them, and the per-label ECE before and after with the
reliability data on the validation patients. It round-trips through JSON; anything malformed is refused
with a `CheckpointError` naming the field.

Example::

    windows, recordings = ...  # validation WindowPredictions and the recordings behind them
    cal = fit_temperatures(windows, dataset.window_recording, dataset.recordings, how="mean")
    print(cal.temperatures, cal.ece_before, cal.ece_after)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.core.vocabulary import AGGREGATIONS, LABELS
from ignite_trainer.scoring.predictions import (WindowPredictions, aggregate, patient_predictions,
                                                recording_predictions)

__all__ = ["ECE_BINS", "TEMPERATURE_BOUNDS", "Calibration", "fit_temperature", "fit_temperatures",
           "apply_temperatures", "calibrated_windows", "expected_calibration_error", "reliability",
           "ece_per_label", "reliability_per_label", "logits_of", "checked_temperature", "CALIBRATION_FORMAT"]

#: Equal-width bins of the expected calibration error and the reliability diagram.
ECE_BINS = 10
#: ``T`` is searched in this range (on ``log T``): beyond it a model is not miscalibrated but broken.
TEMPERATURE_BOUNDS: tuple[float, float] = (1.0 / 20.0, 20.0)
#: The ``format`` field of a stored calibration.
CALIBRATION_FORMAT = "ignite_trainer.calibration/1"
_EPS = 1e-7


# ---------------------------------------------------------------------------------------------- temperatures
def logits_of(probs: np.ndarray) -> np.ndarray:
    """The logits behind sigmoid probabilities, clipped to ``[1e-7, 1 − 1e-7]`` so that a saturated one stays finite."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def checked_temperature(value: Any, what: str, error: type[Exception] = ValueError) -> float:
    """``value`` as a finite number > 0, or ``error`` naming ``what``.

    Example:

        >>> checked_temperature(2, "T")
        2.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise error(f"{what} is {value!r}; a temperature must be a finite number > 0")
    return float(value)


def apply_temperatures(probs: np.ndarray, temperatures: Mapping[str, float]) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` per label column (`LABELS` order); a label with ``T == 1`` is copied unchanged.

    Example:

        >>> apply_temperatures(np.array([[0.5, 0.8]]), {"heart": 2.0, "murmur": 1.0}).round(4).tolist()
        [[0.5, 0.8]]
    """
    probs = np.asarray(probs, dtype=np.float64)
    out = probs.copy()
    for j, label in enumerate(LABELS):
        t = checked_temperature(temperatures[label], f"temperature of {label}")
        if t != 1.0:
            out[:, j] = expit(logits_of(probs[:, j]) / t)
    return out


def calibrated_windows(windows: WindowPredictions, temperatures: Mapping[str, float]) -> WindowPredictions:
    """The same windows with their probabilities passed through `apply_temperatures`."""
    return replace(windows, probs=apply_temperatures(windows.probs, temperatures))


def _patient_nll(log_t: float, logits: np.ndarray, recording_of: np.ndarray, patient_of: np.ndarray,
                 how: str, y: np.ndarray, keep: np.ndarray) -> float:
    probs = expit(logits / math.exp(log_t))
    _, recs = aggregate(probs, recording_of.tolist(), "mean")
    keys, patients = aggregate(recs, patient_of.tolist(), how)
    patients = patients[np.argsort(np.asarray(keys, dtype=np.int64))]  # back to patient-code order
    p = np.clip(patients[keep], 1e-12, 1.0 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def fit_temperature(logits: np.ndarray, recording_of: Sequence[int], patient_of: Sequence[int],
                    targets: np.ndarray, mask: np.ndarray, how: str = "mean") -> float | None:
    """One label's ``T``: windows' ``logits`` / T, averaged per recording, ``how`` per patient, NLL of the patients.

    ``recording_of[i]`` is window ``i``'s recording code, ``patient_of[r]`` recording ``r``'s patient code
    (codes in first-appearance order, ``0..n-1``); ``targets``/``mask`` are per patient in that order.
    Returns None when the kept patients hold fewer than two classes (nothing to fit against).

    Example:

        >>> z = np.array([4.0, -4.0, 3.0, -3.0]); y = np.array([1.0, 0.0, 0.0, 1.0])
        >>> t = fit_temperature(z, [0, 1, 2, 3], [0, 1, 2, 3], y, np.ones(4, bool))
        >>> t > 1.0   # half the confident calls are wrong: soften
        True
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
    logits = np.asarray(logits, dtype=np.float64)
    recording_of, patient_of = np.asarray(recording_of, dtype=np.int64), np.asarray(patient_of, dtype=np.int64)
    keep = np.asarray(mask, dtype=bool)
    y = np.asarray(targets, dtype=np.float64)[keep]
    if len(np.unique(y)) < 2:
        return None
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(_patient_nll, bounds=(low, high), method="bounded",
                             args=(logits, recording_of, patient_of, how, y, keep), options={"xatol": 1e-6})
    return float(math.exp(result.x))


def fit_temperatures(windows: WindowPredictions, window_recording: Sequence[int], recordings: Sequence[Any],
                     how: str = "mean", *, epoch: int | None = None, applied: bool = False) -> Calibration:
    """A `Calibration` fitted on validation windows (see the module's note on the level), with ECE and
    reliability data before and after on the validation patients.

    ``window_recording`` and ``recordings`` are `EvalWindows.window_recording` and `EvalWindows.recordings`.
    """
    recs = recording_predictions(windows, window_recording, recordings)
    patients = patient_predictions(recs, recordings, how)
    rec_of = np.asarray(window_recording, dtype=np.int64)[windows.index]
    position = {pid: i for i, pid in enumerate(patients.ids)}
    patient_of = np.array([position[pid] for pid in recs.patient_ids], dtype=np.int64)
    # rows of `recs` are in recording order 0..R-1, and aggregate() reorders groups by first appearance
    rec_codes = _first_appearance_codes(rec_of)
    rec_order = np.asarray(list(dict.fromkeys(rec_of.tolist())), dtype=np.int64)
    logits = logits_of(windows.probs)
    temperatures, fitted = {}, {}
    for j, label in enumerate(LABELS):
        t = fit_temperature(logits[:, j], rec_codes, patient_of[rec_order], patients.targets[:, j],
                            patients.mask[:, j], how)
        temperatures[label], fitted[label] = (1.0, False) if t is None else (t, True)
    after = patient_predictions(recording_predictions(calibrated_windows(windows, temperatures), window_recording,
                                                      recordings), recordings, how)
    return Calibration(temperatures=temperatures, fitted=fitted, aggregation=how, epoch=epoch, applied=applied,
                       patients={label: int(patients.mask[:, j].sum()) for j, label in enumerate(LABELS)},
                       ece_before=ece_per_label(patients), ece_after=ece_per_label(after),
                       reliability_before=reliability_per_label(patients), reliability_after=reliability_per_label(after))


def _first_appearance_codes(keys: np.ndarray) -> np.ndarray:
    position = {k: i for i, k in enumerate(dict.fromkeys(keys.tolist()))}
    return np.fromiter((position[k] for k in keys.tolist()), dtype=np.int64, count=keys.size)


# ---------------------------------------------------------------------------------------------- ECE
def _bin_of(prob: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((prob * bins).astype(np.int64), bins - 1)


def reliability(y_true: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width bin of ``prob``: ``low``, ``high``, ``count``, ``confidence`` (mean prob) and
    ``accuracy`` (share of positives); the last two are None in an empty bin.

    Example:

        >>> [b["count"] for b in reliability(np.array([1, 0, 1]), np.array([0.05, 0.5, 1.0]), bins=2)]
        [1, 2]
    """
    y_true, prob = np.asarray(y_true, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    which = _bin_of(prob, bins)
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        out.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                    "confidence": float(prob[inside].mean()) if n else None,
                    "accuracy": float(y_true[inside].mean()) if n else None})
    return out


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """``Σ_b n_b / N · |accuracy_b − confidence_b|`` over `ECE_BINS` equal-width bins (None without items).

    Example:

        >>> expected_calibration_error(np.array([1, 0]), np.array([0.99, 0.99]))
        0.49
    """
    table = reliability(y_true, prob, bins)
    total = sum(b["count"] for b in table)
    if total == 0:
        return None
    return float(round(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]),
                       12))


def ece_per_label(level: Any, bins: int = ECE_BINS) -> dict[str, float | None]:
    """`expected_calibration_error` of each label over the items where it is present (None: no item)."""
    return {label: expected_calibration_error(*level.label(label), bins) for label in LABELS}


def reliability_per_label(level: Any, bins: int = ECE_BINS) -> dict[str, list[dict[str, Any]]]:
    """`reliability` of each label over the items where it is present."""
    return {label: reliability(*level.label(label), bins) for label in LABELS}


# ---------------------------------------------------------------------------------------------- stored
@dataclass(frozen=True)
class Calibration:
    """Per-label temperatures and what they did on the patients they were fitted on.

    ``applied``: whether the model's decisions use the calibrated probabilities (the run's ``calibrate``).

    Example:

        >>> c = Calibration({"heart": 1.5, "murmur": 0.8}, {"heart": True, "murmur": True})
        >>> Calibration.from_json(c.to_json()) == c
        True
    """

    temperatures: dict[str, float]
    fitted: dict[str, bool]
    aggregation: str = "mean"
    epoch: int | None = None
    applied: bool = False
    patients: dict[str, int] = field(default_factory=dict)
    ece_before: dict[str, float | None] = field(default_factory=dict)
    ece_after: dict[str, float | None] = field(default_factory=dict)
    reliability_before: dict[str, list] = field(default_factory=dict)
    reliability_after: dict[str, list] = field(default_factory=dict)
    bins: int = ECE_BINS
    level: str = "patient"

    def __post_init__(self) -> None:
        for label in LABELS:
            checked_temperature(self.temperatures.get(label), f"temperature of {label}")

    @classmethod
    def identity(cls) -> Calibration:
        """``T = 1`` for every label, fitted on nothing: what a model without a calibration file has."""
        return cls({label: 1.0 for label in LABELS}, {label: False for label in LABELS})

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "level": self.level, "aggregation": self.aggregation,
                "epoch": self.epoch, "applied": self.applied, "bins": self.bins,
                "temperatures": dict(self.temperatures), "fitted": dict(self.fitted), "patients": dict(self.patients),
                "ece_before": dict(self.ece_before), "ece_after": dict(self.ece_after),
                "reliability_before": self.reliability_before, "reliability_after": self.reliability_after}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        """Rebuild from `to_dict`'s output; anything else is a `CheckpointError` naming the field."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"calibration must be a JSON object, got {type(d).__name__}")
        if d.get("format") != CALIBRATION_FORMAT:
            raise CheckpointError(f"calibration field 'format' is {d.get('format')!r}; expected {CALIBRATION_FORMAT!r}")
        temps = d.get("temperatures")
        if not isinstance(temps, Mapping) or set(temps) != set(LABELS):
            raise CheckpointError(f"calibration field 'temperatures' is {temps!r}; expected one per label {LABELS}")
        temperatures = {label: checked_temperature(temps[label], f"calibration field 'temperatures.{label}'",
                                                   CheckpointError) for label in LABELS}
        fitted = d.get("fitted")
        if not isinstance(fitted, Mapping) or set(fitted) != set(LABELS) or not all(
                isinstance(v, bool) for v in fitted.values()):
            raise CheckpointError(f"calibration field 'fitted' is {fitted!r}; expected true/false per label {LABELS}")
        applied = d.get("applied")
        if not isinstance(applied, bool):
            raise CheckpointError(f"calibration field 'applied' is {applied!r}; expected true or false")
        aggregation = d.get("aggregation")
        if aggregation not in AGGREGATIONS:
            raise CheckpointError(f"calibration field 'aggregation' is {aggregation!r}; expected one of "
                                  f"{', '.join(AGGREGATIONS)}")
        epoch = d.get("epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
            raise CheckpointError(f"calibration field 'epoch' is {epoch!r}; expected an epoch number")
        bins = d.get("bins", ECE_BINS)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise CheckpointError(f"calibration field 'bins' is {bins!r}; expected a count >= 1")

        def _mapping(name: str) -> dict:
            value = d.get(name, {})
            if not isinstance(value, Mapping):
                raise CheckpointError(f"calibration field '{name}' is {value!r}; expected an object per label")
            return dict(value)
        return cls(temperatures, dict(fitted), str(aggregation), epoch, applied, _mapping("patients"),
                   _mapping("ece_before"), _mapping("ece_after"), _mapping("reliability_before"),
                   _mapping("reliability_after"), bins, str(d.get("level", "patient")))

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"calibration is not JSON ({e})") from None
        return cls.from_dict(d)
