"""Compose a whole training run from a `TrainConfig`: `train`, the function the CLI and scripts call.

`train` opens the run once (`rundir.open_run`: every input check, then the run directory), then starts
`training_process` on every rank (`launch`). Each rank builds the same model, loaders and engines and
attaches the standard handlers (`standard.attach_standard_handlers`); only rank 0 writes logs, and
Ignite's `Checkpoint` saves on rank 0. Under ``torchrun`` every rank enters `train`: rank 0 opens the
run and broadcasts the outcome, so both launch paths open a run the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import ignite.distributed as idist
import torch
from ignite.engine import Engine

from ignite_trainer.checkpoint import Snapshot
from ignite_trainer.config import TrainConfig
from ignite_trainer.data.datasets import EvalWindows, TrainWindows
from ignite_trainer.data.loaders import make_eval_loader, make_train_loader
from ignite_trainer.data.prepare import PreparedData, checked_data, prepare_data
from ignite_trainer.engine import create_evaluator, create_trainer
from ignite_trainer.graceful import GracefulStop, TrainingStopped
from ignite_trainer.launch import broadcast_from_rank0, run_joined, run_spawned
from ignite_trainer.logs import quiet_non_zero_rank, setup_logging
from ignite_trainer.losses import WeightedBCELoss
from ignite_trainer.metrics import MaskedLoss, PerLabelMetrics
from ignite_trainer.models import build_model
from ignite_trainer.predictions import PredictionCollector
from ignite_trainer.preflight import check_settings, check_training_set
from ignite_trainer.run_record import end_environment, record_environment, run_identity, write_split
from ignite_trainer.rundir import OpenedRun, RunDirectory, open_run
from ignite_trainer.runtime import distributed_backend, resolve_device, seed_everything, torchrun_world_size
from ignite_trainer.standard import attach_standard_handlers

__all__ = ["train", "training_process", "SetupHook"]

log = logging.getLogger("ignite_trainer")

#: ``setup(trainer, evaluator)``: research code hooked on after the standard handlers, before training.
SetupHook = Callable[[Engine, Engine], None]


def train(config: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          overrides: dict[str, Any] | None = None, setup: SetupHook | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns a summary with ``run_dir``, ``finished`` and the last epoch's scores.

    With ``resume``, the run's saved config is used and ``overrides`` (explicit command-line values) may
    only change fields that do not affect the result (device, workers, progress bar, ...).
    ``setup(trainer, evaluator)`` runs in every process after the standard handlers are attached and
    before training starts: the place to hook research code onto `TrainerEvents` (with more than one
    process it must be a module-level function, so that it can be sent to the workers).

    Example::

        from ignite_trainer import TrainConfig, train
        summary = train(TrainConfig(epochs=5, name="quick"))
        print(summary["run_dir"], summary["metrics"]["murmur"]["f1"])
    """
    if torchrun_world_size() > 1 and config.nproc_per_node == 1:
        overrides = overrides or {}
        backend = distributed_backend(overrides.get("backend") or config.backend,
                                      overrides.get("device") or config.device)
        result: dict[str, Any] = {}
        run_joined(_torchrun_rank, (config, resume, overwrite, overrides, setup, result), backend)
        return result

    def validate(checked_config: TrainConfig) -> PreparedData:
        check_settings(checked_config)
        data = checked_data(checked_config)
        check_training_set(checked_config, len(data.train))
        return data

    run = open_run(config, resume=resume, overwrite=overwrite, overrides=overrides, validate=validate,
                   identify=run_identity)
    if run.finished:
        return _finished_summary(run)
    data = run.checked
    assert data is not None
    _record_start(run, data)
    setup_logging(run.directory.train_log)
    log.info("data %s: %d train / %d validation recordings (%d / %d patients)", data.source, len(data.train),
             len(data.val), len({r.patient_id for r in data.train}), len({r.patient_id for r in data.val}))
    config = run.config
    with _session(run.directory.path):
        run_spawned(training_process, (config, run.directory.path, data, run.resume_from, setup),
                    config.nproc_per_node, distributed_backend(config.backend, config.device), run.directory.path)
    return {"run_dir": run.directory.path, "finished": True, "already_finished": False,
            "metrics": run.directory.metrics_log.last(), "skipped": data.skipped}


def _record_start(run: OpenedRun, data: PreparedData) -> None:
    """``split.json`` (a new run) and this session in ``environment.json``."""
    if run.resume_from is None:
        write_split(run.directory.path, run.config, data)
    record_environment(run.directory.path, str(resolve_device(run.config.device)))


@contextlib.contextmanager
def _session(run_dir: Path) -> Iterator[None]:
    """Close this session in ``environment.json`` with how it ended."""
    outcome = "failed"
    try:
        yield
        outcome = "finished"
    except TrainingStopped as e:
        outcome = f"stopped by {e.signal_name}"
        raise
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    finally:
        end_environment(run_dir, outcome)


def _finished_summary(run: OpenedRun) -> dict[str, Any]:
    return {"run_dir": run.directory.path, "finished": True, "already_finished": True, "epoch": run.epoch,
            "metrics": run.directory.metrics_log.last()}


def _torchrun_rank(local_rank: int, config: TrainConfig, resume: str | Path | None, overwrite: bool,
                   overrides: dict[str, Any], setup: SetupHook | None, result: dict[str, Any]) -> None:
    """`train` on one rank that ``torchrun`` started: rank 0 opens the run, every rank learns the outcome;
    each node's local rank 0 fills the feature cache before the node's other ranks read it."""
    world = idist.get_world_size()

    def open_on_rank0() -> OpenedRun:
        def validate(checked_config: TrainConfig) -> PreparedData:
            check_settings(checked_config, world)
            data = checked_data(checked_config)  # fills the cache too
            check_training_set(checked_config, len(data.train), world)
            return data

        run = open_run(config, resume=resume, overwrite=overwrite, overrides=overrides, validate=validate,
                       identify=run_identity)
        if not run.finished:
            _record_start(run, run.checked)
        setup_logging(run.directory.train_log)
        return dataclasses.replace(run, checked=None)  # every rank prepares its own; no need to broadcast it

    run = broadcast_from_rank0(open_on_rank0)
    if run.finished:
        result.update(_finished_summary(run))
        return
    if idist.get_local_rank() != 0:
        idist.barrier()  # wait until this node's feature cache is filled
    data = prepare_data(run.config)
    if idist.get_local_rank() == 0:
        idist.barrier()
    if idist.get_rank() == 0:
        with _session(run.directory.path):
            training_process(local_rank, run.config, run.directory.path, data, run.resume_from, setup)
    else:
        training_process(local_rank, run.config, run.directory.path, data, run.resume_from, setup)
    result.update(run_dir=run.directory.path, finished=True, already_finished=False,
                  metrics=run.directory.metrics_log.last(), skipped=data.skipped)


def training_process(local_rank: int, config: TrainConfig, run_dir: Path, data: PreparedData,
                     resume_path: Path | None, setup: SetupHook | None = None) -> None:
    """Everything one rank does: build the model, loaders and engines, attach the standard handlers
    (restoring them on resume), run the setup hook, train."""
    rank = idist.get_rank()
    device = idist.device() if idist.get_world_size() > 1 else resolve_device(config.device)
    seed_everything(config.seed)
    if rank == 0:
        setup_logging(RunDirectory(run_dir).train_log)  # a spawned rank 0 starts without the parent's handlers
    else:
        quiet_non_zero_rank()

    model = idist.auto_model(build_model(config.model, n_mels=config.n_mels))
    optimizer = idist.auto_optim(torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                                   weight_decay=config.weight_decay))
    loss_fn = WeightedBCELoss(*config.pos_weight).to(device)

    cache = data.feature_cache()
    identity = run_identity(config, data)  # in every checkpoint: a resume checks it is this run's
    train_loader = make_train_loader(TrainWindows(data.train, cache, config.window_seconds), config.batch_size,
                                     config.num_workers, device)
    val_dataset = EvalWindows(data.val, cache, config.window_seconds)
    val_loader = make_eval_loader(val_dataset, config.batch_size, config.num_workers, device)

    # fp16 autocast on CUDA needs loss scaling; the one scaler is created here and checkpointed with the run
    scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
    trainer = create_trainer(model, optimizer, loss_fn, device, gradient_clip=config.gradient_clip, amp=config.amp,
                             accumulation_steps=config.accumulation_steps, scaler=scaler)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn, device=device),
                                         "labels": PerLabelMetrics(device=device),
                                         "predictions": PredictionCollector(device=device)}, device, amp=config.amp)
    handlers = attach_standard_handlers(
        trainer, evaluator, model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        val_dataset=val_dataset, config=config, run_dir=run_dir, scaler=scaler,
        extra_to_save={"run_identity": Snapshot(lambda: identity)}, resume_from=resume_path, writes_logs=rank == 0)
    if setup is not None:
        setup(trainer, evaluator)
    stop = None
    if idist.get_world_size() == 1:  # several ranks would have to agree on where to stop: not supported yet
        stop = GracefulStop(handlers.last_checkpoint, run_dir, config.accumulation_steps)
        stop.attach(trainer)
    try:
        with stop.installed() if stop is not None else contextlib.nullcontext():
            trainer.run(train_loader, max_epochs=config.epochs)
    finally:
        handlers.close()
    if stop is not None:
        stop.raise_if_stopped()
    if idist.get_world_size() > 1:
        # Leave together: a rank that tore down its gloo group while rank 0 was still closing its files
        # died with SIGABRT ("terminate called without an active exception") in 2 of 12 runs.
        idist.barrier()
