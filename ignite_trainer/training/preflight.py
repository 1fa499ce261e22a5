"""Every check of a training run's inputs that can fail, run before the run directory is created or replaced.

A run that fails on its inputs must leave the file system exactly as it was: an ``--overwrite`` start
with a bad model name must not have deleted the earlier run first. So every check that depends only on
the config and the data lives here, and `rundir.open_run` calls it in its validate phase; training
itself (`run.training_process`) then meets no input it could still refuse.

- `check_settings`: what the config alone decides: the model is registered, the device exists, the
  backend fits the devices (and the collective timeout is a number of seconds), the cache root is a
  folder, the global batch divides over the processes, the feature settings give
  every mel band some FFT bin and every window enough frames for the models, a model that declares its
  published front-end gets those feature settings, an ``init_from`` file is a model of the run's
  front-end whose trunk fits the run's model (`finetune.check_init`), and a ``tracker=mlflow``
  run has MLflow and a tracking server that answers (`tracking.check_tracking`).
- `check_training_set`: what needs the data too: at least one full batch per process and an
  accumulation window that closes inside an epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.features import FeatureSettings, mel_filterbank
from ignite_trainer.training.engine import check_accumulation
from ignite_trainer.training.finetune import check_init, check_model_front_end
from ignite_trainer.core.errors import ConfigError, DataError
from ignite_trainer.model.registry import available_models, build_model, model_from_config
from ignite_trainer.core.vocabulary import SEGMENTATION
from ignite_trainer.training.launch import dist_timeout
from ignite_trainer.core.config import cache_root
from ignite_trainer.training.runtime import distributed_backend, resolve_device, torchrun_world_size
from ignite_trainer.training.tracking import check_tracking

__all__ = ["check_settings", "check_training_set", "MIN_WINDOW_FRAMES"]

#: The models pool time by 4; fewer frames than this leave the attention fewer than two steps to weigh.
MIN_WINDOW_FRAMES = 8


def check_settings(config: TrainConfig, world_size: int | None = None) -> None:
    """Refuse a config that could not train, naming the field; ``world_size`` defaults to ``nproc_per_node``.

    Example::

        check_settings(TrainConfig(model="bogus"))  # ConfigError: model 'bogus' is not registered; ...
    """
    world = config.nproc_per_node if world_size is None else world_size
    if config.model not in available_models():
        raise ConfigError(f"model {config.model!r} is not registered; choose one of: {', '.join(available_models())}")
    device = resolve_device(config.device)
    backend = distributed_backend(config.backend, config.device)
    if backend == "nccl":
        if device.type != "cuda":
            raise ConfigError(f"backend=nccl needs CUDA devices, but the run would use {device.type}; use --backend gloo")
        if world > torch.cuda.device_count():
            raise ConfigError(f"nproc_per_node={world} but only {torch.cuda.device_count()} CUDA devices; "
                              "use --backend gloo or fewer processes")
    if world > 1 or torchrun_world_size() > 1:
        dist_timeout()
    check_cache_root(cache_root(config))
    if config.batch_size % world:
        raise ConfigError(f"batch_size={config.batch_size} is the global batch and must divide evenly over {world} "
                          f"processes; use a multiple of {world}")
    if config.patient_model:  # the model must embed windows for the bag's attention (model.mil)
        build_model(config.model, n_mels=config.n_mels, patient=True)
    check_model_front_end(config)
    check_heads(config)
    check_feature_settings(config)
    check_init(config)  # init_from: a model file of this front-end whose trunk fits the model
    check_tracking(config)  # last: the only check that may wait on the network


def check_heads(config: TrainConfig) -> None:
    """Refuse auxiliary heads the model cannot carry, or whose targets an augmentation would make wrong.

    Time shift and stretch move a window's frames away from the heart-cycle states annotated for them, and mixup
    blends two recordings whose descriptors and states cannot be blended, so those are refused with the heads.
    """
    heads = config.head_names
    if not heads:
        return
    if SEGMENTATION in heads:
        for name in ("augment_shift_prob", "augment_stretch_prob"):
            if getattr(config, name) > 0:
                raise ConfigError(f"heads: segmentation needs each frame where the .tsv puts it, and {name}="
                                  f"{getattr(config, name)} moves frames; set {name}=0 or drop segmentation")
    if config.augment_mixup_prob > 0:
        raise ConfigError(f"heads: a mixed window has no single murmur descriptor or heart-cycle state, and "
                          f"augment_mixup_prob={config.augment_mixup_prob}; set it to 0 or drop heads")
    model_from_config(config)  # a model without per-step features (embed_frames) is refused here


def check_cache_root(root: Path) -> None:
    """The cache root (or its nearest existing parent) must be a writable folder; found now, not by the
    first feature file written after the run directory exists."""
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    where = "the cache folder (cache_dir or $IGNITE_TRAINER_CACHE)"
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{existing}: {where} {'is' if existing == root else 'lies under'} a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{existing}: {where} cannot be written")


def check_feature_settings(config: TrainConfig) -> None:
    """Every mel band must cover at least one FFT bin (an empty band is a constant feature row the model
    learns nothing from), and a window must hold `MIN_WINDOW_FRAMES` frames."""
    settings = FeatureSettings.from_config(config)
    bank = mel_filterbank(settings.n_fft, settings.sample_rate, settings.n_mels, settings.band_low_hz,
                          settings.band_high_hz, settings.mel_scale)
    empty = int((bank.sum(dim=0) == 0).sum())
    if empty:
        raise ConfigError(
            f"n_mels={config.n_mels} with n_fft={config.n_fft} at sample_rate={config.sample_rate} leaves {empty} of "
            f"{config.n_mels} mel bands between band_low_hz={config.band_low_hz:g} and "
            f"band_high_hz={config.band_high_hz:g} without any FFT bin; lower n_mels or raise n_fft")
    frames = int(config.window_seconds * settings.frames_per_second)
    if frames < MIN_WINDOW_FRAMES:
        raise ConfigError(
            f"hop_ms={config.hop_ms:g} gives {frames} feature frame(s) per window_seconds={config.window_seconds:g} "
            f"window; the models need at least {MIN_WINDOW_FRAMES} (lower hop_ms or raise window_seconds)")


def check_training_set(config: TrainConfig, n_train: int, unit: str = "recordings",
                       world_size: int | None = None) -> int:
    """Refuse a training set without one full batch, or an accumulation window longer than an epoch;
    returns the iterations per epoch.

    Every process drops its uneven tail, so an epoch has ``n_train // batch_size`` steps whatever the
    process count (`data.loaders.make_train_loader`). ``unit`` names the items (a patient model's are patients).
    """
    del world_size  # the steps per epoch do not depend on it
    iterations = n_train // config.batch_size
    if iterations < 1:
        raise DataError(f"batch_size={config.batch_size} is larger than the training set ({n_train} {unit}); "
                        "lower --batch-size")
    check_accumulation(config.accumulation_steps, iterations)
    return iterations
