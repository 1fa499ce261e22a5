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
from typing import Any, Callable

import ignite.distributed as idist
import torch
import yaml
from ignite.engine import Engine

from ignite_trainer.core.atomic import atomic_write
from ignite_trainer.runs.checkpoint import Snapshot
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.training.augment import Augmenter
from ignite_trainer.core.augmentation import AugmentSettings
from ignite_trainer.training.console import best_summary, split_line, summary_lines
from ignite_trainer.data.bags import bag_loaders, training_items
from ignite_trainer.data.datasets import EvalWindows, ResidentFeatures, TrainWindows
from ignite_trainer.data.head_targets import HeadTargets
from ignite_trainer.data.features import FeatureSettings
from ignite_trainer.data.loaders import ResidentEvalLoader, ResidentTrainLoader, make_eval_loader, make_train_loader
from ignite_trainer.data.prepare import PreparedData, checked_data, prepare_data
from ignite_trainer.training.engine import create_evaluator, create_trainer
from ignite_trainer.training.finetune import apply_init, build_optimizer, with_model_front_end
from ignite_trainer.core.errors import ConfigError, DistributedFailure
from ignite_trainer.core.vocabulary import PER_LABEL, PREDICTIONS, VAL_LOSS
from ignite_trainer.training.graceful import GracefulStop, TrainingStopped, recorded_session
from ignite_trainer.training.launch import (
    broadcast_from_rank0, peer_loss_ends_run, run_joined, run_spawned, setup_barrier,
)
from ignite_trainer.runs.logs import quiet_non_zero_rank, setup_logging
from ignite_trainer.training.losses import WeightedBCELoss
from ignite_trainer.training.head_loss import HeadLoss
from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics
from ignite_trainer.model import cpu_kernels
from ignite_trainer.model.blocks import use_cpu_kernel
from ignite_trainer.model.registry import model_from_config
from ignite_trainer.training.metrics import PredictionCollector
from ignite_trainer.training.kernel import kernel_for_run, kernel_line
from ignite_trainer.training.preflight import check_settings, check_training_set
from ignite_trainer.runs.lock import hold_run_lock
from ignite_trainer.runs.record import record_environment, run_identity, write_split
from ignite_trainer.runs.rundir import OpenedRun, RunDirectory, open_run
from ignite_trainer.training.runtime import (
    distributed_backend, intra_op_threads, resolve_device, resolved_settings, seed_everything, torchrun_world_size,
    training_threads,
)
from ignite_trainer.training.standard import attach_standard_handlers
from ignite_trainer.training.tracking import attach_mlflow, close_mlflow

__all__ = ["train", "training_process", "SetupHook"]

log = logging.getLogger("ignite_trainer")

#: Beside config.yaml: what ``auto``/empty settings resolved to on the machine that ran (`runtime.resolved_settings`).

#: ``setup(trainer, evaluator)``: research code hooked on after the standard handlers, before training.
SetupHook = Callable[[Engine, Engine], None]


def train(config: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          overrides: dict[str, Any] | None = None, setup: SetupHook | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns a summary with ``run_dir``, ``finished``, the last epoch's scores
    (``metrics``) and the best checkpoint's description (``best``, `console.best_summary`), which it also logs.

    With ``resume``, the run's saved config is used and ``overrides`` (explicit command-line values) may
    only change fields that do not affect the result (device, workers, progress bar, ...), and training runs
    with the torch thread count the run recorded (the caller's count is restored afterwards).
    ``setup(trainer, evaluator)`` runs in every process after the standard handlers are attached and
    before training starts: the place to hook research code onto `TrainerEvents` (with more than one
    process it must be a module-level function, so that it can be sent to the workers).

    Example::

        from ignite_trainer import TrainConfig, train
        summary = train(TrainConfig(epochs=5, name="quick"))
        print(summary["run_dir"], summary["metrics"]["murmur"]["f1"])
    """
    if resume is None:
        config = with_model_front_end(config)  # a published backbone's feature settings (cnn14: 32 kHz, ...)
    if torchrun_world_size() > 1 and config.nproc_per_node == 1:
        overrides = overrides or {}
        backend = distributed_backend(overrides.get("backend") or config.backend,
                                      overrides.get("device") or config.device)
        result: dict[str, Any] = {}
        run_joined(_torchrun_rank, (config, resume, overwrite, overrides, setup, result), backend)
        return result

    fused = False

    def validate(checked_config: TrainConfig) -> PreparedData:
        nonlocal fused
        check_settings(checked_config)  # a missing MLflow or unreachable tracking server too: no run directory yet
        data = checked_data(checked_config)
        check_training_set(checked_config, *training_items(checked_config, data.train))
        fused = kernel_for_run(checked_config, None if resume is None else Path(resume))  # built here, if at all
        return data

    run = open_run(config, resume=resume, overwrite=overwrite, overrides=overrides, validate=validate,
                   identify=run_identity)
    if run.finished:
        return _finished_summary(run)
    data = run.checked
    assert data is not None
    threads = training_threads(run.threads)
    _record_start(run, data, fused, threads)
    setup_logging(run.directory.train_log)
    log.info("data %s: %d train / %d validation recordings", data.source, len(data.train), len(data.val))
    log.info(split_line(data.train, data.val))
    config = run.config
    _write_resolved(run.directory, config, data)
    with hold_run_lock(run.directory.path), recorded_session(run.directory.path):
        try:
            run_spawned(training_process, (config, run.directory.path, data, run.resume_from, setup, fused, threads),
                        config.nproc_per_node, distributed_backend(config.backend, config.device), run.directory.path)
        except DistributedFailure as e:
            log.error("%s", e)  # train.log's last record: the runs table reads the run as failed
            raise
    return _summary(run.directory, config, skipped=data.skipped)


def _write_resolved(directory: RunDirectory, config: TrainConfig, data: PreparedData) -> None:
    """``resolved.yaml``: the values ``auto``/empty settings took here (`runtime.resolved_settings`);
    ``config.yaml`` keeps what was asked for. Rewritten by a resume, which may run elsewhere."""
    with atomic_write(directory.resolved_file, durable=True) as f:
        f.write(yaml.safe_dump(resolved_settings(config, data.source), sort_keys=False))


def _summary(directory: RunDirectory, config: TrainConfig, skipped: list[str]) -> dict[str, Any]:
    """What `train` returns, with the best checkpoint described (and logged: console and ``train.log``)."""
    records = directory.metrics_log.records()
    last = records[-1] if records else None
    best = best_summary(directory.path, config.monitor)
    last_epoch = last["epoch"] if last else None
    early = last_epoch is not None and last_epoch < config.epochs
    for line in summary_lines(best, last_epoch=last_epoch, early_stopped=early):
        log.info(line)
    return {"run_dir": directory.path, "finished": True, "already_finished": False, "metrics": last,
            "best": best, "skipped": skipped}


def _record_start(run: OpenedRun, data: PreparedData, fused: bool, threads: int) -> None:
    """``split.json`` (a new run) and this session in ``environment.json``."""
    if run.resume_from is None:
        write_split(run.directory.path, run.config, data)
    if run.threads is not None and run.threads != torch.get_num_threads():
        log.info("resuming with %d torch threads, the count the run trained with (this process had %d)",
                 run.threads, torch.get_num_threads())
    record_environment(run.directory.path, str(resolve_device(run.config.device)), kernel_line(run.config, fused),
                       threads)


def _finished_summary(run: OpenedRun) -> dict[str, Any]:
    return {"run_dir": run.directory.path, "finished": True, "already_finished": True, "epoch": run.epoch,
            "metrics": run.directory.metrics_log.last()}


def _torchrun_rank(local_rank: int, config: TrainConfig, resume: str | Path | None, overwrite: bool,
                   overrides: dict[str, Any], setup: SetupHook | None, result: dict[str, Any]) -> None:
    """`train` on one rank that ``torchrun`` started: rank 0 opens the run, every rank learns the outcome;
    each node's local rank 0 fills the feature cache before the node's other ranks read it."""
    world = idist.get_world_size()

    fused = False

    def open_on_rank0() -> tuple[OpenedRun, bool]:
        def validate(checked_config: TrainConfig) -> PreparedData:
            nonlocal fused
            check_settings(checked_config, world)
            data = checked_data(checked_config)  # fills the cache too
            check_training_set(checked_config, *training_items(checked_config, data.train), world)
            fused = kernel_for_run(checked_config, None if resume is None else Path(resume))
            return data

        run = open_run(config, resume=resume, overwrite=overwrite, overrides=overrides, validate=validate,
                       identify=run_identity)
        if not run.finished:
            _record_start(run, run.checked, fused, training_threads(run.threads))
        setup_logging(run.directory.train_log)
        return dataclasses.replace(run, checked=None), fused  # every rank prepares its own data

    if config.cpu_kernel:
        cpu_kernels.prepare()  # a build takes longer than a collective may wait: never inside the broadcast
    run, fused = broadcast_from_rank0(open_on_rank0)
    if run.finished:
        result.update(_finished_summary(run))
        return
    try:
        with peer_loss_ends_run(run.directory.path):
            _torchrun_training(local_rank, run, setup, fused, result)
    except DistributedFailure as e:
        if idist.get_rank() == 0:
            log.error("%s", e)  # train.log's last record: the runs table reads the run as failed
        raise


def _torchrun_training(local_rank: int, run: OpenedRun, setup: SetupHook | None, fused: bool,
                       result: dict[str, Any]) -> None:
    """The opened run's training on one torchrun rank; rank 0 holds the lock and records the session."""
    if idist.get_local_rank() != 0:
        setup_barrier()  # wait until this node's feature cache is filled
    data = prepare_data(run.config)
    if idist.get_local_rank() == 0:
        setup_barrier()
    if idist.get_rank() == 0:
        log.info(split_line(data.train, data.val))
        _write_resolved(run.directory, run.config, data)
        with hold_run_lock(run.directory.path), recorded_session(run.directory.path):
            training_process(local_rank, run.config, run.directory.path, data, run.resume_from, setup, fused,
                             run.threads)
        result.update(_summary(run.directory, run.config, skipped=data.skipped))
    else:
        training_process(local_rank, run.config, run.directory.path, data, run.resume_from, setup, fused,
                         run.threads)
        result.update(run_dir=run.directory.path, finished=True, already_finished=False,
                      metrics=run.directory.metrics_log.last(), skipped=data.skipped)


def training_process(local_rank: int, config: TrainConfig, run_dir: Path, data: PreparedData,
                     resume_path: Path | None, setup: SetupHook | None = None, fused: bool = False,
                     threads: int | None = None) -> None:
    """Everything one rank does: build the model, loaders and engines, attach the standard handlers
    (restoring them on resume), run the setup hook, train, with ``threads`` torch intra-op threads (None:
    this process's count; the caller's count is restored afterwards). ``fused``: the conv blocks use the
    fused CPU kernel, which the starting process has built (`kernel_for_run`)."""
    with intra_op_threads(threads):
        _train_rank(config, run_dir, data, resume_path, setup, fused)


def _train_rank(config: TrainConfig, run_dir: Path, data: PreparedData, resume_path: Path | None,
                setup: SetupHook | None, fused: bool) -> None:
    rank = idist.get_rank()
    device = idist.device() if idist.get_world_size() > 1 else resolve_device(config.device)
    seed_everything(config.seed)
    if rank == 0:
        setup_logging(RunDirectory(run_dir).train_log)  # a spawned rank 0 starts without the parent's handlers
    else:
        quiet_non_zero_rank()

    if fused and not cpu_kernels.prepare():  # a spawned rank loads the parent's build; another node builds its own
        raise ConfigError(f"rank {rank}: the fused CPU kernel the run uses cannot be had here "
                          f"({cpu_kernels.kernel_status()})")
    plain = model_from_config(config)
    apply_init(plain, config, new_run=resume_path is None)  # init_from's trunk (a new run), freeze_trunk
    use_cpu_kernel(plain, fused)
    model = idist.auto_model(plain)
    # the fused kernel skips a non-finite step on the device (found_inf), so the step never waits for the host
    optimizer = idist.auto_optim(build_optimizer(model, config, fused=device.type == "cuda"))
    loss_fn = WeightedBCELoss(*config.pos_weight).to(device)
    train_dataset, train_loader, val_dataset, val_loader = _loaders(config, data, device)
    head_targets = head_loss = None
    if config.head_names:  # trained by the step; scored by evaluate (`ignite_trainer.use.heads_output`)
        head_targets = HeadTargets(train_dataset, config.head_names).to(device)
        head_loss = HeadLoss(config.head_names, config.attribute_loss_weight, config.segmentation_loss_weight)
    identity = run_identity(config, data)  # in every checkpoint: a resume checks it is this run's

    # fp16 autocast on CUDA needs loss scaling; the one scaler is created here and checkpointed with the run
    fp16_on_cuda = config.amp and config.amp_dtype == "float16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if fp16_on_cuda else None
    # checkpoints keep the plain model; only the steps run the compiled one
    step_model = torch.compile(model) if config.compile else model
    augment = Augmenter(AugmentSettings.from_config(config), seed=config.seed,
                        feature_settings=FeatureSettings.from_config(config))
    trainer = create_trainer(step_model, optimizer, loss_fn, device, gradient_clip=config.gradient_clip,
                             amp=config.amp, accumulation_steps=config.accumulation_steps, scaler=scaler,
                             amp_dtype_name=config.amp_dtype, sync_every=config.sync_every,
                             augment=augment if augment.enabled else None, head_targets=head_targets,
                             head_loss=head_loss)
    evaluator = create_evaluator(step_model, {VAL_LOSS: MaskedLoss(loss_fn, device=device),
                                              PER_LABEL: PerLabelMetrics(device=device),
                                              PREDICTIONS: PredictionCollector(device=device)},
                                 device, amp=config.amp, amp_dtype_name=config.amp_dtype)
    handlers = attach_standard_handlers(
        trainer, evaluator, model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        val_dataset=val_dataset, config=config, run_dir=run_dir, scaler=scaler,
        extra_to_save={"run_identity": Snapshot(lambda: identity)}, resume_from=resume_path, writes_logs=rank == 0)
    tracker = None
    if rank == 0 and config.tracker == "mlflow":
        tracker = attach_mlflow(trainer, optimizer, config, run_dir, tracking_uri=config.tracking_uri,
                                val_dataset=val_dataset, best_checkpoint=handlers.best_checkpoint)
    if setup is not None:
        setup(trainer, evaluator)
    stop = None
    if idist.get_world_size() == 1:  # several ranks would have to agree on where to stop: not supported yet
        stop = GracefulStop(handlers.last_checkpoint, run_dir, config.accumulation_steps)
        stop.attach(trainer)
    error: BaseException | None = None
    try:
        try:
            with stop.installed() if stop is not None else contextlib.nullcontext():
                trainer.run(train_loader, max_epochs=config.epochs)
        finally:
            handlers.close()
        if stop is not None:
            stop.raise_if_stopped()
    except TrainingStopped:
        error = KeyboardInterrupt()  # a stop on purpose: the tracker records it as interrupted, not failed
        raise
    except KeyboardInterrupt as e:
        error = e
        log.warning("interrupted at epoch %s; resume with --resume %s", trainer.state.epoch, run_dir)
        raise
    except BaseException as e:
        error = e
        log.error("stopped by an error at epoch %s: %s: %s", trainer.state.epoch, type(e).__name__, e)
        raise
    finally:
        if tracker is not None:
            close_mlflow(tracker, error)
    if idist.get_world_size() > 1:
        # Leave together: a rank that tore down its gloo group while rank 0 was still closing its files
        # died with SIGABRT ("terminate called without an active exception") in 2 of 12 runs.
        idist.barrier()


def _loaders(config: TrainConfig, data: PreparedData, device: torch.device
             ) -> tuple[TrainWindows, Any, EvalWindows, Any]:
    """``(train dataset, train loader, validation dataset, validation loader)``: on the device when
    ``resident_features`` is set and the features fit there (the same batches, bit for bit), else DataLoaders
    over the cache; a patient model's are bags of patients (`bags.bag_loaders`), with no window dataset for the heads."""
    if config.patient_model:
        return (None, *bag_loaders(config, data, device))
    cache = data.feature_cache()
    train_dataset = TrainWindows(data.train, cache, config.window_seconds, seed=config.seed,
                                 demographics=config.demographics)
    val_dataset = EvalWindows(data.val, cache, config.window_seconds, demographics=config.demographics)
    eval_batch_size = config.eval_batch_size or config.batch_size
    if config.resident_features and ResidentFeatures.fits(train_dataset, device) \
            and ResidentFeatures.fits(val_dataset, device):
        return (train_dataset, ResidentTrainLoader(train_dataset, config.batch_size, device), val_dataset,
                ResidentEvalLoader(val_dataset, eval_batch_size, device))
    if config.resident_features:
        log.info("resident_features: the features do not fit on %s; reading them from the cache", device)
    return (train_dataset, make_train_loader(train_dataset, config.batch_size, config.num_workers, device),
            val_dataset, make_eval_loader(val_dataset, eval_batch_size, config.num_workers, device))
