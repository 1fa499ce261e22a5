"""Compose a whole training run from a `TrainConfig`: the one function the CLI and ``idist.Parallel`` call.

`train` does the once-per-run work in the calling process (run directory, dataset read, feature cache,
patient split), then starts `training_process` on every rank. Each rank builds the same model, loaders
and engines; only rank 0 writes logs, and Ignite's `Checkpoint` saves on rank 0.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException, ProcessRaisedException

from ignite_trainer.checkpoint import RNGStates, Snapshot, clean_partial_files, find_resume_checkpoint, load_checkpoint, load_model_weights
from ignite_trainer.config import TrainConfig, config_conflicts
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.datasets import EvalWindows, TrainWindows, split_patients
from ignite_trainer.data.features import FeatureCache, FeatureSettings, feature_workers
from ignite_trainer.data.loaders import make_eval_loader, make_train_loader
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.data.records import Recording
from ignite_trainer.data.synthetic import ensure_embedded_dataset
from ignite_trainer.engine import create_evaluator, create_trainer
from ignite_trainer.events import TrainerEvents
from ignite_trainer.errors import CheckpointError, ConfigError, DataError, DistributedFailure, UserError
from ignite_trainer import errors as _errors
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


def distributed_backend(backend: str | None, device: str) -> str:
    """The chosen backend, else nccl for CUDA and gloo for CPU."""
    return backend or ("nccl" if resolve_device(device).type == "cuda" else "gloo")


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
    recordings = FeatureCache(cache_dir, settings).prepare(recordings, policy=policy, workers=feature_workers())
    if not recordings:
        raise DataError(f"{source}: no usable recordings")
    # Folds (a split file, or n_folds >= 2) come from splits.py; split_seed (empty: seed) places the patients.
    if config.split_file or config.n_folds >= 2:
        from ignite_trainer.splits import fold_split

        train, val = fold_split(recordings, config.n_folds, config.fold, config.effective_split_seed, config.split_file)
    else:
        train, val = split_patients(recordings, config.val_fraction, config.effective_split_seed)
    return PreparedData(train, val, cache_dir, settings, source, policy.skipped)


def checked_data(config: TrainConfig) -> PreparedData:
    """`prepare_data`, refusing an empty validation split (nothing to monitor, stop or checkpoint on)."""
    data = prepare_data(config)
    if not data.val:
        raise DataError(f"{data.source}: the validation split is empty; raise val_fraction or add patients")
    return data


def run_dir_path(config: TrainConfig) -> Path:
    """``output_dir/name``, the name defaulting to the current time."""
    return Path(config.output_dir).expanduser() / (config.name or datetime.now().strftime("%Y%m%d-%H%M%S"))


def refuse_existing_run(run_dir: Path, overwrite: bool) -> None:
    """An existing non-empty run is never replaced without ``overwrite``."""
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{run_dir}: run directory already exists; pass --resume {run_dir} to continue it or --overwrite to replace it"
        )


def new_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Create ``run_dir`` (replacing an existing one only with ``overwrite``) and check it can be written."""
    refuse_existing_run(run_dir, overwrite)
    if run_dir.exists() and any(run_dir.iterdir()):
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
    if _torchrun_world_size() > 1 and config.nproc_per_node == 1:
        return _train_under_torchrun(config, resume, overwrite, overrides, setup)
    resume_path = None
    if resume is not None:
        run_dir = Path(resume)
        config, resume_path, ckpt = resume_config(run_dir, overrides or {})
        check_global_batch(config.batch_size, config.nproc_per_node)
        if ckpt.get("finished"):
            return {"run_dir": run_dir, "finished": True, "already_finished": True, "epoch": ckpt.get("epoch"),
                    "metrics": last_metrics(run_dir)}
        data = checked_data(config)  # before anything in the run directory changes
        truncate_metrics_log(run_dir / "metrics.jsonl", int(ckpt["epoch"]))
        del ckpt
    else:
        # Everything that can fail on bad input happens before the run directory is created or replaced,
        # so a wrong --data with --overwrite never costs the earlier run.
        check_global_batch(config.batch_size, config.nproc_per_node)
        run_dir = run_dir_path(config)
        refuse_existing_run(run_dir, overwrite)
        data = checked_data(config)
        new_run_dir(run_dir, overwrite)
        (run_dir / "config.yaml").write_text(config.to_yaml())
    setup_logging(run_dir / "train.log")
    log.info("data %s: %d train / %d validation recordings (%d / %d patients)", data.source, len(data.train),
             len(data.val), len({r.patient_id for r in data.train}), len({r.patient_id for r in data.val}))

    launch(config, run_dir, data, resume_path, setup)

    summary = {"run_dir": run_dir, "finished": True, "already_finished": False, "metrics": last_metrics(run_dir),
               "skipped": data.skipped}
    return summary


# ---------------------------------------------------------------------------------------------- distributed
#: How long a rank waits in a collective for a peer before giving up. gloo otherwise waits forever for a
#: peer that died without closing its sockets (another node, SIGKILL under torchrun); the spawn launcher
#: also stops the survivors as soon as one rank exits. Must exceed the slowest rank-0-only work between
#: two collectives (a checkpoint save, TensorBoard writes). ``$IGNITE_TRAINER_DIST_TIMEOUT`` overrides it.
DIST_TIMEOUT = timedelta(seconds=float(os.environ.get("IGNITE_TRAINER_DIST_TIMEOUT", "45")))


def launch(config: TrainConfig, run_dir: Path, data: PreparedData, resume_path: Path | None,
           setup: SetupHook | None) -> None:
    """Run `training_process` in this process, or on ``nproc_per_node`` spawned ranks through ``idist.Parallel``.

    A failed spawned rank becomes one `DistributedFailure` (or the rank's own `UserError`) naming the
    rank, the cause and the checkpoint to resume from. Under ``torchrun``, `train` takes
    `_train_under_torchrun` instead.
    """
    backend = distributed_backend(config.backend, config.device)
    nproc = config.nproc_per_node
    if nproc == 1:
        with idist.Parallel(backend=None) as parallel:
            parallel.run(training_process, config, run_dir, data, resume_path, setup)
        return
    if backend == "nccl" and nproc > max(1, torch.cuda.device_count()):
        raise ConfigError(f"nproc_per_node={nproc} but only {torch.cuda.device_count()} CUDA devices; use --backend gloo")
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # its "Terminating process ... via SIGTERM" would follow our one line
    try:
        with idist.Parallel(backend=backend, nproc_per_node=nproc, timeout=DIST_TIMEOUT) as parallel:
            parallel.run(_spawned_rank, config, run_dir, data, resume_path, setup)
    except ProcessException as e:
        clean_partial_files(run_dir / "checkpoints")  # a rank stopped by SIGTERM mid-save leaves its temp file
        raise _rank_failure(e, run_dir) from None
    finally:
        spawn_log.setLevel(level)


def check_global_batch(batch_size: int, world_size: int) -> None:
    """``batch_size`` is the global batch; `idist.auto_dataloader` floors it per rank, which would silently
    shrink a batch that does not divide evenly."""
    if batch_size % world_size:
        raise ConfigError(f"batch_size={batch_size} is the global batch and must divide evenly over {world_size} "
                          f"processes; use a multiple of {world_size}")


def _torchrun_world_size() -> int:
    """The world size ``torchrun`` (or any ``env://`` launcher) set for this process; 1 when started alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _train_under_torchrun(config: TrainConfig, resume: str | Path | None, overwrite: bool,
                          overrides: dict[str, Any] | None, setup: SetupHook | None) -> dict[str, Any]:
    """`train` when ``torchrun`` started every rank: Ignite joins its process group instead of spawning.

    Every rank runs this, so the once-per-run work is split: rank 0 alone creates (or checks) the run
    directory and broadcasts the outcome; each node's local rank 0 fills the feature cache before the
    node's other ranks read it.
    """
    overrides = overrides or {}
    backend = distributed_backend(overrides.get("backend") or config.backend, overrides.get("device") or config.device)
    result: dict[str, Any] = {}
    with idist.Parallel(backend=backend, timeout=DIST_TIMEOUT) as parallel:
        parallel.run(_torchrun_process, config, resume, overwrite, overrides, setup, result)
    return result


def _torchrun_process(local_rank: int, config: TrainConfig, resume: str | Path | None, overwrite: bool,
                      overrides: dict[str, Any] | None, setup: SetupHook | None, result: dict[str, Any]) -> None:
    import json

    message = ""
    if idist.get_rank() == 0:
        try:
            resume_path, finished = None, False
            if resume is not None:
                run_dir = Path(resume)
                config, resume_path, ckpt = resume_config(run_dir, overrides or {})
                finished = bool(ckpt.get("finished"))
                if not finished:
                    truncate_metrics_log(run_dir / "metrics.jsonl", int(ckpt["epoch"]))
                del ckpt
            else:
                run_dir = run_dir_path(config)
                refuse_existing_run(run_dir, overwrite)
                checked_data(config)  # bad data fails before an earlier run is replaced (fills the cache too)
                new_run_dir(run_dir, overwrite)
                (run_dir / "config.yaml").write_text(config.to_yaml())
            setup_logging(run_dir / "train.log")
            message = json.dumps({"run_dir": str(run_dir), "resume_path": str(resume_path) if resume_path else None,
                                  "config": config.to_dict(), "finished": finished})
        except UserError as e:  # every rank must learn it, or the others would wait in the broadcast
            message = json.dumps({"error": str(e), "type": type(e).__name__})
    state = json.loads(idist.broadcast(message, src=0, safe_mode=True))
    if "error" in state:
        cls = getattr(_errors, state["type"], UserError)
        raise cls(state["error"])
    config = TrainConfig.from_mapping(state["config"], source="rank 0")
    run_dir = Path(state["run_dir"])
    result.update(run_dir=run_dir, finished=True, already_finished=state["finished"])
    if state["finished"]:
        result["metrics"] = last_metrics(run_dir)
        return
    check_global_batch(config.batch_size, idist.get_world_size())  # the same answer on every rank
    if idist.get_local_rank() != 0:
        idist.barrier()  # wait until this node's feature cache is filled
    data = prepare_data(config)
    if idist.get_local_rank() == 0:
        idist.barrier()
    training_process(local_rank, config, run_dir, data,
                     Path(state["resume_path"]) if state["resume_path"] else None, setup)
    result.update(metrics=last_metrics(run_dir), skipped=data.skipped)


def _rank_failure(e: ProcessException, run_dir: Path) -> UserError:
    """One line from a spawned rank's failure; a rank's own `UserError` keeps its class and message."""
    if isinstance(e, ProcessRaisedException):
        lines = [line for line in str(e).splitlines() if line.strip()]
        last = lines[-1] if lines else "unknown error"  # the traceback's "module.Class: message"
        qualname, _, message = last.partition(": ")
        cls = getattr(_errors, qualname.rpartition(".")[2], None)
        if qualname.startswith("ignite_trainer.errors.") and isinstance(cls, type) and issubclass(cls, UserError):
            return cls(f"rank {e.error_index}: {message}")
        cause = last
    elif isinstance(e, ProcessExitedException):
        cause = f"killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
    else:
        cause = str(e).strip().splitlines()[0]
    try:
        where = f"; resume from {find_resume_checkpoint(run_dir)[0].name} with --resume {run_dir}"
    except CheckpointError:
        where = "; no complete checkpoint was written yet"
    return DistributedFailure(f"rank {e.error_index} failed ({cause}); the whole run stopped{where}")


def _spawned_rank(local_rank: int, *args: Any) -> None:
    """`training_process` on a spawned rank, then collect its garbage before Ignite destroys the group.

    The engines' handler closures form reference cycles that keep the DDP model alive past the return;
    left to the interpreter's exit, they were freed after the gloo group was gone, and the rank died
    with SIGABRT ("terminate called without an active exception").
    """
    training_process(local_rank, *args)
    gc.collect()


def training_process(local_rank: int, config: TrainConfig, run_dir: Path, data: PreparedData,
                     resume_path: Path | None, setup: SetupHook | None = None) -> None:
    """Everything one rank does: build, attach, restore (on resume) and run."""
    rank = idist.get_rank()
    device = idist.device() if idist.get_world_size() > 1 else resolve_device(config.device)
    seed_everything(config.seed)
    if rank == 0:
        setup_logging(run_dir / "train.log")  # a spawned rank 0 starts without the parent's handlers
    else:
        logging.getLogger("ignite_trainer").setLevel(logging.WARNING)
        _quiet_ignite()

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
    # Stepped on EPOCH_COMPLETED after validation and before the last checkpoint, which must hold the next LR.
    scheduler = attach_lr_scheduler(trainer, optimizer, config.epochs) if config.scheduler == "cosine_annealing" else None

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
    if scheduler is not None:
        to_save["lr_scheduler"] = scheduler
    if config.early_stopping_patience > 0:
        to_save["early_stopping"] = attach_early_stopping(trainer, config.early_stopping_patience, config.monitor)
    ckpt_dir = run_dir / "checkpoints"
    best = attach_best_checkpoint(trainer, to_save, ckpt_dir, config.monitor, config.n_saved_best)
    last = attach_last_checkpoint(trainer, {**to_save, "best_checkpointer": best}, ckpt_dir)

    purge_step = None
    if resume_path is not None:
        purge_step = restore(resume_path, device, model, {**to_save, "best_checkpointer": best, "checkpointer": last})
    if rank == 0:
        attach_metrics_log(trainer, optimizer, run_dir / "metrics.jsonl")
        tb = attach_tensorboard(trainer, optimizer, run_dir / "tb", purge_step=purge_step)
        attach_pr_curves(trainer, tb, "predictions", val_dataset)
        # tensorboardX buffers events; flush before the epoch's last checkpoint so a kill after it loses none
        trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, lambda _: tb.writer.flush())
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
    if idist.get_world_size() > 1:
        # Leave together: a rank that tore down its gloo group while rank 0 was still closing its files
        # died with SIGABRT ("terminate called without an active exception") in 2 of 12 runs.
        idist.barrier()


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
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        stream = _CurrentStderr()
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    logger.setLevel(logging.INFO)
    _quiet_ignite()


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time: pytest and notebooks swap it between runs, and a
    handler holding the old stream would write into a closed file."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _quiet_ignite() -> None:
    """Per-run INFO noise from ``ignite.distributed``; our own summary says it once. Spawned ranks need it too."""
    for name in ("ignite.distributed.launcher.Parallel", "ignite.distributed.auto.auto_dataloader",
                 "ignite.distributed.auto.auto_model", "ignite.distributed.auto.auto_optim"):
        logging.getLogger(name).setLevel(logging.WARNING)
