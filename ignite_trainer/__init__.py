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
The official scores of decisions already made: ``ignite_trainer.challenge_scores.challenge_scores`` (the
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
    from ignite_trainer.sweep import sweep                           # (the module shares the function's name)
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
    "TrainConfig": "ignite_trainer.config",
    # data
    "LABELS": "ignite_trainer.vocabulary",
    "Recording": "ignite_trainer.data.records",
    "read_recordings": "ignite_trainer.data.readers",
    "write_synthetic": "ignite_trainer.data.synthetic",
    "FeatureSettings": "ignite_trainer.data.features",
    "FeatureCache": "ignite_trainer.data.features",
    "split_patients": "ignite_trainer.data.datasets",
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
    "AugmentSettings": "ignite_trainer.augment",
    "Augmenter": "ignite_trainer.augment",
    # models
    "build_model": "ignite_trainer.models",
    "register_model": "ignite_trainer.models",
    "available_models": "ignite_trainer.models",
    "DemographicsFusion": "ignite_trainer.fusion",
    # loss and metrics
    "WeightedBCELoss": "ignite_trainer.losses",
    "PerLabelMetrics": "ignite_trainer.metrics",
    "MaskedLoss": "ignite_trainer.metrics",
    "PredictionCollector": "ignite_trainer.predictions",
    "recording_predictions": "ignite_trainer.predictions",
    # engines, events, handlers
    "create_trainer": "ignite_trainer.engine",
    "create_evaluator": "ignite_trainer.engine",
    "StepEvents": "ignite_trainer.engine",
    "read_step_stats": "ignite_trainer.engine",
    "TrainerEvents": "ignite_trainer.events",
    "attach_validation": "ignite_trainer.handlers",
    "attach_early_stopping": "ignite_trainer.handlers",
    "attach_best_checkpoint": "ignite_trainer.handlers",
    "attach_last_checkpoint": "ignite_trainer.handlers",
    "attach_lr_scheduler": "ignite_trainer.handlers",
    "attach_nan_guard": "ignite_trainer.handlers",
    "attach_progress_bar": "ignite_trainer.handlers",
    "attach_tensorboard": "ignite_trainer.handlers",
    "attach_metrics_log": "ignite_trainer.handlers",
    "attach_sampler_epoch": "ignite_trainer.handlers",
    "attach_threshold_tuning": "ignite_trainer.predictions",
    "attach_pr_curves": "ignite_trainer.predictions",
    "training_state": "ignite_trainer.handlers",
    "attach_standard_handlers": "ignite_trainer.standard",
    "attach_epoch_tensorboard": "ignite_trainer.tensorboard_epoch",
    "EpochScalars": "ignite_trainer.epoch_scalars",
    "attach_epoch_lines": "ignite_trainer.console",
    "best_summary": "ignite_trainer.console",
    "attach_mlflow": "ignite_trainer.tracking",
    "close_mlflow": "ignite_trainer.tracking",
    "read_runs": "ignite_trainer.runs_table",
    "RunRow": "ignite_trainer.runs_table",
    "hold_run_lock": "ignite_trainer.run_lock",
    # checkpoints
    "load_checkpoint": "ignite_trainer.checkpoint",
    "find_resume_checkpoint": "ignite_trainer.checkpoint",
    "load_model_weights": "ignite_trainer.checkpoint",
    "SafeDiskSaver": "ignite_trainer.checkpoint",
    "RNGStates": "ignite_trainer.checkpoint",
    "Snapshot": "ignite_trainer.checkpoint",
    # whole runs, evaluation, inference
    "train": "ignite_trainer.run",
    "evaluate": "ignite_trainer.evaluation",
    "predict": "ignite_trainer.inference",
    "load_trained_model": "ignite_trainer.model_files",
    "export_safetensors": "ignite_trainer.model_files",
    "TrainedModel": "ignite_trainer.model_files",
    "Predictor": "ignite_trainer.predictor",
    "PatientPrediction": "ignite_trainer.predictor",
    "challenge_recordings": "ignite_trainer.predictor",
    "write_predictions_csv": "ignite_trainer.writers",
    "write_challenge_outputs": "ignite_trainer.writers",
    # cross-validation, fold ensembles, sweeps
    "cross_validate": "ignite_trainer.cv",
    "resume_cross_validation": "ignite_trainer.cv",
    "collect_experiment": "ignite_trainer.cv",
    "assign_folds": "ignite_trainer.splits",
    "read_split_file": "ignite_trainer.splits",
    "write_split_file": "ignite_trainer.splits",
    "Ensemble": "ignite_trainer.ensemble",
    "load_ensemble": "ignite_trainer.ensemble",
    "export_ensemble": "ignite_trainer.ensemble",
    "SweepSpace": "ignite_trainer.sweep_space",
    "load_space": "ignite_trainer.sweep_space",
    # the 2022 Challenge: official scores, output files and the decision layer
    "MURMUR_CLASSES": "ignite_trainer.challenge_scores",
    "OUTCOME_CLASSES": "ignite_trainer.challenge_scores",
    "CHALLENGE_OUTPUT_CLASSES": "ignite_trainer.challenge_scores",
    "ChallengeScores": "ignite_trainer.challenge_scores",
    "format_challenge_output": "ignite_trainer.challenge_scores",
    "read_challenge_outputs": "ignite_trainer.challenge_scores",
    "scores_from_outputs": "ignite_trainer.challenge_scores",
    "write_scores_csv": "ignite_trainer.challenge_scores",
    "DecisionLayer": "ignite_trainer.decision",
    "PatientFeatures": "ignite_trainer.decision",
    "patient_features": "ignite_trainer.decision",
    "fit_decision": "ignite_trainer.decision",
    "attach_decision_fitting": "ignite_trainer.predictions",
    # errors
    "UserError": "ignite_trainer.errors",
    "ConfigError": "ignite_trainer.errors",
    "DataError": "ignite_trainer.errors",
    "CheckpointError": "ignite_trainer.errors",
    "TrainingAborted": "ignite_trainer.errors",
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
    from ignite_trainer.checkpoint import (RNGStates, SafeDiskSaver, Snapshot, find_resume_checkpoint,
                                           load_checkpoint, load_model_weights)
    from ignite_trainer.config import TrainConfig
    from ignite_trainer.cv import collect_experiment, cross_validate, resume_cross_validation
    from ignite_trainer.ensemble import Ensemble, export_ensemble, load_ensemble
    from ignite_trainer.splits import assign_folds, read_split_file, write_split_file
    from ignite_trainer.sweep_space import SweepSpace, load_space
    from ignite_trainer.data.datasets import EvalWindows, TrainWindows, split_patients
    from ignite_trainer.data.features import FeatureCache, FeatureSettings
    from ignite_trainer.data.loaders import (EpochSampler, ResidentEvalLoader, ResidentTrainLoader, make_eval_loader,
                                             make_train_loader, set_sampler_position)
    from ignite_trainer.data.readers import read_recordings
    from ignite_trainer.augment import Augmenter, AugmentSettings
    from ignite_trainer.data.demographics import DEMOGRAPHIC_FEATURES, Demographics, encode_demographics
    from ignite_trainer.data.records import Recording
    from ignite_trainer.data.synthetic import write_synthetic
    from ignite_trainer.engine import StepEvents, create_evaluator, create_trainer, read_step_stats
    from ignite_trainer.errors import CheckpointError, ConfigError, DataError, TrainingAborted, UserError
    from ignite_trainer.evaluation import evaluate
    from ignite_trainer.events import TrainerEvents
    from ignite_trainer.handlers import (attach_best_checkpoint, attach_early_stopping, attach_last_checkpoint,
                                         attach_lr_scheduler, attach_metrics_log, attach_nan_guard,
                                         attach_progress_bar, attach_sampler_epoch, attach_tensorboard,
                                         attach_validation, training_state)
    from ignite_trainer.inference import predict
    from ignite_trainer.challenge_scores import (CHALLENGE_OUTPUT_CLASSES, MURMUR_CLASSES, OUTCOME_CLASSES,
                                                 ChallengeScores, format_challenge_output,
                                                 read_challenge_outputs, scores_from_outputs, write_scores_csv)
    from ignite_trainer.decision import DecisionLayer, PatientFeatures, fit_decision, patient_features
    from ignite_trainer.model_files import TrainedModel, export_safetensors, load_trained_model
    from ignite_trainer.predictor import PatientPrediction, Predictor, challenge_recordings
    from ignite_trainer.writers import write_challenge_outputs, write_predictions_csv
    from ignite_trainer.losses import WeightedBCELoss
    from ignite_trainer.metrics import MaskedLoss, PerLabelMetrics
    from ignite_trainer.fusion import DemographicsFusion
    from ignite_trainer.models import available_models, build_model, register_model
    from ignite_trainer.predictions import (PredictionCollector, attach_decision_fitting, attach_pr_curves,
                                            attach_threshold_tuning, recording_predictions)
    from ignite_trainer.run import train
    from ignite_trainer.console import attach_epoch_lines, best_summary
    from ignite_trainer.epoch_scalars import EpochScalars
    from ignite_trainer.run_lock import hold_run_lock
    from ignite_trainer.runs_table import RunRow, read_runs
    from ignite_trainer.standard import attach_standard_handlers
    from ignite_trainer.tensorboard_epoch import attach_epoch_tensorboard
    from ignite_trainer.tracking import attach_mlflow, close_mlflow
    from ignite_trainer.vocabulary import LABELS
