"""Self-supervised pretraining (BYOL-A) of a registered model's trunk on recordings without labels: `pretrain`.

An Ignite `Engine` with the guarantees of training: the run directory is opened by `rundir.open_run`
(every input check first, nothing written on a bad input), checkpoints every epoch through Ignite's
`Checkpoint` (`handlers.attach_last_checkpoint`), an exact resume (model, projector, predictor, EMA target,
optimizer, LR schedule, RNG states, sampler position; a mid-epoch stop too), a graceful stop on
SIGINT/SIGTERM (`graceful.GracefulStop`), the non-finite guard, ``metrics.jsonl``, ``train.log``, TensorBoard
and one console line per epoch.

The config is the `TrainConfig` of training, not a config of its own: the shared settings (model, features,
window, batch size, learning rate, weight decay, schedule, epochs, seed, output folder, name, augmentation)
mean the same here, the few ``pretrain_*`` fields are ignored by training, and so the checkpoint's ``config``
and ``config.yaml`` are ordinary run configs that the fine-tuning side and `cli.py runs` read as they are.
Fields that only classification uses (labels, split, monitor, early stopping, thresholds) are ignored.

What the fine-tuning side relies on: every checkpoint holds under ``model_state_dict`` the state dict of the
plain model ``build_model(config.model, n_mels=config.n_mels)`` whose encoder (trunk, per-step projection
and pooling) is the learned online network and whose head is as initialised; ``config`` is the run's config
mapping. ``trunk.safetensors`` (`RunDirectory.trunk_file`), rewritten after every epoch's checkpoint, holds
the same weights with the config in its metadata, in the format of `cli.py export`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average

from ignite_trainer.core.atomic import atomic_path
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.core.vocabulary import FINITE, GRAD_NORM, LOSS, SAFETENSORS_FORMAT, TRAIN_LOSS
from ignite_trainer.data.datasets import TrainWindows
from ignite_trainer.data.loaders import make_train_loader
from ignite_trainer.data.prepare import PreparedData, prepare_unlabelled
from ignite_trainer.model.byol import BYOL
from ignite_trainer.model.registry import build_model
from ignite_trainer.runs.checkpoint import RNGStates, Snapshot, clean_partial_files, restore
from ignite_trainer.runs.lock import hold_run_lock
from ignite_trainer.runs.logs import progress_bar_wanted, setup_logging
from ignite_trainer.runs.record import record_environment, run_identity
from ignite_trainer.runs.rundir import MetricsLog, OpenedRun, RunDirectory, open_run
from ignite_trainer.training.engine import StepEvents, StepStats, prepare_batch, read_step_stats
from ignite_trainer.training.graceful import GracefulStop, TrainingStopped, recorded_session
from ignite_trainer.training.handlers import (
    attach_last_checkpoint, attach_lr_scheduler, attach_nan_guard, attach_progress_bar, attach_sampler_epoch,
    attach_tensorboard, training_state,
)
from ignite_trainer.training.preflight import check_settings, check_training_set
from ignite_trainer.training.runtime import intra_op_threads, resolve_device, seed_everything, training_threads
from ignite_trainer.training.views import ViewMaker

__all__ = ["pretrain", "pretraining_process", "create_pretrainer", "PRETRAIN_LOSS"]

log = logging.getLogger("ignite_trainer")

#: The key of the epoch's mean BYOL loss in ``metrics.jsonl`` (also ``train_loss``, which the runs table reads).
PRETRAIN_LOSS = "byol_loss"


def check_pretrain_settings(config: TrainConfig) -> None:
    """What pretraining refuses beyond `check_settings`: several processes, accumulation, demographics."""
    check_settings(config, world_size=1)
    if config.nproc_per_node != 1:
        raise ConfigError(f"nproc_per_node={config.nproc_per_node}: pretrain runs in one process; use 1")
    if config.accumulation_steps != 1:
        raise ConfigError(f"accumulation_steps={config.accumulation_steps}: pretrain steps every batch; use 1")
    if config.demographics:
        raise ConfigError("demographics=true: pretraining learns from recordings alone; leave demographics off")
    BYOL(build_model(config.model, n_mels=config.n_mels), ema=config.pretrain_ema,
         projector_dim=config.pretrain_projector_dim, hidden_dim=config.pretrain_hidden_dim)  # a model it can use


def pretrain(config: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False,
             overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Pretrain (or resume) a run on ``config.pretrain_data``; returns ``run_dir``, ``finished``, the last
    epoch's record (``metrics``) and the ``trunk`` file.

    Example::

        summary = pretrain(TrainConfig(pretrain_data=["wavs/"], epochs=20, name="byol-a"))
        print(summary["run_dir"], summary["trunk"])
    """
    def validate(checked: TrainConfig) -> PreparedData:
        check_pretrain_settings(checked)
        data = prepare_unlabelled(checked)
        check_training_set(checked, len(data.train))
        return data

    run: OpenedRun[PreparedData] = open_run(config, resume=resume, overwrite=overwrite, overrides=overrides,
                                            validate=validate, identify=run_identity)
    directory = run.directory
    if run.finished:
        return {"run_dir": directory.path, "finished": True, "already_finished": True, "epoch": run.epoch,
                "metrics": directory.metrics_log.last(), "trunk": directory.trunk_file}
    data = run.checked
    assert data is not None
    threads = training_threads(run.threads)
    record_environment(directory.path, str(resolve_device(run.config.device)), "off", threads)
    setup_logging(directory.train_log)
    log.info("pretrain data %s: %d recordings of %d patients", ", ".join(run.config.pretrain_data or []),
             len(data.train), len({r.patient_id for r in data.train}))
    with hold_run_lock(directory.path), recorded_session(directory.path):
        pretraining_process(run.config, directory.path, data, run.resume_from, threads)
    return {"run_dir": directory.path, "finished": True, "already_finished": False,
            "metrics": directory.metrics_log.last(), "trunk": directory.trunk_file, "skipped": data.skipped}


def create_pretrainer(byol: BYOL, optimizer: torch.optim.Optimizer, views: ViewMaker, device: torch.device, *,
                      gradient_clip: float = 1.0, amp: bool = False, sync_every: int = 50) -> Engine:
    """An Ignite `Engine` running one BYOL step per batch: two views, the symmetrised loss, backward, clipping
    (pre-clip norm reported), the optimizer step, then the EMA update of the target. A non-finite loss or
    gradient skips the step (and the EMA update) and is recorded in ``state.step_stats`` for the NaN guard.
    ``state.output`` is ``{"loss", "grad_norm", "finite"}`` as Python values; the epoch's mean loss is
    ``state.metrics["train_loss"]``.
    """
    params = [p for p in byol.online_parameters() if p.requires_grad]
    max_norm = gradient_clip if gradient_clip > 0 else math.inf
    stats = StepStats(device, sync_every)
    nan = torch.tensor(math.nan, device=device)

    def step(engine: Engine, batch: Any) -> dict[str, Any]:
        byol.train()
        x, _, _, index, _ = prepare_batch(batch, device)
        view1, view2 = views(x, index, engine.state.epoch)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = byol(view1, view2).float()
        loss_value = loss.item()
        iteration = engine.state.iteration
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            stats.record(iteration, loss, nan, torch.tensor(True, device=device))
            return {LOSS: loss_value, GRAD_NORM: math.nan, FINITE: False}
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = norm.item()
        finite = math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            byol.update_target()
        optimizer.zero_grad(set_to_none=True)
        stats.record(iteration, loss, norm, torch.tensor(not finite, device=device))
        return {LOSS: loss_value, GRAD_NORM: grad_norm, FINITE: finite}

    trainer = Engine(step)
    trainer.register_events(*StepEvents)
    trainer.state.step_stats = stats

    @trainer.on(Events.ITERATION_COMPLETED)
    def read_now_and_then(engine: Engine) -> None:
        length = engine.state.epoch_length
        if engine.state.iteration % sync_every == 0 or (length and engine.state.iteration % length == 0):
            read_step_stats(engine)

    Average(output_transform=lambda out: out[LOSS], device=device).attach(trainer, TRAIN_LOSS)
    return trainer


def pretraining_process(config: TrainConfig, run_dir: Path, data: PreparedData, resume_path: Path | None,
                        threads: int | None = None) -> None:
    """Build the model, views, loader and engine, attach the handlers (restoring them on resume) and run."""
    with intra_op_threads(threads):
        _pretrain(config, Path(run_dir), data, resume_path)


def _pretrain(config: TrainConfig, run_dir: Path, data: PreparedData, resume_path: Path | None) -> None:
    directory = RunDirectory(run_dir)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model = build_model(config.model, n_mels=config.n_mels)
    byol = BYOL(model, ema=config.pretrain_ema, projector_dim=config.pretrain_projector_dim,
                hidden_dim=config.pretrain_hidden_dim).to(device)
    optimizer = torch.optim.AdamW(byol.online_parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    dataset = TrainWindows(data.train, data.feature_cache(), config.window_seconds, seed=config.seed)
    loader = make_train_loader(dataset, config.batch_size, config.num_workers, device)
    trainer = create_pretrainer(byol, optimizer, ViewMaker.from_config(config), device,
                                gradient_clip=config.gradient_clip, amp=config.amp, sync_every=config.sync_every)
    identity = run_identity(config, data)

    attach_sampler_epoch(trainer, loader)
    attach_nan_guard(trainer, where=f"; resume from the last good checkpoint with pretrain --resume {run_dir}")
    epoch_log = _EpochLog(optimizer, directory.metrics_log, config.epochs)
    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_log.capture_lr)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_log)  # before the LR step and the checkpoint
    to_save: dict[str, Any] = {
        "model_state_dict": model,  # the plain registered model: what fine-tuning loads
        "byol_heads": byol.heads,  # projector, predictor and the EMA target
        "optimizer_state_dict": optimizer,
        "trainer": trainer,
        "rng": RNGStates(),
        **training_state(trainer, config.to_dict()),
        "run_identity": Snapshot(lambda: identity),
    }
    if config.scheduler == "cosine_annealing":
        to_save["lr_scheduler"] = attach_lr_scheduler(trainer, optimizer, config.epochs)
    last = attach_last_checkpoint(trainer, to_save, directory.checkpoints)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: write_trunk(directory.trunk_file, model, config,
                                                                                  engine.state.epoch))
    restored = 0
    if resume_path is not None:
        restored = restore(resume_path, {**to_save, "checkpointer": last}, map_location="cpu")
        log.info("resumed from %s (epoch %s)", resume_path, trainer.state.epoch)
    tb = attach_tensorboard(trainer, optimizer, directory.tensorboard,
                            purge_step=restored + 1 if resume_path is not None else None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: tb.writer.flush())
    bar = attach_progress_bar(trainer) if progress_bar_wanted(config.progress) else None
    stop = GracefulStop(last, run_dir, 1, command="pretrain")
    stop.attach(trainer)
    try:
        try:
            with stop.installed():
                trainer.run(loader, max_epochs=config.epochs)
        finally:
            if bar is not None and bar.pbar is not None:
                bar.pbar.close()
            tb.close()
            clean_partial_files(directory.checkpoints)
        stop.raise_if_stopped()
    except (TrainingStopped, KeyboardInterrupt):
        raise
    except BaseException as e:
        log.error("stopped by an error at epoch %s: %s: %s", trainer.state.epoch, type(e).__name__, e)
        raise


class _EpochLog:
    """One ``metrics.jsonl`` record and one console line per epoch (the LR is the one the epoch trained with)."""

    def __init__(self, optimizer: torch.optim.Optimizer, metrics: MetricsLog, epochs: int) -> None:
        self.optimizer, self.metrics, self.epochs = optimizer, metrics, epochs
        self.lr: float | None = None
        self.started = time.perf_counter()

    def capture_lr(self, _engine: Engine) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.started = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        loss = float(engine.state.metrics[TRAIN_LOSS])
        seconds = time.perf_counter() - self.started
        lr = self.lr if self.lr is not None else self.optimizer.param_groups[0]["lr"]
        self.metrics.append({"epoch": engine.state.epoch, "train_loss": loss, PRETRAIN_LOSS: loss, "lr": lr,
                             "seconds": round(seconds, 4)})
        log.info("epoch %d/%d  %s %.4f  lr %.2e  %.1f s", engine.state.epoch, self.epochs, PRETRAIN_LOSS, loss, lr,
                 seconds)


def write_trunk(path: Path, model: torch.nn.Module, config: TrainConfig, epoch: int) -> Path:
    """The plain model's weights as safetensors with the config in the metadata, in `cli.py export`'s format
    (no thresholds, no decision layer: the head is untrained), written atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": SAFETENSORS_FORMAT, "config": config.to_yaml(), "thresholds": "", "epoch": str(epoch),
                "decision": "", "source": "pretrain (BYOL-A): trunk learned, head untrained"}
    with atomic_path(path, durable=True) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    return path

