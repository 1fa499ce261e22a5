"""The standard handler set of a training run, attached in the one order that is right.

Handlers on the same event run in the order they were attached, and several read what an earlier one
left in ``trainer.state``, so the order is part of the contract:

1. ``EPOCH_STARTED``: the sampler's epoch (a fresh shuffle per epoch); the metrics log captures the LR the
   epoch will train with.
2. ``StepEvents.STATS_READ`` (fired from ``ITERATION_COMPLETED``, at the latest on an epoch's last
   iteration): the non-finite guard, before anything could save a broken step.
3. ``EPOCH_COMPLETED``: validation, which fires ``VALIDATION_COMPLETED``, on which, in order:
   the per-label temperatures (``state.calibration``, `temperature`), threshold tuning (sets
   ``state.thresholds``; on calibrated probabilities with ``calibrate``), the Challenge decision layer (``state.decision``), early
   stopping, then the best checkpoint (whose ``thresholds`` and ``decision`` snapshots must see this
   epoch's values, and whose ``early_stopping`` state must already count this epoch), then, on rank 0, the
   metrics log, the per-epoch TensorBoard (with PR curves) and the console's epoch line (all after the best
   checkpoint, so that they know whether this epoch is the best).
   After validation, still on ``EPOCH_COMPLETED``: the LR scheduler steps, then the last checkpoint is
   written (it must hold the *next* epoch's LR and every state above).
4. On resume, every object is restored after all of them exist and before the loggers open, since
   TensorBoard needs the restored iteration to hide what a killed run logged past it.

`attach_standard_handlers` is what `run.training_process` and custom scripts call; it returns a
`StandardHandlers` naming each attached handler so that a script can inspect, checkpoint or remove it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, EarlyStopping, LRScheduler, ProgressBar, TensorboardLogger

from ignite_trainer.runs.checkpoint import RNGStates, Snapshot, clean_partial_files, restore
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.vocabulary import PREDICTIONS
from ignite_trainer.training.console import EpochLines, attach_epoch_lines
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.training.handlers import (
    MetricsLogWriter, attach_best_checkpoint, attach_early_stopping, attach_last_checkpoint, attach_lr_scheduler,
    attach_metrics_log, attach_nan_guard, attach_progress_bar, attach_sampler_epoch, attach_tensorboard,
    attach_validation, training_state,
)
from ignite_trainer.runs.logs import progress_bar_wanted
from ignite_trainer.training.decisions import attach_decision_fitting, attach_threshold_tuning
from ignite_trainer.training.tensorboard import attach_pr_curves
from ignite_trainer.training.temperature import attach_temperature_fitting
from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.training.tensorboard import attach_epoch_tensorboard

__all__ = ["StandardHandlers", "attach_standard_handlers"]

log = logging.getLogger("ignite_trainer")


@dataclass
class StandardHandlers:
    """Every handler `attach_standard_handlers` attached (None where the config or rank left one out).

    ``to_save`` is what the checkpoints hold; ``restored_iteration`` the trainer iteration a resume started
    from (0 for a new run). Call `close` after ``trainer.run`` (in a ``finally``).
    """

    sampler_epoch: Callable[[Engine], None] | None
    nan_guard: Callable[[Engine], None]
    validation: Callable[[Engine], None]
    threshold_tuning: Callable[[Engine], None]
    lr_scheduler: LRScheduler | None
    early_stopping: EarlyStopping | None
    best_checkpoint: Checkpoint
    last_checkpoint: Checkpoint
    to_save: dict[str, Any]
    restored_iteration: int = 0
    metrics_log: MetricsLogWriter | None = None
    tensorboard: TensorboardLogger | None = None
    epoch_tensorboard: TensorboardLogger | None = None
    pr_curves: Callable[[Engine], None] | None = None
    epoch_lines: EpochLines | None = None
    progress_bar: ProgressBar | None = None
    checkpoint_dir: Path | None = field(default=None, repr=False)
    decision_fitting: Callable[[Engine], None] | None = None
    temperature_fitting: Callable[[Engine], None] | None = None

    def close(self) -> None:
        """Flush and close TensorBoard; on the saving rank, remove temp files an interrupted save left behind."""
        if self.progress_bar is not None and self.progress_bar.pbar is not None:
            self.progress_bar.pbar.close()  # a bar left open after an error would overdraw the error's line
        for tb in (self.tensorboard, self.epoch_tensorboard):
            if tb is not None:
                tb.close()
        if self.checkpoint_dir is not None:
            clean_partial_files(self.checkpoint_dir)


def _calibration_dict(trainer: Engine) -> dict[str, Any] | None:
    calibration = getattr(trainer.state, "calibration", None)
    return None if calibration is None else calibration.to_dict()


def _decision_dict(trainer: Engine) -> dict[str, Any] | None:
    decision = getattr(trainer.state, "decision", None)
    return None if decision is None else decision.to_dict()


def attach_standard_handlers(
    trainer: Engine, evaluator: Engine, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    train_loader: Any, val_loader: Any, val_dataset: Any, config: TrainConfig, run_dir: str | Path,
    scaler: torch.amp.GradScaler | None = None, extra_to_save: Mapping[str, Any] | None = None,
    resume_from: str | Path | None = None, writes_logs: bool | None = None,
) -> StandardHandlers:
    """Attach validation, thresholds, the decision layer, early stopping, checkpoints, LR schedule and loggers, in order.

    ``evaluator`` must carry a `PredictionCollector` named ``PREDICTIONS`` (threshold tuning and PR curves
    read it). ``extra_to_save`` adds objects of a custom script to both checkpoints. With ``resume_from``
    every checkpointed object is restored before the loggers open. ``writes_logs`` (default: rank 0)
    attaches the metrics log, TensorBoard (per iteration in ``tb/``, per epoch with PR curves in
    ``tb/epoch/``), the epoch lines and the progress bar (``config.progress``; by default only on a terminal).

    Example::

        handlers = attach_standard_handlers(trainer, evaluator, model=model, optimizer=optimizer,
                                            train_loader=train_loader, val_loader=val_loader,
                                            val_dataset=val_dataset, config=config, run_dir="runs/x")
        try:
            trainer.run(train_loader, max_epochs=config.epochs)
        finally:
            handlers.close()
    """
    directory = RunDirectory(Path(run_dir))
    writes_logs = idist.get_rank() == 0 if writes_logs is None else writes_logs
    sampler_epoch = attach_sampler_epoch(trainer, train_loader)
    nan_guard = attach_nan_guard(trainer, where=f"; resume from the last good checkpoint with --resume {run_dir}")
    validation = attach_validation(trainer, evaluator, val_loader)
    # before thresholds and the decision layer: with config.calibrate they are tuned on calibrated probabilities
    temperature_fitting = attach_temperature_fitting(trainer, PREDICTIONS, val_dataset, aggregation=config.aggregation,
                                                     applied=config.calibrate,
                                                     run_dir=directory.path if writes_logs else None)
    tuning = attach_threshold_tuning(trainer, PREDICTIONS, config.threshold_objective, val_dataset)
    decision_fitting = attach_decision_fitting(trainer, PREDICTIONS, val_dataset, config.aggregation)
    cosine = config.scheduler == "cosine_annealing"
    scheduler = (attach_lr_scheduler(trainer, optimizer, config.epochs, config.warmup_epochs, cosine)
                 if cosine or config.warmup_epochs else None)

    to_save: dict[str, Any] = {
        "model_state_dict": model,
        "optimizer_state_dict": optimizer,
        "trainer": trainer,
        "rng": RNGStates(),
        **training_state(trainer, config.to_dict()),
        "thresholds": Snapshot(lambda: getattr(trainer.state, "thresholds", None)),
        "decision": Snapshot(lambda: _decision_dict(trainer)),
        **(extra_to_save or {}),
    }
    if config.calibrate:  # a checkpoint that decides on calibrated probabilities carries its own temperatures
        to_save["calibration"] = Snapshot(lambda: _calibration_dict(trainer))
    if scaler is not None:
        to_save["scaler"] = scaler
    if scheduler is not None:
        to_save["lr_scheduler"] = scheduler
    early = None
    if config.early_stopping_patience > 0:
        early = to_save["early_stopping"] = attach_early_stopping(trainer, config.early_stopping_patience, config.monitor)
    best = attach_best_checkpoint(trainer, to_save, directory.checkpoints, config.monitor, config.n_saved_best)
    last = attach_last_checkpoint(trainer, {**to_save, "best_checkpointer": best}, directory.checkpoints)
    # Only the saving rank may clean up temp files: another rank finishing first would delete a file being written.
    handlers = StandardHandlers(sampler_epoch, nan_guard, validation, tuning, scheduler, early, best, last, to_save,
                                checkpoint_dir=directory.checkpoints if idist.get_rank() == 0 else None,
                                decision_fitting=decision_fitting, temperature_fitting=temperature_fitting)
    if resume_from is not None:
        handlers.restored_iteration = restore(resume_from, {**to_save, "best_checkpointer": best, "checkpointer": last},
                                              map_location="cpu")
        log.info("resumed from %s (epoch %s)", resume_from, trainer.state.epoch)
    if writes_logs:
        handlers.metrics_log = attach_metrics_log(trainer, optimizer, directory.metrics_log.path)
        tb = handlers.tensorboard = attach_tensorboard(trainer, optimizer, directory.tensorboard,
                                                       purge_step=handlers.restored_iteration + 1 if resume_from else None)
        tb_epoch = handlers.epoch_tensorboard = attach_epoch_tensorboard(
            trainer, directory.tensorboard / "epoch", monitor=config.monitor, val_dataset=val_dataset,
            best_checkpoint=best)
        handlers.pr_curves = attach_pr_curves(trainer, tb_epoch, PREDICTIONS, val_dataset)
        # tensorboardX buffers events; flush before the epoch's last checkpoint so a kill after it loses none
        trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, lambda _: tb.writer.flush())
        handlers.epoch_lines = attach_epoch_lines(trainer, optimizer, config.monitor)
        if progress_bar_wanted(config.progress):
            handlers.progress_bar = attach_progress_bar(trainer)
    return handlers
