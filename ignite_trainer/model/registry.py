"""The model registry: names a config can choose (``model: attention_cnn``), and the one way a model is built.

A researcher adds a model with ``@register_model("my_model")`` on a class or function that takes ``n_mels``
(plus keyword options) and returns an `nn.Module` mapping log-mel windows ``[B, n_mels, T]`` to
``(logits [B, 2], attention [B, T'])``. The attention weights come back with the logits so that reports can
show which part of a window drove a prediction. The built-in models register themselves when the
``ignite_trainer.model`` wing is imported.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, TypeVar

from torch import nn

from ignite_trainer.core.errors import ConfigError
from ignite_trainer.model.fusion import DemographicsFusion
from ignite_trainer.model.heads import AuxiliaryHeads
from ignite_trainer.model.mil import PatientMIL

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}
#: name -> the feature settings (`TrainConfig` field -> value) the model was published with, when it declares one.
_FRONT_ENDS: dict[str, dict[str, object]] = {}
#: name -> key prefixes of its published checkpoints that are not part of this model (a published head, a
#: feature extractor this project computes in its feature cache): dropped when the file initialises the trunk.
_FOREIGN_KEYS: dict[str, tuple[str, ...]] = {}
#: The `TrainConfig` fields a model's declared front-end may fix: exactly the fields of the feature settings.
FRONT_END_FIELDS = ("sample_rate", "band_low_hz", "band_high_hz", "n_mels", "n_fft", "win_ms", "hop_ms")


def register_model(name: str, *, front_end: Mapping[str, object] | None = None,
                   foreign_keys: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator: make a model class or factory buildable by ``name``, so configs and ``--model`` can pick it.

    Names are unique (a second, different factory under a taken name is a `ValueError`). The factory takes
    ``n_mels`` plus keyword options and returns a module whose ``forward(x [B, n_mels, T])`` gives
    ``(logits [B, 2], attention [B, T'])``. The registry is per process: register before building.

    A model published with its own feature front-end (a pretrained audio backbone) declares it with
    ``front_end`` (`TrainConfig` feature fields, `FRONT_END_FIELDS`, to their values): a run of that model takes
    those settings, and a config that contradicts them is refused (`model_front_end`). ``foreign_keys`` are
    key prefixes of the published checkpoint that the model does not have (its published head, a feature
    extractor the feature cache replaces); ``--init-from`` drops them.

    Example::

        @register_model("linear_probe")
        class LinearProbe(nn.Module):
            def __init__(self, n_mels: int):
                super().__init__()
                self.head = nn.Linear(n_mels, 2)

            def forward(self, x):
                t = x.shape[-1]
                return self.head(x.mean(dim=-1)), x.new_full((x.shape[0], t), 1.0 / t)

        model = build_model("linear_probe", n_mels=64)
    """

    def decorate(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]!r}")
        unknown = sorted(set(front_end or {}) - set(FRONT_END_FIELDS))
        if unknown:
            raise ValueError(f"model {name!r}: front_end fields {unknown} are not feature settings {FRONT_END_FIELDS}")
        _REGISTRY[name] = factory
        if front_end:
            _FRONT_ENDS[name] = dict(front_end)
        if foreign_keys:
            _FOREIGN_KEYS[name] = tuple(foreign_keys)
        return factory

    return decorate


def model_front_end(name: str) -> dict[str, object] | None:
    """The feature settings model ``name`` declared (`register_model`'s ``front_end``), or None.

    Example::

        model_front_end("cnn14")["sample_rate"]   # 32000
    """
    front_end = _FRONT_ENDS.get(name)
    return None if front_end is None else dict(front_end)


def foreign_keys(name: str) -> tuple[str, ...]:
    """Key prefixes of model ``name``'s published checkpoints that are not its own (`register_model`)."""
    return _FOREIGN_KEYS.get(name, ())


def available_models() -> list[str]:
    """The registered model names, sorted: what ``--model`` and ``model:`` accept in this process.

    Example::

        assert "attention_cnn" in available_models()
    """
    return sorted(_REGISTRY)


def build_model(name: str, n_mels: int, *, demographics: bool = False, patient: bool = False,
                heads: tuple[str, ...] = (),
                **kwargs: object) -> nn.Module:
    """Instantiate a registered model; an unknown name or option is a `ConfigError` that lists the choices.

    ``demographics=True`` wraps it in `ignite_trainer.model.fusion.DemographicsFusion` (its forward then also takes
    the batch's ``demographics`` tensor, fused into the heart logit); the model needs ``embed`` for that.
    ``heads`` (murmur descriptors, ``segmentation``) wraps it in `ignite_trainer.model.heads.AuxiliaryHeads`,
    which needs ``embed_frames``; without them the model and its state-dict keys are exactly the plain ones.
    ``patient=True`` wraps it in `ignite_trainer.model.mil.PatientMIL` (a patient model: bags of windows in,
    one patient's logits out); the model needs ``embed``, ``embedding_size`` and ``head`` for that.

    Example::

        model = build_model("attention_cnn", n_mels=64, hidden=64)
        logits, attention = model(torch.randn(8, 64, 400))     # [8, 2], [8, 100]
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"model {name!r} is not registered; choose one of: {', '.join(available_models())}")
    try:
        inspect.signature(factory).bind(n_mels=n_mels, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: {e}") from None
    model = factory(n_mels=n_mels, **kwargs)
    if demographics:
        model = DemographicsFusion(model)
    if patient:
        model = PatientMIL(model, name=name)
    if heads:
        model = AuxiliaryHeads(model, tuple(heads))
    return model


def model_from_config(config) -> nn.Module:
    """The model a run of ``config`` (a `TrainConfig`) trains: its model, mel bands, demographics and heads.

    Example::

        model = model_from_config(TrainConfig(model="attention_cnn", heads=("segmentation",)))
    """
    return build_model(config.model, n_mels=config.n_mels, demographics=config.demographics,
                       patient=config.patient_model, heads=config.head_names)
