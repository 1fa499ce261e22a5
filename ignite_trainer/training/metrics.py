"""Ignite metrics for the masked multi-label evaluator: per-label scores, the epoch's validation loss, and
`PredictionCollector`, which gathers every window's probability for the recording and patient levels.

Ignite's own metrics cannot skip missing labels and `Accuracy(is_multilabel=True)` is exact-match
accuracy, so these two metrics accumulate only *present* entries (the evaluator's ``mask``), keep
their state as counts that `sync_all_reduce` sums across processes, and therefore give the same
numbers on one process or many. The formulas are `scores.stats_from_counts`, shared with reports.

Both read the evaluator's output dict ``{"logits", "y", "mask", ...}`` by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics.metric import Metric, reinit__is_reduced, sync_all_reduce

from ignite_trainer.scoring.predictions import WindowPredictions
from ignite_trainer.scoring.scores import stats_from_counts
from ignite_trainer.core.vocabulary import INDEX, LABELS, LOGITS, MACRO_F1, MASK, STATS, TARGETS, label_score

__all__ = ["PerLabelMetrics", "MaskedLoss", "logits_y_mask", "STAT_NAMES"]

#: Per-label statistics `PerLabelMetrics` reports, as ``"<label>.<stat>"`` keys.
STAT_NAMES: tuple[str, ...] = (*STATS, "support")


def logits_y_mask(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Default ``output_transform``: pick ``(logits, y, mask)`` from the evaluator's output dict.

    A missing ``mask`` means every label is present. A module-level function (not a lambda) so the
    metric stays picklable for spawned processes.
    """
    return output[LOGITS], output[TARGETS], output.get(MASK)


def _unpack(output: Sequence[Any], n_labels: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes and return ``(logits, y, present)`` detached, ``present`` as bool.

    ``n_labels`` None accepts any number of label columns.
    """
    if len(output) == 2:
        logits, y, mask = output[0], output[1], None
    elif len(output) == 3:
        logits, y, mask = output
    else:
        raise ValueError(f"expected (logits, y[, mask]), got {len(output)} items")
    logits, y = logits.detach(), y.detach()
    if logits.ndim != 2 or (n_labels is not None and logits.shape[1] != n_labels):
        raise ValueError(f"logits must have shape [B, {n_labels or 'L'}], got {tuple(logits.shape)}")
    if y.shape != logits.shape:
        raise ValueError(f"y shape {tuple(y.shape)} differs from logits {tuple(logits.shape)}")
    if mask is None:
        present = torch.ones_like(y, dtype=torch.bool)
    else:
        if mask.shape != logits.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from logits {tuple(logits.shape)}")
        present = mask.detach().to(device=y.device, dtype=torch.bool)
    return logits, y, present


class PerLabelMetrics(Metric):
    """Accuracy, precision, recall = sensitivity, specificity, F1 and support per label, plus macro F1.

    Each batch's ``sigmoid(logits)`` is thresholded once per label (``prob >= threshold``, compared in
    float64 so a threshold tuned by `scores.tune_threshold` reproduces its predictions exactly), and
    TP/FP/FN/TN are counted over present entries only. ``compute()`` returns a flat dict with keys
    ``"<label>.<stat>"`` for every stat in `STAT_NAMES`, plus ``"macro_f1"``; the prefixes keep the
    keys apart from other metrics in ``engine.state.metrics`` (Ignite flattens a dict-valued metric
    into the same namespace, so a bare ``f1`` would collide with any other metric's), and the
    metric is flattened only (no nested copy under its attach name).

    ``support`` is the number of *present* examples of the label (not scikit-learn's count of true
    positives). A ratio with a zero denominator is None (undefined, ``n/a``; a 0.0 would read as a bad
    model): e.g. recall and, without positive predictions, F1 of a label with no positive example, and
    every ratio of a label that is masked everywhere. ``macro_f1`` averages the *defined* F1 values only
    (None when no label has one). Computing before any update raises `NotComputableError`.

    Args:
        thresholds: one decision threshold in [0, 1] per label; may be replaced later through the
            ``thresholds`` attribute (takes effect from the next ``update``, e.g. the next evaluator run).
        labels: label names, in the order of the logits' columns.
        output_transform: maps the engine's output to ``(logits, y, mask)``; default `logits_y_mask`.
        device: where counts are accumulated (use the model's device to avoid copies). Off the CPU an
            update never waits for the device: targets that are not 0/1 are counted there and reported
            by ``compute()`` instead of by the ``update`` that received them.

    Example:

        .. code-block:: python

            per_label = PerLabelMetrics(thresholds=(0.5, 0.5), device=device)
            per_label.attach(evaluator, "per_label")
            evaluator.run(val_loader)
            evaluator.state.metrics["murmur.f1"], evaluator.state.metrics["macro_f1"]

            per_label.thresholds = (0.42, 0.31)   # tuned on validation; used by the next run
    """

    _state_dict_all_req_keys = ("_counts", "_num_examples")

    def __init__(
        self,
        thresholds: Sequence[float] = (0.5, 0.5),
        labels: Sequence[str] = LABELS,
        output_transform: Callable[[Any], Any] = logits_y_mask,
        device: str | torch.device = torch.device("cpu"),
    ) -> None:
        self.labels: tuple[str, ...] = tuple(labels)
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct and non-empty, got {self.labels}")
        self._thresholds: tuple[float, ...] = ()
        self._threshold_tensor: torch.Tensor | None = None
        self._warned_no_positives: set[str] = set()
        self.thresholds = thresholds
        super().__init__(
            output_transform=output_transform, device=device, skip_unrolling=True, metrics_result_mode="flatten"
        )

    @property
    def thresholds(self) -> tuple[float, ...]:
        """One threshold per label; a prediction is positive when ``sigmoid(logit) >= threshold``."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, values: Sequence[float]) -> None:
        values = tuple(float(v) for v in values)
        if len(values) != len(self.labels):
            raise ValueError(f"need {len(self.labels)} thresholds ({', '.join(self.labels)}), got {len(values)}")
        if not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"thresholds must lie in [0, 1], got {values}")
        self._thresholds = values
        self._threshold_tensor = None  # rebuilt on the next update's device

    @reinit__is_reduced
    def reset(self) -> None:
        # One row per label, columns TP, FP, FN, TN: a single tensor, so one all-reduce per compute.
        self._counts = torch.zeros(len(self.labels), 4, dtype=torch.int64, device=self._device)
        self._invalid = torch.zeros((), dtype=torch.int64, device=self._device)
        self._num_examples = 0

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        logits, y, present = _unpack(output, len(self.labels))
        invalid = ((y != 0) & (y != 1) & present).sum()
        if y.device.type == "cpu":  # free to check at once; elsewhere checked in compute(), without a sync here
            if int(invalid):
                raise ValueError("present targets y must be 0 or 1")
        else:
            self._invalid += invalid.to(self._device)

        thresholds = self._threshold_tensor
        if thresholds is None or thresholds.device != logits.device:
            thresholds = torch.tensor(self._thresholds, dtype=self._double_dtype, device=logits.device)
            self._threshold_tensor = thresholds
        predicted = torch.sigmoid(logits.float()).to(self._double_dtype) >= thresholds
        truth = y == 1

        tp = (predicted & truth & present).sum(dim=0)
        fp = (predicted & ~truth & present).sum(dim=0)
        fn = (~predicted & truth & present).sum(dim=0)
        tn = (~predicted & ~truth & present).sum(dim=0)
        self._counts += torch.stack([tp, fp, fn, tn], dim=1).to(self._device)
        self._num_examples += y.shape[0]

    @sync_all_reduce("_counts", "_invalid", "_num_examples")
    def compute(self) -> dict[str, float | None]:
        if self._num_examples == 0:
            raise NotComputableError("PerLabelMetrics must have at least one example before it can be computed.")
        if int(self._invalid):
            raise ValueError(f"present targets y must be 0 or 1; {int(self._invalid)} were not")
        result: dict[str, float | None] = {}
        defined_f1: list[float] = []
        for label, (tp, fp, fn, tn) in zip(self.labels, self._counts.tolist()):
            stats = stats_from_counts(tp, fp, fn, tn)
            support = tp + fp + fn + tn
            for name, value in stats.items():
                result[label_score(label, name)] = value
            result[label_score(label, "support")] = support
            if support > 0 and tp + fn == 0 and label not in self._warned_no_positives:
                # the split cannot measure recall here, whatever the model does. Said once.
                self._warned_no_positives.add(label)
                logging.getLogger("ignite_trainer").warning(
                    "%s: no positive examples among %d evaluated; its recall is n/a and macro_f1 averages "
                    "the labels whose F1 is defined", label, support)
            if stats["f1"] is not None:
                defined_f1.append(stats["f1"])
        result[MACRO_F1] = sum(defined_f1) / len(defined_f1) if defined_f1 else None
        return result


class MaskedLoss(Metric):
    """The validation loss over a whole epoch: the mean over every present entry of every batch.

    A mean of batch means over-weights small or sparsely labelled batches (and differs with the
    number of processes); this accumulates the sum of per-entry losses and the count of present
    entries instead, both summed across processes. ``loss_fn(logits, y, mask)`` must return the mean
    over present entries, as `losses.WeightedBCELoss` does; the batch sum is that mean times the count.

    With no present entry in the whole epoch the loss is undefined, and `NotComputableError` is
    raised rather than reporting 0.0, which early stopping and checkpointing would take for a best score.

    Args:
        loss_fn: the criterion, called as ``loss_fn(logits, y, mask)``.
        output_transform: maps the engine's output to ``(logits, y, mask)``; default `logits_y_mask`.
        device: where the sums are accumulated.

    Example:

        .. code-block:: python

            criterion = WeightedBCELoss(1.0, 2.5).to(device)
            MaskedLoss(criterion, device=device).attach(evaluator, "val_loss")
            evaluator.run(val_loader)
            evaluator.state.metrics["val_loss"]
    """

    _state_dict_all_req_keys = ("_sum", "_count", "_num_examples")

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        output_transform: Callable[[Any], Any] = logits_y_mask,
        device: str | torch.device = torch.device("cpu"),
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn)}")
        self._loss_fn = loss_fn
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=self._double_dtype, device=self._device)
        self._count = torch.tensor(0, dtype=torch.int64, device=self._device)
        self._num_examples = 0

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        logits, y, present = _unpack(output, None)
        mean = self._loss_fn(logits, y, present).detach()
        if mean.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(mean.shape)}")
        count = present.sum()
        self._sum += (mean.to(self._double_dtype) * count).to(self._device)
        self._count += count.to(self._device)
        self._num_examples += y.shape[0]

    @sync_all_reduce("_sum", "_count", "_num_examples")
    def compute(self) -> float:
        if self._num_examples == 0:
            raise NotComputableError("MaskedLoss must have at least one example before it can be computed.")
        if int(self._count) == 0:
            raise NotComputableError("MaskedLoss: every label of every example was masked; the loss is undefined.")
        return float(self._sum / self._count)


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
