"""Running a trained model: every window of some recordings through the model, then `predict`'s decisions.

`run_windows` is the one loop that feeds recordings to a model (through the feature cache, padding a
recording shorter than one window), shared by `predict` and `evaluation.evaluate`; `predict` turns its
output into per-recording and per-patient decisions with the thresholds and the decision layer stored
with the model. Loading
models lives in `model_files`, finding inputs in `data.discovery`, writing files in `writers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ignite_trainer.data.datasets import EvalWindows
from ignite_trainer.data.discovery import discover_recordings
from ignite_trainer.data.features import FeatureCache, feature_workers
from ignite_trainer.data.loaders import make_eval_loader
from ignite_trainer.data.records import Recording
from ignite_trainer.scoring.decision import DecisionLayer, PatientFeatures, patient_features
from ignite_trainer.training.engine import create_evaluator
from ignite_trainer.use.model_files import TrainedModel
from ignite_trainer.scoring.predictions import (LevelPredictions, WindowPredictions, patient_predictions, recording_predictions, unknown_band, window_level)
from ignite_trainer.training.metrics import PredictionCollector
from ignite_trainer.core.config import cache_root
from ignite_trainer.training.runtime import resolve_device

__all__ = ["WindowRun", "run_windows", "PredictionResult", "predict"]

log = logging.getLogger("ignite_trainer")


@dataclass
class WindowRun:
    """The model's output on every window of ``dataset``, and the warnings the inputs raised."""

    windows: WindowPredictions
    dataset: EvalWindows
    warnings: list[str]

    def levels(self, how: Literal["mean", "any"] = "mean"
               ) -> tuple[LevelPredictions, LevelPredictions, LevelPredictions]:
        """Window, recording (mean of windows) and patient (``how`` over recordings) predictions."""
        recordings = self.dataset.recordings
        windows = window_level(self.windows, self.dataset.window_recording, recordings)
        recs = recording_predictions(self.windows, self.dataset.window_recording, recordings)
        return windows, recs, patient_predictions(recs, recordings, how)


def run_windows(trained: TrainedModel, recordings: Sequence[Recording], device: str = "cpu",
                batch_size: int | None = None, cache_dir: str | Path | None = None) -> WindowRun:
    """Features (through the run's feature cache) -> every window -> the model -> `WindowPredictions`.

    A recording shorter than one window is zero-padded to a full window (as training pads its crops),
    with a warning naming it; one too short for the band-pass filter is a `DataError`.

    Example::

        run = run_windows(load_trained_model("runs/quick"), discover_recordings(["new/"]))
        windows, recordings, patients = run.levels("mean")
    """
    config = trained.config
    root = Path(cache_dir) if cache_dir is not None else cache_root(config)
    cache = FeatureCache(root / "features", trained.settings)
    usable = cache.prepare(recordings, policy=None, workers=feature_workers())
    dataset = EvalWindows(usable, cache, config.window_seconds, demographics=config.demographics)
    warnings = []
    for r, n in zip(dataset.recordings, dataset.n_frames):
        if n < dataset.window_frames:
            message = (f"{r.wav_path}: {n / trained.settings.frames_per_second:.2f} s is shorter than one "
                       f"{config.window_seconds:g} s window; zero-padded to one window")
            log.warning(message)
            warnings.append(message)
    torch_device = resolve_device(device)
    model = trained.model.to(torch_device)
    loader = make_eval_loader(dataset, batch_size or config.eval_batch_size or config.batch_size, 0, torch_device)
    evaluator = create_evaluator(model, {"predictions": PredictionCollector()}, torch_device)
    windows = evaluator.run(loader).metrics["predictions"]
    return WindowRun(windows, dataset, warnings)


# ---------------------------------------------------------------------------------------------- predicting
@dataclass
class PredictionResult:
    """Per-recording and per-patient probabilities, the thresholds of the per-label decisions, and the
    Challenge decision layer that makes the Present/Unknown/Absent and Abnormal/Normal calls."""

    recordings: LevelPredictions
    patients: LevelPredictions
    thresholds: dict[str, float]
    unknown_margin: float
    source: Path
    warnings: list[str]
    decision: DecisionLayer | None = None  # None: the legacy rule from the thresholds and unknown_margin

    @property
    def layer(self) -> DecisionLayer:
        """The decision layer in use (stored with the model, or the legacy band rule)."""
        if self.decision is not None:
            return self.decision
        return DecisionLayer.legacy(self.thresholds["murmur"], self.thresholds["heart"], self.unknown_margin)

    def _features(self, level: LevelPredictions) -> list[PatientFeatures]:
        if level.level == "patient":
            return patient_features(level, self.recordings)
        return [PatientFeatures.single(float(m), float(h)) for h, m in level.probs[:, :2]]

    def murmur_classes(self, level: LevelPredictions) -> list[str]:
        """Present/Unknown/Absent per item; a recording is decided as a patient with that one recording."""
        return self.layer.murmur.decide(self._features(level))

    def outcome_classes(self, level: LevelPredictions) -> list[str]:
        """Abnormal/Normal per item, by the decision layer's outcome threshold."""
        return self.layer.outcome.decide(self._features(level))

    def challenge_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Per patient, the Challenge's binary calls [N, 5] and probabilities [N, 5] (`CHALLENGE_OUTPUT_CLASSES`)."""
        return self.layer.outputs(self._features(self.patients))


def predict(model, inputs: Sequence[str | Path], fmt: str | None = None,
            aggregation: Literal["mean", "any"] | None = None, unknown_margin: float = 0.1,
            device: str = "cpu") -> PredictionResult:
    """Run a trained model or an ensemble on WAV files or dataset folders (labels, if any, are ignored).

    ``model`` is a run directory, checkpoint, safetensors export or `TrainedModel`, or an ensemble
    (`ensemble.load_model`: a cross-validation experiment directory, an `export_ensemble` file or a list of
    models), whose recording probabilities are the mean of its members' probabilities and whose
    thresholds and decision layer are its own (an experiment's: tuned out of fold).

    ``aggregation`` defaults to the run's own (``config.aggregation``); the per-label thresholds are the
    tuned ones stored with the model (0.5 where it holds none); the Challenge calls come from the decision
    layer stored with the model or, for a model without one, from the legacy rule: murmur probabilities
    within ``unknown_margin`` of the murmur threshold are called "Unknown" (see `predictions.unknown_band`).

    Example::

        result = predict("runs/quick", ["patient_folder/"])
        write_predictions_csv(result, "predictions.csv")
    """
    from ignite_trainer.use.ensemble import Ensemble, load_model

    trained = load_model(model)
    unknown_band(trained.thresholds["murmur"], unknown_margin)  # rejects a negative margin before the model runs
    recordings = discover_recordings(inputs, fmt)
    if isinstance(trained, Ensemble):
        recs, patients, warnings = trained.levels(recordings, aggregation, device=device)
        return PredictionResult(recs, patients, dict(trained.thresholds), unknown_margin, trained.source, warnings,
                                trained.decision)
    run = run_windows(trained, recordings, device=device)
    _, recs, patients = run.levels(aggregation or trained.config.aggregation)
    return PredictionResult(recs, patients, dict(trained.thresholds), unknown_margin, trained.source, run.warnings,
                            trained.decision)
