"""A patient model (`model.mil.PatientMIL`) over recordings: patient probabilities and which recording drove them.

A patient model answers per patient, not per window. `run_bags` embeds every window `EvalWindows` cuts
(in batches of windows, so a patient with many windows costs no more memory than a window model's
evaluation), pools each patient's windows with the model's gated attention and returns a `BagRun` whose
levels are those a window model's `windows.WindowRun` gives, so `evaluate`, `predict`, ensembles and
cross-validation read them unchanged:

- patients: the model's patient probabilities, exactly;
- recordings: each recording carries its patient's probabilities (a patient model makes no per-recording
  prediction), so every aggregation rule gives the patient back and the decision layer sees no spread
  between a patient's recordings, as when it was fitted on validation patients; ``attention`` is each
  recording's share of its patient's attention (the sum of its windows' weights), the part it played;
- windows: none (None).

`patient_window_probabilities` does the same for one patient's windows in memory (the `Predictor`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ignite_trainer.data.bags import EvalBags
from ignite_trainer.data.datasets import EvalWindows
from ignite_trainer.data.loaders import make_eval_loader
from ignite_trainer.scoring.predictions import (
    LevelPredictions,
    WindowPredictions,
    patient_predictions,
    recording_predictions,
)

__all__ = ["BagRun", "is_patient_model", "patient_window_probabilities", "run_bags"]


def is_patient_model(trained) -> bool:
    """Whether a loaded model (a `model_files.TrainedModel`) is a patient model: its saved config says so."""
    return bool(getattr(trained.config, "patient_model", False))


@dataclass
class BagRun:
    """A patient model's output on the patients of ``dataset`` (their windows), and the inputs' warnings.

    ``patient_probs [P, 2]`` in ``bags`` order; ``attention`` maps each recording id to its share of its
    patient's attention (the shares of a patient's recordings sum to 1).
    """

    dataset: EvalWindows
    bags: EvalBags
    patient_probs: np.ndarray
    attention: dict[str, float]
    warnings: list[str]

    def levels(self, how: Literal["mean", "any"] = "mean"
               ) -> tuple[None, LevelPredictions, LevelPredictions]:
        """``(None, recordings, patients)``: no window level; see the module for what each level holds."""
        recordings = self.dataset.recordings
        patient_of = np.empty(len(recordings), dtype=np.int64)
        for p, group in enumerate(self.bags.groups):
            patient_of[group] = p
        per_window = self.patient_probs[patient_of[np.asarray(self.dataset.window_recording, dtype=np.int64)]]
        windows = WindowPredictions(probs=per_window, targets=np.zeros_like(per_window),
                                    mask=np.ones(per_window.shape, dtype=bool), index=np.arange(len(per_window)))
        recs = recording_predictions(windows, self.dataset.window_recording, recordings)
        recs = dataclasses.replace(recs, probs=self.patient_probs[patient_of].copy())  # exact, not a mean of copies
        patients = patient_predictions(recs, recordings, how)
        row = {r.patient_id: p for p, r in enumerate(self.bags.recordings)}
        exact = self.patient_probs[[row[pid] for pid in patients.ids]]
        return None, recs, dataclasses.replace(patients, probs=exact.copy())


def _pool(model: torch.nn.Module, h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One patient's instance embeddings ``[n, H]`` -> probabilities ``[2]`` and attention weights ``[n]``."""
    logits, weights = model.pool(h[None], torch.ones(1, h.shape[0], dtype=torch.bool, device=h.device))
    return (torch.sigmoid(logits.float()).double().cpu().numpy()[0], weights.double().cpu().numpy()[0])


@torch.inference_mode()
def run_bags(model: torch.nn.Module, dataset: EvalWindows, batch_size: int, device: torch.device,
             warnings: Sequence[str] = ()) -> BagRun:
    """A patient model (eval mode, on ``device``) over every window of ``dataset``, pooled per patient.

    Example::

        run = run_bags(trained.model, EvalWindows(recordings, cache, 4.0), 64, torch.device("cpu"))
        _, recordings, patients = run.levels()
        run.attention["50001_AV"]          # the share of patient 50001's attention on that recording
    """
    model.eval()
    bags = EvalBags(dataset)
    loader = make_eval_loader(dataset, batch_size, 0, device)
    chunks = [model.instances(batch[0].to(device)).float() for batch in loader]
    h = torch.cat(chunks)  # [windows, H] in window order
    probs, attention = np.zeros((len(bags), 2)), {}
    for p, windows in enumerate(bags.instances):
        probs[p], weights = _pool(model, h[windows])
        share: dict[int, float] = {}
        for i, w in zip(windows, weights.tolist()):
            r = dataset.window_recording[i]
            share[r] = share.get(r, 0.0) + w
        attention.update({dataset.recordings[r].recording_id: s for r, s in share.items()})
    return BagRun(dataset, bags, probs, attention, list(warnings))


@torch.inference_mode()
def patient_window_probabilities(model: torch.nn.Module, windows: Sequence[torch.Tensor], batch_size: int,
                                 device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """One patient in memory: ``windows[r]`` is recording ``r``'s ``[n_r, n_mels, T]`` windows; returns the
    patient's probabilities ``[2]`` and each recording's share of the attention ``[R]``."""
    x = torch.cat(list(windows))
    h = torch.cat([model.instances(x[i:i + batch_size].to(device)).float() for i in range(0, len(x), batch_size)])
    probs, weights = _pool(model, h)
    edges = np.cumsum([0] + [len(w) for w in windows])
    return probs, np.array([weights[a:b].sum() for a, b in itertools.pairwise(edges)])
