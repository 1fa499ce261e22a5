"""Fine-tuning: a run's model front-end, its trunk initialised from pretrained weights, frozen or on its own
learning rate, with a linear warm-up.

- `with_model_front_end`: a model that declares its published front-end (``cnn14``: `register_model`'s
  ``front_end``) fixes the run's feature settings: a feature field left at its default takes the declared
  value, one set to anything else is refused. The feature cache is keyed by the feature settings, so a
  ``cnn14`` run's features live beside the default ones.
- `check_init`: in the preflight, before the run directory exists: ``init_from`` names a readable model file
  (`runs.weights.read_weights`) whose stored front-end (sample rate, mel bands, FFT, window, hop, band) is
  the run's, and whose trunk fits the run's model strictly (`model.trunk.load_trunk`).
- `apply_init`: loads the trunk into a new run's model (a resume does not: its checkpoint has the weights),
  then freezes it with ``freeze_trunk``.
- `build_optimizer`: AdamW, with the trunk in a parameter group of its own at ``learning_rate *
  trunk_lr_scale`` (one group, as before, when the scale is 1; a frozen trunk is left out).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.model.registry import FRONT_END_FIELDS, build_model, foreign_keys, model_front_end
from ignite_trainer.model.trunk import freeze_trunk, has_trunk, load_trunk, trunk_parameters
from ignite_trainer.runs.weights import InitWeights, read_weights

__all__ = ["with_model_front_end", "check_model_front_end", "check_init", "apply_init", "build_optimizer"]

log = logging.getLogger("ignite_trainer")

_DEFAULTS = TrainConfig()


def _front_end_conflicts(config: TrainConfig, front_end: Mapping[str, object]) -> list[str]:
    return [f"{k}={getattr(config, k)!r} (it declares {v!r})" for k, v in front_end.items()
            if getattr(config, k) != v and getattr(config, k) != getattr(_DEFAULTS, k)]


def with_model_front_end(config: TrainConfig) -> TrainConfig:
    """``config`` with the feature settings its model declares (`registry.model_front_end`): a field at its
    default takes the declared value; a field set to another value is one `ConfigError` line.

    Example::

        with_model_front_end(TrainConfig(model="cnn14")).sample_rate    # 32000
        with_model_front_end(TrainConfig(model="cnn14", n_mels=128))    # ConfigError: ... n_mels=128 ...
    """
    front_end = model_front_end(config.model)
    if not front_end:
        return config
    conflicts = _front_end_conflicts(config, front_end)
    if conflicts:
        raise ConfigError(f"model {config.model!r} has a published front-end that the config contradicts: "
                          f"{', '.join(conflicts)}; leave these feature settings out (a {config.model} run "
                          "takes its model's)")
    changes = {k: v for k, v in front_end.items() if getattr(config, k) != v}
    return config.updated(changes, source=f"model {config.model}") if changes else config


def check_model_front_end(config: TrainConfig) -> None:
    """Refuse a config whose feature settings are not those its model declares (after `with_model_front_end`
    every field matches; a config built around it does not)."""
    front_end = model_front_end(config.model)
    if not front_end:
        return
    differ = [f"{k}={getattr(config, k)!r} (it declares {v!r})" for k, v in front_end.items() if getattr(config, k) != v]
    if differ:
        raise ConfigError(f"model {config.model!r} has a published front-end that the config contradicts: "
                          f"{', '.join(differ)}")


def _check_stored_front_end(config: TrainConfig, weights: InitWeights) -> None:
    saved = weights.config
    if saved is None:
        if model_front_end(config.model) is None:
            raise CheckpointError(
                f"{weights.path}: holds no config, so nothing says which features its weights were trained on; "
                f"only a model that declares its published front-end (e.g. cnn14) takes such a file, not "
                f"{config.model!r}")
        return  # a published checkpoint of a model that declares its front-end: the run already uses it
    differ = []
    for k in FRONT_END_FIELDS:
        was = saved.get(k, getattr(_DEFAULTS, k))
        now = getattr(config, k)
        if not isinstance(was, (int, float)) or isinstance(was, bool) or float(was) != float(now):
            differ.append(f"{k}: file {was!r}, run {now!r}")
    if differ:
        raise CheckpointError(f"{weights.path}: its weights were trained on another front-end than this run's "
                              f"({'; '.join(differ)}); use the file's feature settings or weights made with these")


def check_init(config: TrainConfig) -> InitWeights | None:
    """Check ``init_from`` (and that the model has a trunk for the fine-tuning options) without writing
    anything: the file reads as a model, its front-end is the run's, its trunk fits the run's model strictly.
    Returns what was read (None without ``init_from``)."""
    if not (config.init_from is not None or config.freeze_trunk or config.trunk_lr_scale != 1.0):
        return None
    model = build_model(config.model, n_mels=config.n_mels, demographics=config.demographics,
                        patient=config.patient_model)
    if not has_trunk(model):
        used = [f for f in ("init_from", "freeze_trunk", "trunk_lr_scale") if getattr(config, f) != getattr(_DEFAULTS, f)]
        raise ConfigError(f"{', '.join(used)}: model {config.model!r} has neither a 'trunk' nor a 'head' module, "
                          "so it has no trunk to initialise, freeze or scale")
    if config.init_from is None:
        return None
    weights = read_weights(config.init_from)
    _check_stored_front_end(config, weights)
    try:
        load_trunk(model, weights.state, str(weights.path), drop=foreign_keys(config.model), check_only=True)
    except CheckpointError as e:
        theirs = weights.config.get("model") if weights.config is not None else None
        if theirs is None or theirs == config.model:
            raise
        raise CheckpointError(f"{e} (the file's model is {theirs!r}, the run's {config.model!r})") from None
    return weights


def apply_init(model: torch.nn.Module, config: TrainConfig, new_run: bool) -> None:
    """Load ``init_from``'s trunk into a new run's ``model`` (a resume's checkpoint already holds the
    weights), then freeze the trunk when ``freeze_trunk`` is set (on resume too: freezing is not a weight)."""
    if config.init_from is not None and new_run:
        weights = read_weights(config.init_from)
        n = load_trunk(model, weights.state, str(weights.path), drop=foreign_keys(config.model))
        log.info("initialised the trunk (%d tensors) from %s; the head starts fresh", n, weights.path)
    if config.freeze_trunk:
        held = freeze_trunk(model)
        log.info("trunk frozen: its parameters do not train and its %d BatchNorm layer(s) stay in eval mode",
                 len(held))


def build_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over what trains: one group at ``learning_rate`` (as every run before fine-tuning had), or the
    trunk at ``learning_rate * trunk_lr_scale`` and the rest at ``learning_rate``; a frozen trunk's
    parameters are left out.

    Example::

        optimizer = build_optimizer(model, TrainConfig(trunk_lr_scale=0.1), fused=False)
        [g["lr"] for g in optimizer.param_groups]    # [0.0001, 0.001]
    """
    kwargs: dict[str, Any] = dict(lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    if not config.freeze_trunk and config.trunk_lr_scale == 1.0:
        return torch.optim.AdamW(model.parameters(), **kwargs)
    trunk, rest = trunk_parameters(model)
    if config.freeze_trunk:
        return torch.optim.AdamW(rest, **kwargs)
    return torch.optim.AdamW([{"params": trunk, "lr": config.learning_rate * config.trunk_lr_scale},
                              {"params": rest}], **kwargs)

