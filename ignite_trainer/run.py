"""Compose a whole training run from a `TrainConfig`: the one function the CLI and ``idist.Parallel`` call.

`train` does the once-per-run work in the calling process (run directory, dataset read, feature cache,
patient split), then starts `training_process` on every rank. Each rank builds the same model, loaders
and engines; only rank 0 writes logs, and Ignite's `Checkpoint` saves on rank 0.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine

from ignite_trainer.checkpoint import RNGStates, Snapshot, clean_partial_files, find_resume_checkpoint, load_checkpoint, load_model_weights
from ignite_trainer.config import TrainConfig, config_conflicts
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.datasets import EvalWindows, TrainWindows, split_patients
from ignite_trainer.data.features import FeatureCache, FeatureSettings
from ignite_trainer.data.loaders import make_eval_loader, make_train_loader
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.data.records import Recording
from ignite_trainer.data.synthetic import ensure_embedded_dataset
from ignite_trainer.engine import create_evaluator, create_trainer
from ignite_trainer.errors import CheckpointError, ConfigError, DataError
from ignite_trainer.handlers import (
    attach_best_checkpoint,
    attach_early_stopping,
    attach_last_checkpoint,
    attach_lr_scheduler,
    attach_metrics_log,
    attach_nan_guard,
    attach_progress_bar,
    attach_sampler_epoch,
    attach_tensorboard,
    attach_validation,
    training_state,
    truncate_metrics_log,
)
from ignite_trainer.losses import WeightedBCELoss
from ignite_trainer.metrics import MaskedLoss, PerLabelMetrics
from ignite_trainer.models import build_model
from ignite_trainer.predictions import PredictionCollector, attach_pr_curves, attach_threshold_tuning

log = logging.getLogger("ignite_trainer")


@dataclass
class PreparedData:
    """What every rank needs to build its loaders: the split and where the cached features are."""

    train: list[Recording]
    val: list[Recording]
    cache_dir: Path
    settings: FeatureSettings
    source: Path
    skipped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- helpers
def cache_root(config: TrainConfig) -> Path:
    """Where the embedded dataset and the feature cache live: config, then $IGNITE_TRAINER_CACHE, then ~/.cache."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    env = os.environ.get("IGNITE_TRAINER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ignite_trainer"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_data(config: TrainConfig) -> PreparedData:
    """Read the dataset, fill the feature cache once (every epoch reuses it) and split by patient."""
    policy = BadInputPolicy(skip=config.skip_bad)
    root_dir = cache_root(config)
    if config.data:
        source, fmt = Path(config.data).expanduser(), config.format
    else:
        source, fmt = ensure_embedded_dataset(root_dir, config.synthetic_patients, config.synthetic_seed), "circor2022"
    recordings = read_recordings(source, fmt, unknown_murmur=config.unknown_murmur, policy=policy)
    settings = FeatureSettings.from_config(config)
    cache_dir = root_dir / "features"
    recordings = FeatureCache(cache_dir, settings).prepare(recordings, policy=policy, workers=min(4, os.cpu_count() or 1))
    if not recordings:
        raise DataError(f"{source}: no usable recordings")
    train, val = split_patients(recordings, config.val_fraction, config.seed, n_folds=config.n_folds, fold=config.fold)
    return PreparedData(train, val, cache_dir, settings, source, policy.skipped)


def new_run_dir(config: TrainConfig, overwrite: bool) -> Path:
    """Create ``output_dir/name``; an existing non-empty run is never replaced without ``overwrite``."""
    name = config.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.output_dir).expanduser() / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"{run_dir}: run directory already exists; pass --resume {run_dir} to continue it or --overwrite to replace it"
            )
        shutil.rmtree(run_dir)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{run_dir}: cannot write the run directory ({e.strerror or e})") from None
    return run_dir


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> tuple[TrainConfig, Path, dict[str, Any]]:
    """The config to resume with: the run's own, plus explicit overrides that must not change the math."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: --resume needs an existing run directory")
    path, ckpt = find_resume_checkpoint(run_dir)
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: checkpoint holds no config; cannot resume")
    try:
        config = TrainConfig.from_mapping(saved, source=str(path)).updated(overrides, source="command line")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    conflicts = config_conflicts(saved, config)
    if conflicts:
        raise CheckpointError(f"{run_dir}: resume refused, the config differs from the checkpoint's ({'; '.join(conflicts)})")
    return config, path, ckpt


# ---------------------------------------------------------------------------------------------- entry
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
    resume_path = None
    if resume is not None:
        run_dir = Path(resume)
        config, resume_path, ckpt = resume_config(run_dir, overrides or {})
        if ckpt.get("finished"):
            return {"run_dir": run_dir, "finished": True, "already_finished": True, "epoch": ckpt.get("epoch"),
                    "metrics": last_metrics(run_dir)}
        truncate_metrics_log(run_dir / "metrics.jsonl", int(ckpt["epoch"]))
        del ckpt
    else:
        run_dir = new_run_dir(config, overwrite)
        (run_dir / "config.yaml").write_text(config.to_yaml())
    setup_logging(run_dir / "train.log")
    data = prepare_data(config)
    log.info("data %s: %d train / %d validation recordings (%d / %d patients)", data.source, len(data.train),
             len(data.val), len({r.patient_id for r in data.train}), len({r.patient_id for r in data.val}))
    if not data.val:
        raise DataError(f"{data.source}: the validation split is empty; raise val_fraction or add patients")

    device = resolve_device(config.device)
    backend = config.backend or ("nccl" if device.type == "cuda" else "gloo")
    nproc = config.nproc_per_node
    with idist.Parallel(backend=backend if nproc > 1 else None, nproc_per_node=nproc if nproc > 1 else None) as parallel:
        parallel.run(training_process, config, run_dir, data, resume_path, setup)

    summary = {"run_dir": run_dir, "finished": True, "already_finished": False, "metrics": last_metrics(run_dir),
               "skipped": data.skipped}
    return summary


def training_process(local_rank: int, config: TrainConfig, run_dir: Path, data: PreparedData,
                     resume_path: Path | None, setup: SetupHook | None = None) -> None:
    """Everything one rank does: build, attach, restore (on resume) and run."""
    rank = idist.get_rank()
    device = idist.device() if idist.get_world_size() > 1 else resolve_device(config.device)
    seed_everything(config.seed)
    if rank != 0:
        logging.getLogger("ignite_trainer").setLevel(logging.WARNING)

    model = idist.auto_model(build_model(config.model, n_mels=config.n_mels))
    optimizer = idist.auto_optim(torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                                   weight_decay=config.weight_decay))
    loss_fn = WeightedBCELoss(*config.pos_weight).to(device)

    cache = FeatureCache(data.cache_dir, data.settings)
    train_loader = make_train_loader(TrainWindows(data.train, cache, config.window_seconds), config.batch_size,
                                     config.num_workers, device)
    val_dataset = EvalWindows(data.val, cache, config.window_seconds)
    val_loader = make_eval_loader(val_dataset, config.batch_size, config.num_workers, device)

    scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
    trainer = create_trainer(model, optimizer, loss_fn, device, gradient_clip=config.gradient_clip, amp=config.amp,
                             accumulation_steps=config.accumulation_steps, scaler=scaler)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn, device=device),
                                         "labels": PerLabelMetrics(device=device),
                                         "predictions": PredictionCollector(device=device)}, device, amp=config.amp)
    attach_sampler_epoch(trainer, train_loader)
    attach_nan_guard(trainer, where=f"; resume from the last good checkpoint with --resume {run_dir}")
    attach_validation(trainer, evaluator, val_loader)
    attach_threshold_tuning(trainer, "predictions", config.threshold_objective, val_dataset)  # before the best checkpoint

    to_save: dict[str, Any] = {
        "model_state_dict": model,
        "optimizer_state_dict": optimizer,
        "trainer": trainer,
        "rng": RNGStates(),
        **training_state(trainer, config.to_dict()),
        "thresholds": Snapshot(lambda: getattr(trainer.state, "thresholds", None)),
    }
    if scaler is not None:
        to_save["scaler"] = scaler
    if config.early_stopping_patience > 0:
        to_save["early_stopping"] = attach_early_stopping(trainer, config.early_stopping_patience, config.monitor)
    ckpt_dir = run_dir / "checkpoints"
    best = attach_best_checkpoint(trainer, to_save, ckpt_dir, config.monitor, config.n_saved_best)
    if config.scheduler == "cosine_annealing":  # stepped before the last checkpoint, which must hold the next epoch's LR
        to_save["lr_scheduler"] = attach_lr_scheduler(trainer, optimizer, config.epochs)
    last = attach_last_checkpoint(trainer, {**to_save, "best_checkpointer": best}, ckpt_dir)

    purge_step = None
    if resume_path is not None:
        purge_step = restore(resume_path, device, model, {**to_save, "best_checkpointer": best, "checkpointer": last})
    if rank == 0:
        attach_metrics_log(trainer, optimizer, run_dir / "metrics.jsonl")
        tb = attach_tensorboard(trainer, optimizer, run_dir / "tb", purge_step=purge_step)
        attach_pr_curves(trainer, tb, "predictions", val_dataset)
        if config.progress:
            attach_progress_bar(trainer)
    if setup is not None:
        setup(trainer, evaluator)
    try:
        trainer.run(train_loader, max_epochs=config.epochs)
    finally:
        if rank == 0:
            tb.close()
            clean_partial_files(ckpt_dir)


def restore(path: Path, device: torch.device, model: torch.nn.Module, objects: dict[str, Any]) -> int:
    """Load every object of a resume checkpoint; returns the first iteration to log (TensorBoard purge step)."""
    ckpt = load_checkpoint(path, map_location=device)
    load_model_weights(_unwrap(model), ckpt["model_state_dict"], path)
    for key, obj in objects.items():
        if key in ("model_state_dict", "rng"):
            continue
        if key not in ckpt:
            if isinstance(obj, Snapshot):  # a plain value added in a later version: nothing to restore
                continue
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'; it cannot resume this run exactly")
        obj.load_state_dict(ckpt[key])
    objects["rng"].load_state_dict(ckpt["rng"])  # last, so nothing above draws from the restored generators
    log.info("resumed from %s (epoch %s)", path, ckpt["epoch"])
    return int(ckpt["trainer"]["iteration"]) + 1


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else model


def last_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The last line of ``metrics.jsonl``, or None before the first epoch."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def setup_logging(path: Path) -> None:
    """Log to ``train.log`` in the run directory and to stderr (rank 0 only, once per process)."""
    logger = logging.getLogger("ignite_trainer")
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in logger.handlers):
        return
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    logger.setLevel(logging.INFO)
    for name in ("ignite.distributed.launcher.Parallel", "ignite.distributed.auto.auto_dataloader",
                 "ignite.distributed.auto.auto_model", "ignite.distributed.auto.auto_optim"):
        logging.getLogger(name).setLevel(logging.WARNING)  # per-run INFO noise; our own summary says it once
