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
from typing import Any

from ignite.engine import Engine
from ignite.handlers import Checkpoint, TensorboardLogger

from ignite_trainer.core.vocabulary import PREDICTIONS, VAL_LOSS
from ignite_trainer.training.epoch_scalars import EpochScalars
from ignite_trainer.training.events import TrainerEvents

__all__ = ["attach_epoch_tensorboard"]


def attach_epoch_tensorboard(trainer: Engine, log_dir: str | Path, *, monitor: str = VAL_LOSS,
                             predictions_name: str = PREDICTIONS, val_dataset: Any = None,
                             best_checkpoint: Checkpoint | None = None) -> TensorboardLogger:
    """Log the per-epoch scalars (module docstring) to an Ignite `TensorboardLogger` in ``log_dir``.

    Attach on rank 0, after `attach_best_checkpoint` and after a resume's state is restored: the
    restored ``trainer.state.epoch`` sets the purge step (``epoch + 1``), which hides what a killed run
    logged past its checkpoint. Close the returned logger when training ends.

    Example::

        best = attach_best_checkpoint(trainer, to_save, run_dir / "checkpoints", "macro_f1")
        tb_epoch = attach_epoch_tensorboard(trainer, run_dir / "tb" / "epoch", monitor="macro_f1",
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
