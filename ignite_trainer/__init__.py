"""ignite_trainer: train heart-sound (PCG) classifiers for the labels ``heart`` and ``murmur`` on PyTorch Ignite.

The CLI (``cli.py train``) composes everything below into one run. The same pieces are public, so that a
research script can compose its own engine, attach its own handlers, or hook into the custom
`TrainerEvents` without editing the package (see ``docs/extending.md`` and ``examples/``).

Data flow: `read_recordings` -> `FeatureCache` (log-mel features, computed once) -> `split_patients` ->
`TrainWindows` / `EvalWindows` -> `make_train_loader` / `make_eval_loader` -> batches
``(x [B, n_mels, T], y [B, 2], mask [B, 2], index [B])`` (plus ``demographics [B, 18]`` for a
`DemographicsFusion` model) -> `create_trainer` (optionally with an `Augmenter`) / `create_evaluator` ->
`attach_standard_handlers` (or the single ``attach_*`` handlers, in its order). Features may instead live
on the device (`ResidentTrainLoader` / `ResidentEvalLoader`: the same batches without a file read).

``LABELS`` is the label order everywhere (model outputs, targets, masks, metrics): ``("heart", "murmur")``.
The 2022 Challenge's classes: ``MURMUR_CLASSES`` ``("Present", "Unknown", "Absent")``, ``OUTCOME_CLASSES``
``("Abnormal", "Normal")`` and ``CHALLENGE_OUTPUT_CLASSES`` (both, in the order of its output files).
The official scores of decisions already made: ``ignite_trainer.scoring.challenge.challenge_scores`` (the
module shares the function's name, so the function itself is not a package-level name).

A Challenge entry (see ``examples/challenge/team_code.py``)::

    predictor = Predictor.load("runs/quick")
    result = predictor.predict_patient(challenge_recordings(metadata_text, arrays), metadata_text)
    print(dict(zip(result.classes, result.probabilities)))

``DEMOGRAPHIC_FEATURES`` names the nine columns of an `encode_demographics` row (five age groups one-hot,
``sex_female``, ``height``, ``weight``, ``pregnant``); a batch's demographics are those values, then their
known-flags.

Cross-validation, fold ensembles and sweeps (see ``docs/cross-validation.md`` and ``docs/sweeps.md``)::

    folds = assign_folds(read_recordings("data/", "circor2022"), n_folds=5, split_seed=0)
    write_split_file(folds, "splits.json", split_seed=0)            # read_split_file("splits.json") == folds
    summary = cross_validate(TrainConfig(epochs=30), folds=5, seeds=[0, 1], exp_dir="runs/cv-a", jobs=2)
    summary = resume_cross_validation("runs/cv-a")                   # after a kill: finished runs are kept
    summary = collect_experiment("runs/cv-a")                        # report, thresholds, decision layer
    print(summary["pooled"]["murmur_weighted_accuracy"], summary["pooled"]["outcome_cost"])
    ensemble = load_ensemble("runs/cv-a")                            # an `Ensemble`: the mean of its members
    export_ensemble(ensemble, "cv-a.safetensors")                    # one file, every member
    predictor = Predictor.load("cv-a.safetensors")
    space = load_space("space.yaml")                                 # a `SweepSpace`
    from ignite_trainer.experiments.sweeps import sweep                           # (the module shares the function's name)
    sweep(space, "sweeps/lr", n_trials=20)

Names are imported on first use (module ``__getattr__``), so ``import ignite_trainer`` stays cheap
(torch and Ignite load only when a name that needs them is touched).

Example::

    from ignite_trainer import TrainConfig, train
    summary = train(TrainConfig(epochs=2, synthetic_patients=24, name="quick", progress=False))
    print(summary["metrics"]["macro_f1"])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The package version; setup.cfg reads it from here (``attr:``), so it is written once.
__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # config
    "TrainConfig": "ignite_trainer.core.config",
    # data
    "LABELS": "ignite_trainer.core.vocabulary",
    "Recording": "ignite_trainer.data.records",
    "read_recordings": "ignite_trainer.data.readers",
    "write_synthetic": "ignite_trainer.data.synthetic",
    "FeatureSettings": "ignite_trainer.data.features",
    "FeatureCache": "ignite_trainer.data.features",
    "split_patients": "ignite_trainer.data.splits",
    "TrainWindows": "ignite_trainer.data.datasets",
    "EvalWindows": "ignite_trainer.data.datasets",
    "make_train_loader": "ignite_trainer.data.loaders",
    "make_eval_loader": "ignite_trainer.data.loaders",
    "EpochSampler": "ignite_trainer.data.loaders",
    "set_sampler_position": "ignite_trainer.data.loaders",
    "ResidentTrainLoader": "ignite_trainer.data.loaders",
    "ResidentEvalLoader": "ignite_trainer.data.loaders",
    "Demographics": "ignite_trainer.data.demographics",
    "DEMOGRAPHIC_FEATURES": "ignite_trainer.data.demographics",
    "encode_demographics": "ignite_trainer.data.demographics",
    # augmentation
    "AugmentSettings": "ignite_trainer.core.augmentation",
    "Augmenter": "ignite_trainer.training.augment",
    # models
    "build_model": "ignite_trainer.model.registry",
    "register_model": "ignite_trainer.model.registry",
    "available_models": "ignite_trainer.model.registry",
    "DemographicsFusion": "ignite_trainer.model.fusion",
    # loss and metrics
    "WeightedBCELoss": "ignite_trainer.training.losses",
    "PerLabelMetrics": "ignite_trainer.training.metrics",
    "MaskedLoss": "ignite_trainer.training.metrics",
    "PredictionCollector": "ignite_trainer.training.metrics",
    "recording_predictions": "ignite_trainer.scoring.predictions",
    # engines, events, handlers
    "create_trainer": "ignite_trainer.training.engine",
    "create_evaluator": "ignite_trainer.training.engine",
    "StepEvents": "ignite_trainer.training.engine",
    "read_step_stats": "ignite_trainer.training.engine",
    "TrainerEvents": "ignite_trainer.training.events",
    "attach_validation": "ignite_trainer.training.handlers",
    "attach_early_stopping": "ignite_trainer.training.handlers",
    "attach_best_checkpoint": "ignite_trainer.training.handlers",
    "attach_last_checkpoint": "ignite_trainer.training.handlers",
    "attach_lr_scheduler": "ignite_trainer.training.handlers",
    "attach_nan_guard": "ignite_trainer.training.handlers",
    "attach_progress_bar": "ignite_trainer.training.handlers",
    "attach_tensorboard": "ignite_trainer.training.handlers",
    "attach_metrics_log": "ignite_trainer.training.handlers",
    "attach_sampler_epoch": "ignite_trainer.training.handlers",
    "attach_threshold_tuning": "ignite_trainer.training.decisions",
    "attach_pr_curves": "ignite_trainer.training.tensorboard",
    "training_state": "ignite_trainer.training.handlers",
    "attach_standard_handlers": "ignite_trainer.training.standard",
    "attach_epoch_tensorboard": "ignite_trainer.training.tensorboard",
    "EpochScalars": "ignite_trainer.training.epoch_scalars",
    "attach_epoch_lines": "ignite_trainer.training.console",
    "best_summary": "ignite_trainer.training.console",
    "attach_mlflow": "ignite_trainer.training.tracking",
    "close_mlflow": "ignite_trainer.training.tracking",
    "read_runs": "ignite_trainer.runs.table",
    "RunRow": "ignite_trainer.runs.table",
    "hold_run_lock": "ignite_trainer.runs.lock",
    # checkpoints
    "load_checkpoint": "ignite_trainer.runs.checkpoint",
    "find_resume_checkpoint": "ignite_trainer.runs.checkpoint",
    "load_model_weights": "ignite_trainer.runs.checkpoint",
    "SafeDiskSaver": "ignite_trainer.runs.checkpoint",
    "RNGStates": "ignite_trainer.runs.checkpoint",
    "Snapshot": "ignite_trainer.runs.checkpoint",
    # whole runs, evaluation, inference
    "train": "ignite_trainer.training.run",
    "evaluate": "ignite_trainer.use.evaluation",
    "predict": "ignite_trainer.use.inference",
    "load_trained_model": "ignite_trainer.use.model_files",
    "export_safetensors": "ignite_trainer.use.export",
    "TrainedModel": "ignite_trainer.use.model_files",
    "Predictor": "ignite_trainer.use.predictor",
    "PatientPrediction": "ignite_trainer.use.predictor",
    "challenge_recordings": "ignite_trainer.use.predictor",
    "write_predictions_csv": "ignite_trainer.use.writers",
    "write_challenge_outputs": "ignite_trainer.use.writers",
    # cross-validation, fold ensembles, sweeps
    "cross_validate": "ignite_trainer.experiments.cv",
    "resume_cross_validation": "ignite_trainer.experiments.cv",
    "collect_experiment": "ignite_trainer.experiments.cv",
    "assign_folds": "ignite_trainer.data.splits",
    "read_split_file": "ignite_trainer.data.splits",
    "write_split_file": "ignite_trainer.data.splits",
    "Ensemble": "ignite_trainer.use.ensemble",
    "load_ensemble": "ignite_trainer.use.ensemble",
    "export_ensemble": "ignite_trainer.use.export",
    "SweepSpace": "ignite_trainer.experiments.space",
    "load_space": "ignite_trainer.experiments.space",
    # the 2022 Challenge: official scores, output files and the decision layer
    "MURMUR_CLASSES": "ignite_trainer.scoring.challenge",
    "OUTCOME_CLASSES": "ignite_trainer.scoring.challenge",
    "CHALLENGE_OUTPUT_CLASSES": "ignite_trainer.scoring.challenge",
    "ChallengeScores": "ignite_trainer.scoring.challenge",
    "format_challenge_output": "ignite_trainer.scoring.challenge",
    "read_challenge_outputs": "ignite_trainer.scoring.challenge",
    "scores_from_outputs": "ignite_trainer.scoring.challenge",
    "write_scores_csv": "ignite_trainer.scoring.challenge",
    "DecisionLayer": "ignite_trainer.scoring.decision",
    "PatientFeatures": "ignite_trainer.scoring.decision",
    "patient_features": "ignite_trainer.scoring.decision",
    "fit_decision": "ignite_trainer.scoring.decision",
    "attach_decision_fitting": "ignite_trainer.training.decisions",
    # errors
    "UserError": "ignite_trainer.core.errors",
    "ConfigError": "ignite_trainer.core.errors",
    "DataError": "ignite_trainer.core.errors",
    "CheckpointError": "ignite_trainer.core.errors",
    "TrainingAborted": "ignite_trainer.core.errors",
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
    from ignite_trainer.runs.checkpoint import (RNGStates, SafeDiskSaver, Snapshot, find_resume_checkpoint,
                                           load_checkpoint, load_model_weights)
    from ignite_trainer.core.config import TrainConfig
    from ignite_trainer.experiments.cv import collect_experiment, cross_validate, resume_cross_validation
    from ignite_trainer.use.ensemble import Ensemble, load_ensemble
    from ignite_trainer.use.export import export_ensemble, export_safetensors
    from ignite_trainer.data.splits import assign_folds, read_split_file, write_split_file
    from ignite_trainer.experiments.space import SweepSpace, load_space
    from ignite_trainer.data.datasets import EvalWindows, TrainWindows
    from ignite_trainer.data.splits import split_patients
    from ignite_trainer.data.features import FeatureCache, FeatureSettings
    from ignite_trainer.data.loaders import (EpochSampler, ResidentEvalLoader, ResidentTrainLoader, make_eval_loader,
                                             make_train_loader, set_sampler_position)
    from ignite_trainer.data.readers import read_recordings
    from ignite_trainer.training.augment import Augmenter
    from ignite_trainer.core.augmentation import AugmentSettings
    from ignite_trainer.data.demographics import DEMOGRAPHIC_FEATURES, Demographics, encode_demographics
    from ignite_trainer.data.records import Recording
    from ignite_trainer.data.synthetic import write_synthetic
    from ignite_trainer.training.engine import StepEvents, create_evaluator, create_trainer, read_step_stats
    from ignite_trainer.core.errors import CheckpointError, ConfigError, DataError, TrainingAborted, UserError
    from ignite_trainer.use.evaluation import evaluate
    from ignite_trainer.training.events import TrainerEvents
    from ignite_trainer.training.handlers import (attach_best_checkpoint, attach_early_stopping, attach_last_checkpoint,
                                         attach_lr_scheduler, attach_metrics_log, attach_nan_guard,
                                         attach_progress_bar, attach_sampler_epoch, attach_tensorboard,
                                         attach_validation, training_state)
    from ignite_trainer.use.inference import predict
    from ignite_trainer.scoring.challenge import (CHALLENGE_OUTPUT_CLASSES, MURMUR_CLASSES, OUTCOME_CLASSES,
                                                 ChallengeScores, format_challenge_output,
                                                 read_challenge_outputs, scores_from_outputs, write_scores_csv)
    from ignite_trainer.scoring.decision import DecisionLayer, PatientFeatures, fit_decision, patient_features
    from ignite_trainer.use.model_files import TrainedModel, load_trained_model
    from ignite_trainer.use.predictor import PatientPrediction, Predictor, challenge_recordings
    from ignite_trainer.use.writers import write_challenge_outputs, write_predictions_csv
    from ignite_trainer.training.losses import WeightedBCELoss
    from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics
    from ignite_trainer.model.fusion import DemographicsFusion
    from ignite_trainer.model.registry import available_models, build_model, register_model
    from ignite_trainer.training.metrics import PredictionCollector
    from ignite_trainer.training.decisions import attach_decision_fitting, attach_threshold_tuning
    from ignite_trainer.training.tensorboard import attach_pr_curves
    from ignite_trainer.scoring.predictions import recording_predictions
    from ignite_trainer.training.run import train
    from ignite_trainer.training.console import attach_epoch_lines, best_summary
    from ignite_trainer.training.epoch_scalars import EpochScalars
    from ignite_trainer.runs.lock import hold_run_lock
    from ignite_trainer.runs.table import RunRow, read_runs
    from ignite_trainer.training.standard import attach_standard_handlers
    from ignite_trainer.training.tensorboard import attach_epoch_tensorboard
    from ignite_trainer.training.tracking import attach_mlflow, close_mlflow
    from ignite_trainer.core.vocabulary import LABELS
