"""Every window of some recordings through one trained model: the one loop that feeds recordings to a model.

`run_windows` computes (or reads) the features through the run's feature cache, cuts every window
`EvalWindows` cuts (padding a recording shorter than one window), runs the model over them and returns a
`WindowRun`, whose `WindowRun.levels` gives window, recording and patient predictions. `inference.predict`,
`evaluation.evaluate` and `ensemble.Ensemble.levels` all run a model through here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ignite_trainer.core.config import cache_root
from ignite_trainer.core.vocabulary import HEADS, PREDICTIONS
from ignite_trainer.data.datasets import EvalWindows
from ignite_trainer.data.head_targets import HeadTargets
from ignite_trainer.data.features import FeatureCache, feature_workers
from ignite_trainer.data.loaders import make_eval_loader
from ignite_trainer.data.records import Recording
from ignite_trainer.scoring.calibration import calibrated_windows
from ignite_trainer.scoring.predictions import (LevelPredictions, WindowPredictions, patient_predictions,
                                                recording_predictions, window_level)
from ignite_trainer.training.engine import create_evaluator
from ignite_trainer.training.head_metrics import HeadCollector, WindowHeads
from ignite_trainer.training.metrics import PredictionCollector
from ignite_trainer.training.runtime import resolve_device
from ignite_trainer.use.bags import BagRun, is_patient_model, run_bags

__all__ = ["WindowRun", "run_windows"]

log = logging.getLogger("ignite_trainer")


@dataclass
class WindowRun:
    """The model's output on every window of ``dataset``, and the warnings the inputs raised."""

    windows: WindowPredictions
    dataset: EvalWindows
    warnings: list[str]
    #: The auxiliary heads' outputs per window (a model trained with ``heads``), else None.
    heads: WindowHeads | None = None
    #: The model's own probabilities, before its temperatures (the same object as ``windows`` unless the
    #: model decides on calibrated probabilities, `TrainedModel.applies_calibration`).
    raw_windows: WindowPredictions | None = None

    def patients(self, windows: WindowPredictions, how: Literal["mean", "any"] = "mean") -> LevelPredictions:
        """Patient predictions of some window probabilities of these windows (e.g. ``raw_windows``)."""
        recs = recording_predictions(windows, self.dataset.window_recording, self.dataset.recordings)
        return patient_predictions(recs, self.dataset.recordings, how)

    def levels(self, how: Literal["mean", "any"] = "mean"
               ) -> tuple[LevelPredictions, LevelPredictions, LevelPredictions]:
        """Window, recording (mean of windows) and patient (``how`` over recordings) predictions."""
        recordings = self.dataset.recordings
        windows = window_level(self.windows, self.dataset.window_recording, recordings)
        recs = recording_predictions(self.windows, self.dataset.window_recording, recordings)
        return windows, recs, patient_predictions(recs, recordings, how)


def run_windows(trained, recordings: Sequence[Recording], device: str = "cpu",
                batch_size: int | None = None, cache_dir: str | Path | None = None) -> WindowRun | BagRun:
    """Features (through the run's feature cache) -> every window -> the model -> `WindowPredictions`.

    ``trained`` is a `model_files.TrainedModel` (its ``model``, ``config`` and ``settings`` are used). A
    recording shorter than one window is zero-padded to a full window (as training pads its crops), with a
    warning naming it; one too short for the band-pass filter is a `DataError`. A patient model (its saved
    config's ``patient_model``) gives a `bags.BagRun` instead, with the same ``levels`` (no window level).

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
    if is_patient_model(trained):  # its output is per patient: pooled by its attention, not averaged here
        return run_bags(model, dataset, batch_size or config.eval_batch_size or config.batch_size, torch_device,
                        warnings)
    loader = make_eval_loader(dataset, batch_size or config.eval_batch_size or config.batch_size, 0, torch_device)
    heads = config.head_names
    metrics = {PREDICTIONS: PredictionCollector()}
    if heads:  # unlabelled or unannotated recordings have every head target missing: the heads still predict
        metrics[HEADS] = HeadCollector(heads)
    evaluator = create_evaluator(model, metrics, torch_device,
                                 head_targets=HeadTargets(dataset, heads).to(torch_device) if heads else None)
    found = evaluator.run(loader).metrics
    raw = found[PREDICTIONS]
    # calibrate: true: every level is built from the temperature-scaled windows; otherwise untouched, bit for bit
    windows = calibrated_windows(raw, trained.temperatures) if getattr(trained, "applies_calibration", False) else raw
    return WindowRun(windows, dataset, warnings, heads=found.get(HEADS), raw_windows=raw)
