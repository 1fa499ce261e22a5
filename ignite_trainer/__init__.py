"""ignite_trainer: train heart-sound (PCG) classifiers for the labels ``heart`` and ``murmur`` on PyTorch Ignite.

This namespace is what a research script composes a run from; ``docs/extending.md`` describes every name
and ``examples/`` uses nothing else. Everything else (checkpoint plumbing, samplers, the Challenge's scores,
reports, run tables, ...) is importable from its wing: ``ignite_trainer.core``, ``.data``, ``.model``,
``.scoring``, ``.runs``, ``.training``, ``.use`` and ``.experiments``.

Whole runs: `TrainConfig` -> `train`, then `evaluate`, `predict` (folders), `load_trained_model` (the
model itself) or `Predictor` (one patient in memory; `challenge_recordings` pairs the Challenge's arrays with
their metadata); `cross_validate` and `sweep` run many::

    from ignite_trainer import (MACRO_F1, Predictor, TrainConfig, challenge_recordings, cross_validate, evaluate,
                                sweep, train)

    summary = train(TrainConfig(epochs=2, synthetic_patients=24, name="quick", progress=False))
    print(summary["metrics"][MACRO_F1])
    result = evaluate(summary["run_dir"])
    summary = cross_validate(TrainConfig(epochs=30), folds=5, seeds=[0, 1], exp_dir="runs/cv-a", jobs=2)
    sweep("space.yaml", "sweeps/lr", n_trials=20)
    predictor = Predictor.load("runs/cv-a")                        # the folds' ensemble
    answer = predictor.predict_patient(challenge_recordings(metadata_text, arrays), metadata_text)

A run composed by hand: `read_recordings` (or `write_synthetic`) -> `FeatureCache` (log-mel features,
computed once, by `FeatureSettings`) -> `split_patients` -> `TrainWindows` / `EvalWindows` ->
`make_train_loader` / `make_eval_loader` -> batches ``(x [B, n_mels, T], y [B, 2], mask [B, 2], index [B])``
-> a model from `build_model` (or your own, after `register_model`; `available_models` lists them) ->
`create_trainer` (with `WeightedBCELoss`) and `create_evaluator` (with `MaskedLoss`, `PerLabelMetrics` and
`PredictionCollector`, whose windows `recording_predictions` turns into recordings) ->
`attach_standard_handlers`, or the single ``attach_*`` handlers in its order; the trainer fires
`TrainerEvents` for your own handlers::

    trainer = create_trainer(model, optimizer, loss_fn)
    evaluator = create_evaluator(model, {VAL_LOSS: MaskedLoss(loss_fn), PER_LABEL: PerLabelMetrics(),
                                         PREDICTIONS: PredictionCollector()})
    attach_validation(trainer, evaluator, val_loader)
    attach_early_stopping(trainer, patience=5, monitor=MACRO_F1)

    @trainer.on(TrainerEvents.VALIDATION_COMPLETED)
    def show(engine):
        print(engine.state.validation_metrics[label_score("murmur", "f1")])

Names, each written once (in ``ignite_trainer.core.vocabulary``):

- ``LABELS`` is the label order everywhere (model outputs, targets, masks, metrics): ``("heart", "murmur")``.
- ``VAL_LOSS`` (``"val_loss"``) and ``MACRO_F1`` (``"macro_f1"``): the evaluator's loss and mean F1, as
  attached, monitored (``TrainConfig.monitor``, ``attach_early_stopping(monitor=...)``) and read from
  ``trainer.state.validation_metrics``; ``label_score(label, stat)`` names the per-label scores
  (``"murmur.f1"``).
- ``PREDICTIONS`` (``"predictions"``): the name the evaluator's `PredictionCollector` must carry for
  `attach_standard_handlers` (threshold tuning, the decision layer, PR curves).
- ``PER_LABEL`` (``"labels"``): the name `PerLabelMetrics` is attached under (its scores are flattened, so
  it is never read back).

Names are imported on first use (module ``__getattr__``), so ``import ignite_trainer`` stays cheap (torch
and Ignite load only when a name that needs them is touched).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The package version; setup.cfg reads it from here (``attr:``), so it is written once.
__version__ = "0.1.0"

# Public name -> the module that defines it. Grouped as ``docs/extending.md`` describes them.
_EXPORTS: dict[str, str] = {
    # whole runs
    "TrainConfig": "ignite_trainer.core.config",
    "train": "ignite_trainer.training.run",
    "evaluate": "ignite_trainer.use.evaluation",
    "predict": "ignite_trainer.use.inference",
    "Predictor": "ignite_trainer.use.predictor",
    "challenge_recordings": "ignite_trainer.use.predictor",
    "load_trained_model": "ignite_trainer.use.model_files",
    "cross_validate": "ignite_trainer.experiments.cv",
    "sweep": "ignite_trainer.experiments.sweeps",
    # data and loaders
    "LABELS": "ignite_trainer.core.vocabulary",
    "read_recordings": "ignite_trainer.data.readers",
    "write_synthetic": "ignite_trainer.data.synthetic",
    "FeatureSettings": "ignite_trainer.data.features",
    "FeatureCache": "ignite_trainer.data.features",
    "split_patients": "ignite_trainer.data.splits",
    "TrainWindows": "ignite_trainer.data.datasets",
    "EvalWindows": "ignite_trainer.data.datasets",
    "make_train_loader": "ignite_trainer.data.loaders",
    "make_eval_loader": "ignite_trainer.data.loaders",
    # the model registry
    "register_model": "ignite_trainer.model.registry",
    "build_model": "ignite_trainer.model.registry",
    "available_models": "ignite_trainer.model.registry",
    # engines and events
    "create_trainer": "ignite_trainer.training.engine",
    "create_evaluator": "ignite_trainer.training.engine",
    "TrainerEvents": "ignite_trainer.training.events",
    # loss and metrics
    "WeightedBCELoss": "ignite_trainer.training.losses",
    "MaskedLoss": "ignite_trainer.training.metrics",
    "PerLabelMetrics": "ignite_trainer.training.metrics",
    "PredictionCollector": "ignite_trainer.training.metrics",
    "recording_predictions": "ignite_trainer.scoring.predictions",
    # metric names
    "VAL_LOSS": "ignite_trainer.core.vocabulary",
    "MACRO_F1": "ignite_trainer.core.vocabulary",
    "label_score": "ignite_trainer.core.vocabulary",
    "PREDICTIONS": "ignite_trainer.core.vocabulary",
    "PER_LABEL": "ignite_trainer.core.vocabulary",
    # handlers: the standard set, and each of its single handlers
    "attach_standard_handlers": "ignite_trainer.training.standard",
    "attach_sampler_epoch": "ignite_trainer.training.handlers",
    "attach_nan_guard": "ignite_trainer.training.handlers",
    "attach_validation": "ignite_trainer.training.handlers",
    "attach_early_stopping": "ignite_trainer.training.handlers",
    "attach_best_checkpoint": "ignite_trainer.training.handlers",
    "attach_lr_scheduler": "ignite_trainer.training.handlers",
    "attach_last_checkpoint": "ignite_trainer.training.handlers",
    "attach_metrics_log": "ignite_trainer.training.handlers",
    "attach_tensorboard": "ignite_trainer.training.handlers",
    "attach_progress_bar": "ignite_trainer.training.handlers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name on first use and cache it in the package namespace."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ignite_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from ignite_trainer.core.config import TrainConfig
    from ignite_trainer.core.vocabulary import LABELS, MACRO_F1, PER_LABEL, PREDICTIONS, VAL_LOSS, label_score
    from ignite_trainer.data.datasets import EvalWindows, TrainWindows
    from ignite_trainer.data.splits import split_patients
    from ignite_trainer.data.features import FeatureCache, FeatureSettings
    from ignite_trainer.data.loaders import make_eval_loader, make_train_loader
    from ignite_trainer.data.readers import read_recordings
    from ignite_trainer.data.synthetic import write_synthetic
    from ignite_trainer.experiments.cv import cross_validate
    from ignite_trainer.experiments.sweeps import sweep
    from ignite_trainer.model.registry import available_models, build_model, register_model
    from ignite_trainer.training.metrics import PredictionCollector
    from ignite_trainer.scoring.predictions import recording_predictions
    from ignite_trainer.training.engine import create_evaluator, create_trainer
    from ignite_trainer.training.events import TrainerEvents
    from ignite_trainer.training.handlers import (attach_best_checkpoint, attach_early_stopping,
                                                  attach_last_checkpoint, attach_lr_scheduler, attach_metrics_log,
                                                  attach_nan_guard, attach_progress_bar, attach_sampler_epoch,
                                                  attach_tensorboard, attach_validation)
    from ignite_trainer.training.losses import WeightedBCELoss
    from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics
    from ignite_trainer.training.run import train
    from ignite_trainer.training.standard import attach_standard_handlers
    from ignite_trainer.use.evaluation import evaluate
    from ignite_trainer.use.inference import predict
    from ignite_trainer.use.model_files import load_trained_model
    from ignite_trainer.use.predictor import Predictor, challenge_recordings
