"""The numbers that describe one epoch, gathered once for every per-epoch logger (TensorBoard, MLflow).

Validation already leaves its scalar scores in ``trainer.state.validation_metrics``; what a researcher
also wants per epoch is not there: the ranking scores (AUROC, AUPRC), which need every prediction and
not confusion counts, the epoch's mean training loss, how long the epoch and its validation took, and
which epoch is the best so far. `EpochScalars` computes them from the trainer's state so that each
logger only decides where the numbers go, and all of them log the same numbers under the same names.

A score that is undefined is left out, never logged as 0.0: AUROC/AUPRC of a label whose validation
items are all of one class, a label that is masked everywhere, a loss that is not finite.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.scoring.predictions import recording_predictions
from ignite_trainer.scoring.scores import auprc, auroc
from ignite_trainer.core.vocabulary import LABELS, PREDICTIONS, VAL_LOSS, best_epoch, score_sign
from ignite_trainer.runs.checkpoint import parse_checkpoint_name

__all__ = ["EpochScalars", "ranking_scores"]

#: The epoch in Ignite's ``<prefix>_<name>_<global step>_<score name>=<score>.pt`` (the best checkpoint's global
#: step is its epoch, `handlers.attach_best_checkpoint`); score names start with a letter (``neg_val_loss``).


def ranking_scores(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """``<label>.auroc`` and ``<label>.auprc`` over the present items of each label that holds both classes.

    A label whose present items are all negative (or all positive), or that has none, gets no entry:
    with one class there is no ranking to measure, and a 0.0 would read as a bad model.

    Example:

        >>> s = ranking_scores(np.array([[0.9, 0.2], [0.1, 0.8]]), np.array([[1, 0], [0, 0]]), np.ones((2, 2), bool))
        >>> s
        {'heart.auroc': 1.0, 'heart.auprc': 1.0}
    """
    out: dict[str, float] = {}
    for i, label in enumerate(LABELS):
        keep = np.asarray(mask[:, i], dtype=bool)
        y = np.asarray(targets[keep, i]).astype(np.int64)
        if y.size == 0 or y.min() == y.max():
            continue
        p = np.asarray(probs[keep, i], dtype=np.float64)
        out[f"{label}.auroc"] = auroc(y, p)
        out[f"{label}.auprc"] = auprc(y, p)
    return out


def _finite(value: Any) -> float | None:
    if torch.is_tensor(value):
        value = value.item() if value.numel() == 1 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class EpochScalars:
    """Per-epoch scalars of a trainer built by `ignite_trainer.training.run` (or composed the same way).

    ``validation(trainer)``: every scalar of ``trainer.state.validation_metrics`` (``val_loss``,
    ``macro_f1``, ``heart.f1``, ``murmur.threshold``, ...) plus ``<label>.auroc`` / ``<label>.auprc``
    from the evaluator's `PredictionCollector` (named ``predictions_name``): over recordings when
    ``val_dataset`` (the validation `EvalWindows`) is given, the level the thresholds are tuned on,
    otherwise over windows.

    ``epoch(trainer)``: ``train_loss`` (the epoch's mean), ``seconds`` (training, validation excluded),
    ``val_seconds``, and once a best checkpoint exists ``best_epoch`` and ``best_score`` (the monitored
    score of that epoch). The best epoch is the one `BEST_MODEL_SAVED` last announced, i.e. the
    checkpoint `evaluate` uses; ``best_checkpoint`` (the `Checkpoint` of `attach_best_checkpoint`,
    already restored on resume) supplies the best of the epochs before a resume.

    Create it after `attach_best_checkpoint` so that, within an epoch's ``VALIDATION_COMPLETED``, the
    new best is known before the loggers read it.

    Example::

        scalars = EpochScalars(trainer, monitor="macro_f1", val_dataset=val_dataset, best_checkpoint=best)

        @trainer.on(TrainerEvents.VALIDATION_COMPLETED)
        def show(engine):
            print(engine.state.epoch, scalars.validation(engine), scalars.epoch(engine))
    """

    def __init__(self, trainer: Engine, *, monitor: str = VAL_LOSS, predictions_name: str = PREDICTIONS,
                 val_dataset: Any = None, best_checkpoint: Checkpoint | None = None) -> None:
        self.monitor = monitor
        self.predictions_name = predictions_name
        self.val_dataset = val_dataset
        self.best_epoch: int | None = None
        self.best_score: float | None = None
        if best_checkpoint is not None:
            self.best_epoch, self.best_score = _restored_best(best_checkpoint, monitor)
        trainer.add_event_handler(TrainerEvents.BEST_MODEL_SAVED, self._new_best)

    def _new_best(self, engine: Engine) -> None:
        self.best_epoch = int(engine.state.epoch)
        self.best_score = _finite(getattr(engine.state, "best_score", None))

    def validation(self, engine: Engine) -> dict[str, float]:
        """The validation scalars of the epoch that just validated (see the class docstring)."""
        values = {name: v for name, value in getattr(engine.state, "validation_metrics", {}).items()
                  if (v := _finite(value)) is not None}
        output = getattr(engine.state, "validation_output", None)
        predictions = getattr(output, "metrics", {}).get(self.predictions_name) if output is not None else None
        if predictions is not None:
            if self.val_dataset is not None:
                predictions = recording_predictions(predictions, self.val_dataset.window_recording,
                                                    self.val_dataset.recordings)
            values.update(ranking_scores(predictions.probs, predictions.targets, predictions.mask))
        return values

    def epoch(self, engine: Engine) -> dict[str, float]:
        """Training loss, times and the best epoch so far (see the class docstring)."""
        values = {
            "train_loss": _finite(engine.state.metrics.get("train_loss")),
            "seconds": _finite(engine.state.times.get(Events.EPOCH_COMPLETED.name)),
            "val_seconds": _finite(getattr(engine.state, "validation_seconds", None)),
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
        }
        return {k: float(v) for k, v in values.items() if v is not None}


def _restored_best(best_checkpoint: Checkpoint, monitor: str) -> tuple[int | None, float | None]:
    """Epoch and monitored score of the best file a (restored) best-checkpoint handler holds, if any.

    Ignite keeps its saved files as ``(priority, filename)``, the priority being the score function's value
    (the monitored score, negated for a loss); the best is the highest, the earliest epoch on a tie
    (`vocabulary.best_epoch`, as `checkpoint.find_best_checkpoint` picks it).
    """
    saved = best_checkpoint.state_dict().get("_saved") or []
    if not saved:
        return None, None
    epochs = {}
    for priority, filename in saved:
        parsed = parse_checkpoint_name(Path(str(filename)).name)
        if parsed is not None:
            epochs[parsed.epoch] = float(priority)
    epoch = best_epoch(epochs.items(), "max")
    if epoch is None:
        priority, _ = saved[-1]
        return None, score_sign(monitor) * float(priority)
    return epoch, score_sign(monitor) * epochs[epoch]
