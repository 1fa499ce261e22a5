"""From the evaluator's window logits to recording and patient predictions, and the thresholds that cut them.

The evaluator sees windows, but the field scores recordings (PhysioNet 2016) and patients (CirCor 2022).
This module is the one place that (1) collects every window's probability across processes
(`PredictionCollector`), (2) aggregates windows -> recordings -> patients with the labels each level
really has (`recording_predictions`, `patient_predictions`), and (3) turns probabilities into decisions:
per-label thresholds tuned on validation (`tune_thresholds`, `attach_threshold_tuning`) and the
Present/Unknown/Absent band of the 2022 murmur task (`unknown_band`).

A level's predictions are a `LevelPredictions`: one row per item, ``probs``/``targets``/``mask`` of shape
``[n, 2]`` in `LABELS` order, ``mask`` False where a label is missing (it then counts nowhere).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics.metric import Metric, reinit__is_reduced

from ignite_trainer.data.records import Recording
from ignite_trainer.scoring.decision import fit_decision
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.scoring.scores import binary_stats, probs_to_murmur_class, tune_threshold
from ignite_trainer.core.vocabulary import AGGREGATIONS, INDEX, LABELS, LOGITS, MASK, OBJECTIVES, PREDICTIONS, TARGETS

__all__ = [
    "WindowPredictions", "LevelPredictions", "PredictionCollector", "aggregate", "window_level",
    "recording_predictions", "patient_predictions", "patient_labels", "tune_thresholds", "unknown_band",
    "murmur_classes", "attach_threshold_tuning", "attach_decision_fitting", "attach_pr_curves", "DEFAULT_THRESHOLDS",
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


# ---------------------------------------------------------------------------------------------- collecting
#: Columns of the collector's row block: probabilities, targets and mask per label, then the window index.
_N = len(LABELS)
_WIDTH = 3 * _N + 1


def _identity(output: Any) -> Any:
    """Default output transform; module-level (not a lambda) so the metric pickles to spawned processes."""
    return output


class PredictionCollector(Metric):
    """Gathers every window's ``sigmoid(logits)``, target, mask and index, from every process.

    Attach it to the evaluator next to the scalar metrics; ``compute()`` returns a `WindowPredictions`
    that is the same on every rank (the shards are all-gathered, unequal sizes included, and sorted by
    window index), so aggregation and threshold tuning agree everywhere. It is not a scalar, so
    `handlers.attach_validation` leaves it out of ``validation_metrics``; read it from
    ``trainer.state.validation_output.metrics[name]``.

    Example::

        PredictionCollector().attach(evaluator, "predictions")
        windows = evaluator.run(val_loader).metrics["predictions"]
        recordings = recording_predictions(windows, val_dataset.window_recording, val_dataset.recordings)
    """

    required_output_keys = (LOGITS, TARGETS, MASK, INDEX)
    _state_dict_all_req_keys = ("_rows",)

    def __init__(self, output_transform: Callable[[Any], Any] = _identity,
                 device: str | torch.device = torch.device("cpu")) -> None:
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._rows: list[torch.Tensor] = []

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        logits, y, mask, index = output
        probs = torch.sigmoid(logits.detach().float()).double().cpu()
        mask = torch.ones_like(probs) if mask is None else mask.detach().double().cpu()
        # One float64 block per batch (indices are exact up to 2**53): a single all-gather at compute time.
        self._rows.append(torch.cat([probs, y.detach().double().cpu(), mask,
                                     index.detach().reshape(-1, 1).double().cpu()], dim=1))

    def compute(self) -> WindowPredictions:
        local = torch.cat(self._rows) if self._rows else torch.zeros(0, _WIDTH, dtype=torch.float64)
        if idist.get_world_size() > 1:
            device = idist.device()
            sizes = [int(n) for n in idist.all_gather(int(local.shape[0]))]
            shards = idist.all_gather_tensors_with_shapes(local.to(device), [[n, _WIDTH] for n in sizes])
            local = torch.cat([s.cpu() for s in shards])
        if local.shape[0] == 0:
            raise NotComputableError("PredictionCollector must have at least one example before it can be computed.")
        rows = local.numpy()
        rows = rows[np.argsort(rows[:, -1], kind="stable")]
        return WindowPredictions(probs=rows[:, :_N].copy(), targets=rows[:, _N:2 * _N].copy(),
                                 mask=rows[:, 2 * _N:3 * _N] > 0.5, index=rows[:, -1].astype(np.int64))


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


def patient_labels(recordings: Sequence[Recording]) -> tuple[tuple[float, float], tuple[bool, bool], str | None]:
    """A patient's own labels ``(labels, mask, murmur_class)`` from its recordings.

    The heart outcome is per patient, so any recording carries it. The murmur is per patient too in
    CirCor (``murmur_class``): a patient is Present even if some locations are not, Unknown stays masked
    unless the recordings count it positive (``unknown_murmur: positive``). Without a class (other
    formats) a label is the maximum over the recordings where it is present, masked if none has it.
    """
    labels, mask = [0.0, 0.0], [False, False]
    for i in range(2):
        known = [r.labels[i] for r in recordings if r.mask[i]]
        if known:
            labels[i], mask[i] = float(max(known) > 0.5), True
    classes = {r.murmur_class for r in recordings if r.murmur_class is not None}
    murmur_class = classes.pop() if len(classes) == 1 else None
    if murmur_class == "Present":
        labels[1], mask[1] = 1.0, True
    elif murmur_class == "Absent":
        labels[1], mask[1] = 0.0, True
    elif murmur_class == "Unknown":
        positive = any(r.mask[1] and r.labels[1] > 0.5 for r in recordings)
        labels[1], mask[1] = (1.0, True) if positive else (0.0, False)
    return (labels[0], labels[1]), (mask[0], mask[1]), murmur_class


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


# ---------------------------------------------------------------------------------------------- trainer hooks
def _validation_recordings(trainer: Engine, metric_name: str, val_dataset: Any) -> LevelPredictions:
    output = getattr(trainer.state, "validation_output", None)
    if output is None or metric_name not in output.metrics:
        raise KeyError(f"no '{metric_name}' in the evaluator's metrics; attach a PredictionCollector under that name")
    return recording_predictions(output.metrics[metric_name], val_dataset.window_recording, val_dataset.recordings)


def attach_threshold_tuning(trainer: Engine, evaluator_metric_name: str, objective: Objective,
                            val_dataset: Any) -> Callable[[Engine], None]:
    """After each validation, tune per-label thresholds on the validation recordings.

    Sets ``trainer.state.thresholds = {"heart": t, "murmur": t}`` (the metrics log and TensorBoard read
    them from there) and ``trainer.state.threshold_scores``, each label's `scores_at_thresholds` on those
    recordings. Attach it right after `handlers.attach_validation`, before the best checkpoint, so
    that a ``Snapshot`` of the thresholds in the checkpoint sees this validation's values
    (`standard.attach_standard_handlers` does). ``val_dataset`` is the `EvalWindows` the evaluator ran on.

    Example::

        PredictionCollector().attach(evaluator, "predictions")
        attach_validation(trainer, evaluator, val_loader)
        attach_threshold_tuning(trainer, "predictions", config.threshold_objective, val_dataset)
        to_save["thresholds"] = Snapshot(lambda: getattr(trainer.state, "thresholds", None))
    """

    def tune(engine: Engine) -> None:
        recs = _validation_recordings(engine, evaluator_metric_name, val_dataset)
        engine.state.thresholds = tune_thresholds(recs.probs, recs.targets, recs.mask, objective)
        engine.state.threshold_scores = scores_at_thresholds(recs.probs, recs.targets, recs.mask,
                                                             engine.state.thresholds)

    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, tune)
    return tune


def attach_decision_fitting(trainer: Engine, evaluator_metric_name: str, val_dataset: Any,
                            aggregation: Aggregation = "mean") -> Callable[[Engine], None]:
    """After each validation, fit the Challenge decision layer on the validation patients.

    Sets ``trainer.state.decision`` to a `decision.DecisionLayer` (`decision.fit_decision` on the patients
    aggregated with ``aggregation``, as evaluation will aggregate them). Attach it before the best
    checkpoint, whose ``decision`` snapshot stores ``state.decision.to_dict()`` (plain strings and floats,
    so the file still loads with ``weights_only=True``).

    Example::

        attach_threshold_tuning(trainer, "predictions", config.threshold_objective, val_dataset)
        attach_decision_fitting(trainer, "predictions", val_dataset, config.aggregation)
        to_save["decision"] = Snapshot(lambda: trainer.state.decision.to_dict())
    """

    def fit(engine: Engine) -> None:
        recs = _validation_recordings(engine, evaluator_metric_name, val_dataset)
        patients = patient_predictions(recs, val_dataset.recordings, aggregation)
        engine.state.decision = fit_decision(patients, recs)

    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, fit)
    return fit


def attach_pr_curves(trainer: Engine, tb_logger: Any, evaluator_metric_name: str = PREDICTIONS,
                     val_dataset: Any = None) -> Callable[[Engine], None]:
    """Write a TensorBoard PR curve per label after each validation (tag ``val_pr/<label>``).

    With ``val_dataset`` (the validation `EvalWindows`) the curve is over recordings, the level the
    thresholds are tuned on; without it, over windows. Masked labels are left out; a label with no
    present example gets no curve. Step = ``trainer.state.epoch``, like every other validation tag
    (`tensorboard_epoch.attach_epoch_tensorboard`: pass the logger it returns).

    Example::

        tb_epoch = attach_epoch_tensorboard(trainer, run_dir / "tb" / "epoch", val_dataset=val_dataset)
        attach_pr_curves(trainer, tb_epoch, "predictions", val_dataset)
    """

    def write(engine: Engine) -> None:
        level: LevelPredictions | WindowPredictions
        if val_dataset is not None:
            level = _validation_recordings(engine, evaluator_metric_name, val_dataset)
        else:
            level = engine.state.validation_output.metrics[evaluator_metric_name]
        probs, targets, mask = level.probs, level.targets, level.mask
        for i, label in enumerate(LABELS):
            keep = mask[:, i]
            if keep.any():
                tb_logger.writer.add_pr_curve(f"val_pr/{label}", targets[keep, i].astype(np.int64),
                                              probs[keep, i], engine.state.epoch)

    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, write)
    return write

