"""After each validation, what the validation predictions decide: per-label thresholds and the Challenge decision layer.

Both read the evaluator's `metrics.PredictionCollector` output, aggregate it to the validation recordings
(`scoring.predictions.recording_predictions`) and store the result on ``trainer.state``, where the best
checkpoint's snapshots, the metrics log and TensorBoard read it.
"""

from __future__ import annotations

from typing import Any, Callable

from ignite.engine import Engine

from ignite_trainer.scoring.calibration import calibrated_windows
from ignite_trainer.scoring.decision import fit_decision
from ignite_trainer.scoring.predictions import (Aggregation, LevelPredictions, Objective, patient_predictions,
                                                recording_predictions, scores_at_thresholds, tune_thresholds)
from ignite_trainer.training.events import TrainerEvents

__all__ = ["attach_threshold_tuning", "attach_decision_fitting", "validation_recordings"]


def validation_recordings(trainer: Engine, metric_name: str, val_dataset: Any) -> LevelPredictions:
    output = getattr(trainer.state, "validation_output", None)
    if output is None or metric_name not in output.metrics:
        raise KeyError(f"no '{metric_name}' in the evaluator's metrics; attach a PredictionCollector under that name")
    windows = output.metrics[metric_name]
    calibration = getattr(trainer.state, "calibration", None)
    if calibration is not None and calibration.applied:  # calibrate: true (`temperature`): decide on calibrated ones
        windows = calibrated_windows(windows, calibration.temperatures)
    return recording_predictions(windows, val_dataset.window_recording, val_dataset.recordings)


def attach_threshold_tuning(trainer: Engine, evaluator_metric_name: str, objective: Objective,
                            val_dataset: Any) -> Callable[[Engine], None]:
    """After each validation, tune per-label thresholds on the validation recordings.

    Sets ``trainer.state.thresholds = {"heart": t, "murmur": t}`` (the metrics log and TensorBoard read
    them from there) and ``trainer.state.threshold_scores``, each label's `scores_at_thresholds` on those
    recordings. Attach it right after `handlers.attach_validation`, before the best checkpoint, so
    that a ``Snapshot`` of the thresholds in the checkpoint sees this validation's values
    (`standard.attach_standard_handlers` does). ``val_dataset`` is the `EvalWindows` the evaluator ran on.

    Example::

        PredictionCollector().attach(evaluator, "predictions")
        attach_validation(trainer, evaluator, val_loader)
        attach_threshold_tuning(trainer, "predictions", config.threshold_objective, val_dataset)
        to_save["thresholds"] = Snapshot(lambda: getattr(trainer.state, "thresholds", None))
    """

    def tune(engine: Engine) -> None:
        recs = validation_recordings(engine, evaluator_metric_name, val_dataset)
        engine.state.thresholds = tune_thresholds(recs.probs, recs.targets, recs.mask, objective)
        engine.state.threshold_scores = scores_at_thresholds(recs.probs, recs.targets, recs.mask,
                                                             engine.state.thresholds)

    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, tune)
    return tune


def attach_decision_fitting(trainer: Engine, evaluator_metric_name: str, val_dataset: Any,
                            aggregation: Aggregation = "mean") -> Callable[[Engine], None]:
    """After each validation, fit the Challenge decision layer on the validation patients.

    Sets ``trainer.state.decision`` to a `decision.DecisionLayer` (`decision.fit_decision` on the patients
    aggregated with ``aggregation``, as evaluation will aggregate them). Attach it before the best
    checkpoint, whose ``decision`` snapshot stores ``state.decision.to_dict()`` (plain strings and floats,
    so the file still loads with ``weights_only=True``).

    Example::

        attach_threshold_tuning(trainer, "predictions", config.threshold_objective, val_dataset)
        attach_decision_fitting(trainer, "predictions", val_dataset, config.aggregation)
        to_save["decision"] = Snapshot(lambda: trainer.state.decision.to_dict())
    """

    def fit(engine: Engine) -> None:
        recs = validation_recordings(engine, evaluator_metric_name, val_dataset)
        patients = patient_predictions(recs, val_dataset.recordings, aggregation)
        engine.state.decision = fit_decision(patients, recs)

    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, fit)
    return fit
