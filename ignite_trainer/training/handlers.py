"""``attach_*`` functions: each wires one of Ignite's handlers (or a small one of ours) to the trainer.

Each returns the object it registered (or, for Ignite's loggers, the logger whose handlers it registered),
so a custom script can keep, inspect, checkpoint or remove it: ``trainer.has_event_handler(returned)`` is
true and ``trainer.remove_event_handler(returned, event)`` detaches it.

Handlers on one event run in the order they were attached, and several read what an earlier one left in
``trainer.state``; `standard.attach_standard_handlers` attaches the whole set in the one order that is
right, and says why. Use it rather than re-deriving the order.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EarlyStopping, LRScheduler, ProgressBar, TensorboardLogger
from torch.utils.data import DistributedSampler

from ignite_trainer.data.loaders import set_sampler_position
from ignite_trainer.runs.checkpoint import BEST_PATTERN, LAST_PATTERN, SafeDiskSaver, Snapshot
from ignite_trainer.training.engine import StepEvents, read_step_stats
from ignite_trainer.core.errors import TrainingAborted
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.runs.rundir import MetricsLog
from ignite_trainer.core.vocabulary import LABELS, STATS, VAL_LOSS, score_sign

log = logging.getLogger("ignite_trainer")


def attach_validation(trainer: Engine, evaluator: Engine, loader: Any, every: int = 1) -> Callable[[Engine], None]:
    """Run ``evaluator`` over ``loader`` after every ``every`` epochs, then fire ``VALIDATION_COMPLETED``.

    The evaluator's scalar metrics are copied to ``trainer.state.validation_metrics`` so that handlers
    on the trainer (early stopping, checkpoints, loggers, research hooks) all read one place.

    Example::

        attach_validation(trainer, evaluator, val_loader)
        trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED,
                                  lambda e: print(e.state.validation_metrics["murmur.f1"]))
    """

    def validate(engine: Engine) -> None:
        started = time.perf_counter()
        state = evaluator.run(loader)
        # None is an undefined score (n/a), kept so that every reader sees the same keys every epoch
        engine.state.validation_metrics = {k: None if v is None else _scalar(v) for k, v in state.metrics.items()
                                           if v is None or _is_scalar(v)}
        engine.state.validation_output = state
        engine.state.validation_seconds = time.perf_counter() - started
        engine.fire_event(TrainerEvents.VALIDATION_COMPLETED)

    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=every), validate)
    return validate


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)


def _scalar(v: Any) -> float:
    return float(v.item() if torch.is_tensor(v) else v)


def monitored_score(monitor: str) -> Callable[[Engine], float | None]:
    """A score function over ``trainer.state.validation_metrics`` where larger is better.

    It returns None when the score is undefined this epoch (e.g. ``murmur.f1`` on a validation split
    without murmur positives): early stopping and the best checkpoint then skip the epoch, neither
    counting it as an improvement nor against the patience.
    """
    sign = score_sign(monitor)

    def score(engine: Engine) -> float | None:
        value = engine.state.validation_metrics.get(monitor)
        return None if value is None else sign * value

    return score


def _skip_undefined(engine: Engine, monitor: str, what: str) -> bool:
    """True (and one warning per epoch) when the monitored score is undefined this epoch."""
    if engine.state.validation_metrics.get(monitor) is not None:
        return False
    if getattr(engine.state, "_undefined_warned", None) != engine.state.epoch:
        engine.state._undefined_warned = engine.state.epoch
        log.warning("epoch %d: %s is undefined on this validation split; the epoch is not compared for %s",
                    engine.state.epoch, monitor, what)
    return True


class ValidationEarlyStopping(EarlyStopping):
    """Ignite's `EarlyStopping` that also records ``state.early_stopped_epoch`` and ``state.early_stop_reason``
    (the sentence the epoch lines log after the epoch's line; Ignite's own "Stop training" line is silenced),
    fires ``EARLY_STOPPED``, and skips an epoch whose monitored score is undefined."""

    def __init__(self, *args: Any, monitor: str = VAL_LOSS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = monitor
        self.logger.setLevel(logging.WARNING)

    def __call__(self, engine: Engine) -> None:
        if _skip_undefined(engine, self.monitor, "early stopping and the best checkpoint"):
            return
        super().__call__(engine)
        if self.counter >= self.patience and engine.should_terminate:
            engine.state.early_stopped_epoch = engine.state.epoch
            engine.state.early_stop_reason = (f"early stopping at epoch {engine.state.epoch}: {self.monitor} has not "
                                              f"improved for {self.patience} epochs")
            engine.fire_event(TrainerEvents.EARLY_STOPPED)


def attach_early_stopping(trainer: Engine, patience: int, monitor: str = VAL_LOSS) -> ValidationEarlyStopping:
    """Ignite's `EarlyStopping` on the monitored validation score; fires ``EARLY_STOPPED`` when it stops.

    It is attached to the trainer's ``VALIDATION_COMPLETED`` rather than with ``attach(evaluator,
    reset_engine=trainer)``: Ignite's ``reset_engine`` resets the counter when a run starts, which would
    throw away a counter just restored from a checkpoint.

    Example::

        es = attach_early_stopping(trainer, patience=15, monitor="macro_f1")
        assert trainer.has_event_handler(es)
    """
    handler = ValidationEarlyStopping(patience=patience, score_function=monitored_score(monitor), trainer=trainer,
                                      monitor=monitor)
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, handler)
    return handler


def epoch_step(engine: Engine, _event: Any = None) -> int:
    return engine.state.epoch


class BestCheckpoint(Checkpoint):
    """Ignite's `Checkpoint` kept by score that also records ``state.best_model_path``/``best_score`` and
    fires ``BEST_MODEL_SAVED`` whenever it writes a new file."""

    def __init__(self, *args: Any, monitor: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = monitor

    def __call__(self, engine: Engine) -> None:
        if _skip_undefined(engine, self.monitor, "early stopping and the best checkpoint"):
            return
        before = self.last_checkpoint
        super().__call__(engine)
        if self.last_checkpoint is not None and self.last_checkpoint != before:
            engine.state.best_model_path = Path(self.last_checkpoint)
            engine.state.best_score = engine.state.validation_metrics[self.monitor]
            engine.fire_event(TrainerEvents.BEST_MODEL_SAVED)


def attach_best_checkpoint(
    trainer: Engine, to_save: Mapping[str, Any], dirname: str | Path, monitor: str = VAL_LOSS, n_saved: int = 1
) -> BestCheckpoint:
    """Keep the ``n_saved`` best checkpoints by the monitored score; fire ``BEST_MODEL_SAVED`` on each new one.

    Files are named by `checkpoint.BEST_PATTERN` (val_loss is stored negated, so that larger is better, as
    Ignite's `Checkpoint` expects); `checkpoint.find_best_checkpoint` reads them back.

    Example::

        best = attach_best_checkpoint(trainer, {"model_state_dict": model}, "runs/x/checkpoints", "macro_f1")
    """
    score_name = f"neg_{monitor}" if score_sign(monitor) < 0 else monitor
    best = BestCheckpoint(
        to_save, SafeDiskSaver(dirname), score_function=monitored_score(monitor), score_name=score_name,
        n_saved=n_saved, global_step_transform=epoch_step, filename_pattern=BEST_PATTERN, monitor=monitor,
    )
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, best)
    return best


def attach_last_checkpoint(trainer: Engine, to_save: Mapping[str, Any], dirname: str | Path, n_saved: int = 2) -> Checkpoint:
    """Save the full resume state after every epoch (`checkpoint.LAST_PATTERN`), keeping ``n_saved``.

    Saved at ``EPOCH_COMPLETED``; a graceful stop (`graceful.GracefulStop`) calls the same handler
    mid-epoch, where the trainer's iteration tells the sampler where to resume (`set_sampler_position`).
    Two files are kept so that one survives any kill.

    Example::

        run = RunDirectory(run_dir)  # the run directory's paths (runs.rundir)
        to_save = {"model_state_dict": model, "optimizer_state_dict": optimizer, "trainer": trainer}
        attach_last_checkpoint(trainer, to_save, run.checkpoints)
    """
    last = Checkpoint(
        to_save, SafeDiskSaver(dirname), n_saved=n_saved, global_step_transform=epoch_step, include_self=True,
        filename_pattern=LAST_PATTERN,
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, last)
    return last


def attach_lr_scheduler(trainer: Engine, optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0,
                        cosine: bool = True) -> LRScheduler:
    """Cosine annealing over ``epochs``, stepped once per epoch, through Ignite's `LRScheduler`; with
    ``warmup_epochs`` a linear warm-up first (`WarmupSchedule`).

    ``use_legacy=True`` attached at ``EPOCH_COMPLETED`` reproduces
    ``torch.optim.lr_scheduler.CosineAnnealingLR`` stepped after each epoch exactly; the default mode
    (attached at ``EPOCH_STARTED``) calls the recursive ``get_lr`` out of step and gives a wrong second value.
    Without warm-up the scheduler is that `CosineAnnealingLR`, as for every run before warm-up existed (its
    resumes continue bit for bit). With warm-up it is a ``LambdaLR`` over a `WarmupSchedule`, whose factor is
    a closed form of the epoch count, so the checkpointed ``last_epoch`` restores it exactly.

    Example::

        to_save["lr_scheduler"] = attach_lr_scheduler(trainer, optimizer, epochs=100, warmup_epochs=5)
    """
    if warmup_epochs:
        torch_scheduler: Any = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupSchedule(warmup_epochs, epochs, cosine))
    elif cosine:
        torch_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    else:
        raise ValueError("attach_lr_scheduler: neither warm-up nor cosine annealing: no schedule to attach")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please make sure to attach scheduler")
        scheduler = LRScheduler(torch_scheduler, use_legacy=True)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, scheduler)
    return scheduler


class WarmupSchedule:
    """The learning-rate factor of the epoch after ``completed`` epochs: ``(completed + 1) / warmup`` during
    the first ``warmup`` epochs (the first epoch trains at ``lr / warmup``, epoch ``warmup`` at ``lr``), then
    cosine annealing from 1 towards 0 over the remaining ``epochs - warmup`` epochs (``cosine``), else 1.

    A class, not a lambda, so that ``LambdaLR.state_dict`` keeps its settings in the checkpoint.

    Example:

        >>> [round(WarmupSchedule(2, 4)(e), 3) for e in range(4)]
        [0.5, 1.0, 1.0, 0.5]
    """

    def __init__(self, warmup: int, epochs: int, cosine: bool = True) -> None:
        self.warmup, self.epochs, self.cosine = int(warmup), int(epochs), bool(cosine)

    def __call__(self, completed: int) -> float:
        if completed < self.warmup:
            return (completed + 1) / self.warmup
        if not self.cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (completed - self.warmup) / max(1, self.epochs - self.warmup)))


def attach_nan_guard(trainer: Engine, where: str = "") -> Callable[[Engine], None]:
    """Stop training with `TrainingAborted` naming the epoch and iteration of the first non-finite loss or gradient.

    Ignite's `TerminateOnNan` returns normally after the weights are already non-finite and builds a
    tensor every iteration; the update step here never applies a non-finite step and records the first one
    in ``trainer.state.step_stats``, so this guard reads those stats when they reach the host
    (``StepEvents.STATS_READ``, every ``sync_every`` iterations and at each epoch's end, always before the
    epoch's checkpoints) and names the first bad iteration however late it reads them. With the host check
    (CPU) the step's own output says at once that it was not finite, and the stats are read then, so
    training stops on that very iteration. The last checkpoint written stays good and resumable.

    Example::

        attach_nan_guard(trainer, where="; resume with --resume runs/x")
        trainer.run(train_loader, max_epochs=10)   # raises TrainingAborted naming the first non-finite step
    """
    def guard(engine: Engine) -> None:
        stats = engine.state.step_stats
        if stats.first_bad_iteration is None:
            return
        loss, norm = stats.first_bad_loss, stats.first_bad_grad_norm
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        raise TrainingAborted(
            f"non-finite {what} ({value}) at epoch {stats.first_bad_epoch}, iteration {stats.first_bad_iteration}; "
            f"the step was not applied and no non-finite weights were saved{where}"
        )

    def read_at_once(engine: Engine) -> None:
        if engine.state.output.get("finite", True) is False:  # a Python False: the host check, nothing to wait for
            read_step_stats(engine)

    trainer.add_event_handler(StepEvents.STATS_READ, guard)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, read_at_once)
    return guard


def attach_progress_bar(trainer: Engine) -> ProgressBar:
    """Ignite's `ProgressBar` (tqdm) with the running training loss; attach it on rank 0 only.

    Example::

        attach_progress_bar(trainer)
    """
    bar = ProgressBar(persist=False)
    bar.attach(trainer, output_transform=lambda out: {"loss": out["loss"]})
    return bar


def attach_tensorboard(
    trainer: Engine, optimizer: torch.optim.Optimizer, log_dir: str | Path, purge_step: int | None = None
) -> TensorboardLogger:
    """Ignite's `TensorboardLogger` (tensorboardX writer): per iteration the training loss, learning rate
    and pre-clip gradient norm. Validation scores are per epoch and live in their own folder
    (`tensorboard_epoch.attach_epoch_tensorboard`): a purge step counts in one unit only.

    Every tag is stepped by the trainer's iteration, so that on resume ``purge_step`` (the first
    iteration after the checkpoint) hides whatever a killed run logged past it and steps stay monotonic.
    The returned logger's ``writer`` is a tensorboardX ``SummaryWriter`` that research hooks may share.

    Example::

        run = RunDirectory(run_dir)  # the run directory's paths (runs.rundir)
        tb = attach_tensorboard(trainer, optimizer, run.tensorboard)
        try:
            trainer.run(train_loader, max_epochs=10)
        finally:
            tb.close()
    """
    # tensorboardX names a file by the second it was opened and truncates a file of the same name: a resume
    # within the same second would erase the earlier iterations. The nanosecond suffix keeps names apart.
    tb = TensorboardLogger(log_dir=str(log_dir), purge_step=purge_step, filename_suffix=f".{time.time_ns()}")

    def train_scalars(out: Mapping[str, Any]) -> dict[str, float]:
        return {k: out[k] for k in ("loss", "grad_norm") if math.isfinite(out[k])}

    tb.attach_output_handler(trainer, event_name=Events.ITERATION_COMPLETED, tag="train", output_transform=train_scalars)
    tb.attach_opt_params_handler(trainer, event_name=Events.ITERATION_STARTED, optimizer=optimizer)
    return tb


class MetricsLogWriter:
    """Writes one `rundir.MetricsLog` record per validated epoch; the LR is the one the epoch trained with.

    The LR is read when the epoch *starts*: read at validation time it would depend on whether the
    scheduler (also on ``EPOCH_COMPLETED``) happened to be attached before or after validation.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
        self.optimizer = optimizer
        self.log = MetricsLog(path)
        self.lr: float | None = None

    def capture_lr(self, engine: Engine) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]

    def __call__(self, engine: Engine) -> None:
        m = engine.state.validation_metrics
        thresholds = getattr(engine.state, "thresholds", None)
        record: dict[str, Any] = {
            "epoch": engine.state.epoch,
            "train_loss": _scalar(engine.state.metrics["train_loss"]),
            "val_loss": m.get("val_loss"),
            "lr": self.lr if self.lr is not None else self.optimizer.param_groups[0]["lr"],
            "seconds": round(engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0, 4),
            "val_seconds": round(getattr(engine.state, "validation_seconds", 0.0), 4),
            "macro_f1": m.get("macro_f1"),
        }
        tuned = getattr(engine.state, "threshold_scores", None) or {}
        for label in LABELS:
            record[label] = {k: m.get(f"{label}.{k}") for k in STATS}
            if thresholds is not None:
                record[label]["threshold"] = thresholds.get(label)
            if label in tuned:
                record[label]["at_threshold"] = {k: tuned[label][k] for k in (*STATS, "tp", "fp", "fn", "tn")}
        self.log.append(record)


def attach_metrics_log(trainer: Engine, optimizer: torch.optim.Optimizer, path: str | Path) -> MetricsLogWriter:
    """Append one JSON line per validated epoch to ``path`` (``metrics.jsonl``), flushed and fsynced.

    Keys: ``epoch``, ``train_loss``, ``val_loss``, ``lr`` (the rate used during the epoch), ``seconds``
    (training), ``val_seconds``, ``macro_f1``, and ``heart``/``murmur`` objects with ``accuracy``,
    ``precision``, ``recall``, ``sensitivity``, ``specificity``, ``f1`` and, when thresholds are tuned
    (``trainer.state.thresholds``), ``threshold`` and ``at_threshold`` (the same ratios and the confusion
    counts per validation *recording* at that threshold; the other ratios are per window at 0.5). Undefined
    ratios are null. Read it back with `rundir.MetricsLog`.

    Example::

        run = RunDirectory(run_dir)  # the run directory's paths (runs.rundir)
        writer = attach_metrics_log(trainer, optimizer, run.metrics_file)
        assert trainer.has_event_handler(writer)
    """
    writer = MetricsLogWriter(optimizer, path)
    trainer.add_event_handler(Events.EPOCH_STARTED, writer.capture_lr)
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, writer)
    return writer


def attach_sampler_epoch(trainer: Engine, loader: Any) -> Callable[[Engine], None] | None:
    """Point the sampler at each epoch (`set_sampler_position`): Ignite never calls ``set_epoch``, so a
    `DistributedSampler` would repeat the same shuffle every epoch, and after a resume from a checkpoint
    written inside an epoch an `EpochSampler` must skip the batches already trained on. Returns the
    handler, or None (nothing attached) for a loader without such a sampler.

    Example::

        attach_sampler_epoch(trainer, train_loader)
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return None

    def set_epoch(engine: Engine) -> None:
        set_sampler_position(sampler, engine)  # also the next batch, after a resume from a mid-epoch checkpoint

    trainer.add_event_handler(Events.EPOCH_STARTED, set_epoch)
    return set_epoch


def _all_iterations_done(trainer: Engine) -> bool:
    """The last epoch is complete (a checkpoint written mid-way through it, at a graceful stop, is not)."""
    state = trainer.state
    if state.epoch_length is None:
        return state.epoch >= state.max_epochs
    return state.iteration >= state.max_epochs * state.epoch_length


def training_state(trainer: Engine, config: Mapping[str, Any]) -> dict[str, Snapshot]:
    """The plain values every checkpoint carries at its top level (``epoch``, ``val_loss``, ``finished``, ``config``,
    ``torch_threads``).

    ``finished`` is true once the run reached its last epoch or stopped early: resuming it has nothing to
    do. A run stopped any other way (a kill, a time limit, a hook calling ``terminate()``) resumes.
    ``torch_threads`` is the torch intra-op thread count training runs with: CPU float sums depend on it, and
    a resume trains with it again (`runtime.training_threads`).

    Example::

        run = RunDirectory(run_dir)  # the run directory's paths (runs.rundir)
        to_save = {"model_state_dict": model, "trainer": trainer, **training_state(trainer, config.to_dict())}
        attach_best_checkpoint(trainer, to_save, run.checkpoints)   # files hold epoch, val_loss, ...
    """
    return {
        "epoch": Snapshot(lambda: trainer.state.epoch),
        "val_loss": Snapshot(lambda: getattr(trainer.state, "validation_metrics", {}).get("val_loss")),
        "finished": Snapshot(lambda: _all_iterations_done(trainer)
                             or getattr(trainer.state, "early_stopped_epoch", None) is not None),
        "config": Snapshot(lambda: dict(config)),
        "torch_threads": Snapshot(torch.get_num_threads),
    }
