"""Predicting with a trained model or an ensemble: per-recording and per-patient decisions for new recordings.

`predict` finds the inputs (`data.discovery`), runs the model over every window (`windows.run_windows`;
an ensemble through `ensemble.Ensemble.levels`) and returns a `PredictionResult`: probabilities, the
thresholds and the decision layer stored with the model, and the Challenge calls they make. A model that
never learned both labels, or whose decision layer was fitted on no patient with one of them
(`model_files.challenge_refusal`), still predicts probabilities, but its Challenge calls are refused.
Loading models lives in `model_files` and `ensemble`, writing files in `writers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.data.discovery import discover_recordings
from ignite_trainer.scoring.decision import DecisionLayer, PatientFeatures, patient_features
from ignite_trainer.scoring.predictions import LevelPredictions, unknown_band
from ignite_trainer.use.ensemble import Ensemble, load_model
from ignite_trainer.use.model_files import challenge_refusal
from ignite_trainer.use.windows import run_windows
from ignite_trainer.data.datasets import EvalWindows
from ignite_trainer.training.head_metrics import WindowHeads

__all__ = ["PredictionResult", "predict"]


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
    #: Why this model may not make the Challenge's calls (`model_files.challenge_refusal`); None: it may.
    challenge_refusal: str | None = None
    #: A model with auxiliary heads: their outputs per window and the windows (`heads_output.write_attributes_csv`).
    heads: tuple[WindowHeads, EvalWindows] | None = None
    #: A patient model's share of each patient's attention per recording id (`bags.BagRun`); None otherwise.
    attention: dict[str, float] | None = None

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
        """Per patient, the Challenge's binary calls [N, 5] and probabilities [N, 5] (`CHALLENGE_OUTPUT_CLASSES`);
        a `CheckpointError` when the model may not make them (``challenge_refusal``)."""
        if self.challenge_refusal is not None:
            raise CheckpointError(f"{self.source}: {self.challenge_refusal}")
        return self.layer.outputs(self._features(self.patients))


def predict(model, inputs: Sequence[str | Path], fmt: str | None = None,
            aggregation: Literal["mean", "any"] | None = None, unknown_margin: float = 0.1,
            device: str = "cpu", challenge: bool = False) -> PredictionResult:
    """Run a trained model or an ensemble on WAV files or dataset folders (labels, if any, are ignored).

    ``model`` is a run directory, checkpoint, safetensors export or `TrainedModel`, or an ensemble
    (`ensemble.load_model`: a cross-validation experiment directory, an `export_ensemble` file or a list of
    models), whose recording probabilities are the mean of its members' probabilities and whose
    thresholds and decision layer are its own (an experiment's: tuned out of fold).

    ``aggregation`` defaults to the run's own (``config.aggregation``); the per-label thresholds are the
    tuned ones stored with the model (0.5 where it holds none); the Challenge calls come from the decision
    layer stored with the model or, for a model without one, from the legacy rule: murmur probabilities
    within ``unknown_margin`` of the murmur threshold are called "Unknown" (see `predictions.unknown_band`).
    With ``challenge`` (Challenge files will be written), a model that may not make the Challenge's calls
    (`model_files.challenge_refusal`) is refused before anything runs; without it, the result carries the
    reason and `PredictionResult.challenge_outputs` refuses.

    Example::

        result = predict("runs/quick", ["patient_folder/"])
        write_predictions_csv(result, "predictions.csv")
    """
    trained = load_model(model)
    unknown_band(trained.thresholds["murmur"], unknown_margin)  # rejects a negative margin before the model runs
    refusal = challenge_refusal(trained.learned_labels, trained.config.format, trained.decision)
    name = getattr(trained, "run_dir", None) or trained.source
    if challenge and refusal is not None:
        raise CheckpointError(f"{name}: {refusal}")
    recordings = discover_recordings(inputs, fmt)
    if isinstance(trained, Ensemble):
        recs, patients, warnings = trained.levels(recordings, aggregation, device=device)
        return PredictionResult(recs, patients, dict(trained.thresholds), unknown_margin, trained.source, warnings,
                                trained.decision, refusal)
    run = run_windows(trained, recordings, device=device)
    _, recs, patients = run.levels(aggregation or trained.config.aggregation)
    return PredictionResult(recs, patients, dict(trained.thresholds), unknown_margin, trained.source, run.warnings,
                            trained.decision, refusal, None if getattr(run, "heads", None) is None else (run.heads, run.dataset),
                            getattr(run, "attention", None))
