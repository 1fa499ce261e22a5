"""TensorBoard scalars stepped by epoch: validation scores, AUROC/AUPRC, epoch loss and time, the best epoch.

The iteration writer (`handlers.attach_tensorboard`) shows the optimisation step by step; runs are compared
by epoch, so this writer logs one point per validated epoch with ``step = epoch``. It writes to its own log
folder (``run_dir/tb/epoch`` by convention): TensorBoard's purge on resume hides every event at or past a
step in the file's folder, and a purge given in iterations would not hide stale epochs (nor the reverse),
so the two step scales never share a folder. Tags:

- ``val/<score>``: every validation scalar (``val/val_loss``, ``val/macro_f1``, ``val/murmur.f1``,
  ``val/heart.threshold``, ...) and ``val/<label>.auroc``, ``val/<label>.auprc`` (left out for a label
  with one class in the validation split);
- ``epoch/train_loss``, ``epoch/seconds``, ``epoch/val_seconds``, ``epoch/best_epoch``, ``epoch/best_score``.

The numbers come from `epoch_scalars.EpochScalars`, the same ones the MLflow tracker logs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ignite.engine import Engine
from ignite.handlers import Checkpoint, TensorboardLogger

from ignite_trainer.core.vocabulary import LABELS, PREDICTIONS, VAL_LOSS
from ignite_trainer.scoring.predictions import LevelPredictions, WindowPredictions
from ignite_trainer.training.decisions import validation_recordings
from ignite_trainer.training.epoch_scalars import EpochScalars
from ignite_trainer.training.events import TrainerEvents

__all__ = ["attach_epoch_tensorboard", "attach_pr_curves"]


def attach_epoch_tensorboard(trainer: Engine, log_dir: str | Path, *, monitor: str = VAL_LOSS,
                             predictions_name: str = PREDICTIONS, val_dataset: Any = None,
                             best_checkpoint: Checkpoint | None = None) -> TensorboardLogger:
    """Log the per-epoch scalars (module docstring) to an Ignite `TensorboardLogger` in ``log_dir``.

    Attach on rank 0, after `attach_best_checkpoint` and after a resume's state is restored: the
    restored ``trainer.state.epoch`` sets the purge step (``epoch + 1``), which hides what a killed run
    logged past its checkpoint. Close the returned logger when training ends.

    Example::

        run = RunDirectory(run_dir)  # the run directory's paths (runs.rundir)
        best = attach_best_checkpoint(trainer, to_save, run.checkpoints, "macro_f1")
        tb_epoch = attach_epoch_tensorboard(trainer, run.tensorboard / "epoch", monitor="macro_f1",
                                            val_dataset=val_dataset, best_checkpoint=best)
        try:
            trainer.run(train_loader, max_epochs=10)
        finally:
            tb_epoch.close()
    """
    restored_epoch = int(trainer.state.epoch or 0)
    # tensorboardX names a file by the second it was opened and truncates a file of the same name: a resume
    # within the same second would erase the earlier epochs. The nanosecond suffix keeps names apart and in order.
    tb = TensorboardLogger(log_dir=str(log_dir), purge_step=restored_epoch + 1 if restored_epoch else None,
                           filename_suffix=f".{time.time_ns()}")
    scalars = EpochScalars(trainer, monitor=monitor, predictions_name=predictions_name, val_dataset=val_dataset,
                           best_checkpoint=best_checkpoint)
    # The custom events are counted by epoch, so Ignite's default global step of these handlers is the epoch.
    tb.attach_output_handler(trainer, event_name=TrainerEvents.VALIDATION_COMPLETED, tag="val",
                             output_transform=lambda _: scalars.validation(trainer))
    tb.attach_output_handler(trainer, event_name=TrainerEvents.VALIDATION_COMPLETED, tag="epoch",
                             output_transform=lambda _: scalars.epoch(trainer))
    # One small write per epoch: flush it, so that a kill after the epoch's checkpoint loses none of it.
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, lambda _: tb.writer.flush())
    return tb


def attach_pr_curves(trainer: Engine, tb_logger: Any, evaluator_metric_name: str = PREDICTIONS,
                     val_dataset: Any = None) -> Callable[[Engine], None]:
    """Write a TensorBoard PR curve per label after each validation (tag ``val_pr/<label>``).

    With ``val_dataset`` (the validation `EvalWindows`) the curve is over recordings, the level the
    thresholds are tuned on; without it, over windows. Masked labels are left out; a label with no
    present example gets no curve. Step = ``trainer.state.epoch``, like every other validation tag
    (`tensorboard_epoch.attach_epoch_tensorboard`: pass the logger it returns).

    Example::

        run = RunDirectory(run_dir)  # the run directory's paths (runs.rundir)
        tb_epoch = attach_epoch_tensorboard(trainer, run.tensorboard / "epoch", val_dataset=val_dataset)
        attach_pr_curves(trainer, tb_epoch, "predictions", val_dataset)
    """

    def write(engine: Engine) -> None:
        level: LevelPredictions | WindowPredictions
        if val_dataset is not None:
            level = validation_recordings(engine, evaluator_metric_name, val_dataset)
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
