"""A model's *trunk* (what pretrained weights initialise and what ``--freeze-trunk`` freezes) and its *head*.

The one definition, used by ``--init-from``, ``--freeze-trunk`` and ``--trunk-lr-scale`` alike:

- a model with a ``trunk`` submodule (the built-in CNNs): its trunk is every parameter and buffer under
  ``trunk.``; projection, pooling and head stay freshly initialised;
- any other model with a ``head`` submodule (e.g. ``cnn14``): every key except those under ``head.``;
- a model with neither has no trunk: the options are refused for it.

Keys are those of the plain model (`build_model` without demographics, heads or a patient model); a
`DemographicsFusion`, `AuxiliaryHeads` or `PatientMIL` wrapper is looked through (its ``base.`` model has the trunk;
the wrappers' own layers, a patient model's attention included, are never part of it).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.model.fusion import DemographicsFusion
from ignite_trainer.model.heads import AUX_PREFIX, AuxiliaryHeads
from ignite_trainer.model.mil import OWN_PREFIXES as MIL_PREFIXES, PatientMIL

__all__ = ["plain_model", "trunk_keys", "trunk_parameters", "has_trunk", "load_trunk", "freeze_trunk",
           "trunk_state"]

_BASE = "base."
#: Key prefixes of the wrappers' own layers: demographics fusion's, the auxiliary heads'.
_WRAPPER_KEYS = ("encode.", "heart.", AUX_PREFIX, *MIL_PREFIXES)


def plain_model(model: nn.Module) -> nn.Module:
    """The model under `AuxiliaryHeads`, `DemographicsFusion` and `PatientMIL` wrappers (or DDP), else ``model``."""
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    while isinstance(model, (AuxiliaryHeads, DemographicsFusion, PatientMIL)):
        model = model.base
    return model


def _is_trunk_key(model: nn.Module, key: str) -> bool:
    if isinstance(getattr(model, "trunk", None), nn.Module):
        return key.startswith("trunk.")
    return not key.startswith("head.")


def has_trunk(model: nn.Module) -> bool:
    """Whether the model has a trunk by the rule above (a ``trunk`` or a ``head`` submodule)."""
    plain = plain_model(model)
    return isinstance(getattr(plain, "trunk", None), nn.Module) or isinstance(getattr(plain, "head", None), nn.Module)


def _require_trunk(model: nn.Module, what: str) -> nn.Module:
    plain = plain_model(model)
    if not has_trunk(plain):
        raise ConfigError(f"{what}: model {type(plain).__name__} has neither a 'trunk' nor a 'head' module, so "
                          "it has no trunk to initialise, freeze or scale")
    return plain


def trunk_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the plain model's trunk, in the model's order."""
    plain = _require_trunk(model, "trunk")
    return [k for k in plain.state_dict() if _is_trunk_key(plain, k)]


def trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trunk's parameters and buffers (keys of the plain model)."""
    plain = _require_trunk(model, "trunk")
    return {k: v.detach().clone() for k, v in plain.state_dict().items() if _is_trunk_key(plain, k)}


def trunk_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(trunk parameters, every other parameter)`` of ``model`` (the wrapper's fusion layers are "other")."""
    plain = _require_trunk(model, "trunk")
    trunk_ids = {id(p) for name, p in plain.named_parameters() if _is_trunk_key(plain, name)}
    trunk = [p for p in model.parameters() if id(p) in trunk_ids]
    rest = [p for p in model.parameters() if id(p) not in trunk_ids]
    return trunk, rest


def _source_keys(state: Mapping[str, torch.Tensor], plain: nn.Module, drop: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The trunk part of a file's state dict, in plain-model keys: a wrapped run's ``base.`` prefixes
    removed (the wrappers' layers left out), the published model's ``drop`` prefixes left out."""
    while state and all(k.startswith(_BASE) or k.startswith(_WRAPPER_KEYS) for k in state) \
            and any(k.startswith(_BASE) for k in state):
        state = {k[len(_BASE):]: v for k, v in state.items() if k.startswith(_BASE)}
    return {k: v for k, v in state.items() if not k.startswith(drop) and _is_trunk_key(plain, k)}


def load_trunk(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, drop: tuple[str, ...] = (),
               check_only: bool = False) -> int:
    """Copy the trunk of ``state`` (a model state dict) into ``model``'s trunk, strictly: a trunk key the file
    lacks or has extra, or a shape that differs, is one `CheckpointError` line naming ``source``; returns
    the number of tensors loaded. ``drop``: key prefixes of the file that are not the model's
    (`registry.foreign_keys`). ``check_only``: check, load nothing.

    Example::

        load_trunk(model, load_checkpoint(path)["model_state_dict"], str(path))
    """
    plain = _require_trunk(model, "init_from")
    own = {k: v for k, v in plain.state_dict().items() if _is_trunk_key(plain, k)}
    theirs = _source_keys(state, plain, drop)
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [f"{k} {tuple(theirs[k].shape)} in the file, {tuple(v.shape)} in model {type(plain).__name__}"
              for k, v in own.items() if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trunk key(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected trunk key(s), e.g. {unexpected[0]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        raise CheckpointError(f"{source}: its weights are not a trunk of model {type(plain).__name__} "
                              f"({'; '.join(parts)}); was it trained with another model or n_mels?")
    if not check_only:
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(theirs[k].to(dtype=v.dtype))
    return len(own)


def _bn_stays_in_eval(module: nn.Module, args: tuple) -> None:
    module.train(False)


def freeze_trunk(model: nn.Module) -> list[nn.Module]:
    """Freeze the trunk: its parameters stop requiring gradients, and each BatchNorm in it stays in eval mode
    (a forward pre-hook switches it back whenever the training step calls ``model.train()``), so its
    running statistics do not drift with the new data either. Dropout in the trunk keeps training's
    behaviour. Returns the BatchNorm modules held in eval mode.

    Example::

        freeze_trunk(model)   # then only the head (and what is not trunk) learns
    """
    plain = _require_trunk(model, "freeze_trunk")
    names = set(trunk_keys(plain))
    for name, p in plain.named_parameters():
        if name in names:
            p.requires_grad_(False)
    held = []
    for name, module in plain.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" in names:
            module.train(False)
            module.register_forward_pre_hook(_bn_stays_in_eval)
            held.append(module)
    return held

