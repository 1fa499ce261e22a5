"""One patient in, the Challenge's answer out: in-memory inference for submissions and services.

`predict` works on folders through the feature cache, which suits a dataset but not a Challenge entry or a
service: they hold one patient's recordings as arrays, may not write anywhere, and must answer for every
patient. `Predictor` takes the arrays, computes the features in memory (`data.features.compute_features`,
the same pipeline the cache stores, with no cache read or written), runs the model(s) over the same windows
`EvalWindows` cuts, aggregates recordings into the patient as the run does, and decides with the model's
`DecisionLayer`, so a patient gets the same calls here as from ``predict`` on a folder, and the same
probabilities up to float32 rounding (the model sees its windows in other batches: about 1e-8).

A `Predictor` exists to give the Challenge's answer, so a model that may not make the Challenge's calls
(`model_files.challenge_refusal`: it never learned both labels, or its decision layer was fitted on no
patient with one of them) is refused when the `Predictor` is made, with one `CheckpointError` line, never
answered with calls nothing was fitted to; so are members that learned different labels.

Robustness: a recording that cannot be used (empty, shorter than the band-pass filter needs, non-finite
samples, a bad sample rate, not mono) is skipped with a warning naming the patient and the recording; a
patient with no usable recording gets the decision layer's prior answer (the validation class frequencies,
`DecisionLayer.prior_outputs`), never an exception.

Ensembles: `Predictor.load` takes a cross-validation experiment directory, a file written by
`export.export_ensemble`, or a list of models (run directories, checkpoints, safetensors files or
`TrainedModel` objects); each recording's probability is the mean of the members' probabilities
(`ensemble.mean_probabilities`, the same combination `evaluate` and `predict` use) before the patient is
aggregated and decided by ``decision`` when given, else the ensemble's own layer (`ensemble.load_ensemble`:
an experiment's or an export's out-of-fold layer; for a plain list, the first member's).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, Union

import numpy as np
import torch

from ignite_trainer.scoring.challenge import CHALLENGE_OUTPUT_CLASSES
from ignite_trainer.data.datasets import frames_per_window
from ignite_trainer.data.features import FeatureSettings, compute_features
from ignite_trainer.scoring.decision import DecisionLayer, PatientFeatures
from ignite_trainer.scoring.calibration import apply_temperatures
from ignite_trainer.use.ensemble import Ensemble, check_same_labels, load_model, mean_probabilities
from ignite_trainer.core.errors import CheckpointError, ConfigError, DataError
from ignite_trainer.use.bags import is_patient_model, patient_window_probabilities
from ignite_trainer.use.model_files import TrainedModel, challenge_refusal
from ignite_trainer.scoring.predictions import aggregate
from ignite_trainer.training.runtime import resolve_device
from ignite_trainer.core.vocabulary import AGGREGATIONS, LABELS

__all__ = ["Predictor", "PatientPrediction", "RecordingInput", "challenge_recordings"]

log = logging.getLogger("ignite_trainer")

#: One recording: samples (1-D; integer PCM is scaled to [-1, 1) as the WAV reader does), sample rate in Hz,
#: auscultation location (or None).
RecordingInput = tuple[np.ndarray, float, Union[str, None]]
ModelSource = Union[str, Path, TrainedModel]


@dataclass(frozen=True)
class PatientPrediction:
    """A patient's Challenge triple plus the model's own per-label probabilities.

    ``classes``, ``labels`` (0/1) and ``probabilities`` are what a Challenge entry returns (order
    `CHALLENGE_OUTPUT_CLASSES`); ``per_label_probs`` the patient-level ``heart`` and ``murmur`` probabilities
    (None when no recording was usable); ``skipped`` one message per recording left out; ``from_prior``
    True when no recording was usable and the answer is the prior.

    Example::

        result = predictor.predict_patient([(audio, 4000, "AV")], "50001 1 4000\\nAV 50001_AV.hea ...")
        dict(zip(result.classes, result.probabilities))
    """

    patient_id: str
    classes: tuple[str, ...]
    labels: tuple[int, ...]
    probabilities: tuple[float, ...]
    per_label_probs: dict[str, float | None]
    skipped: tuple[str, ...] = ()
    from_prior: bool = False


def challenge_recordings(metadata_text: str, arrays: Sequence[np.ndarray]) -> list[RecordingInput]:
    """Pair a Challenge patient's arrays with the sample rate and locations its metadata text declares.

    The text is a CirCor patient file: ``<id> <number of locations> <sample rate>`` on the first line, then
    one line per recording starting with its location, in the order the Challenge loader returns the
    arrays. A rate that cannot be read becomes NaN (the recording is then skipped with a warning).

    Example:

        >>> recs = challenge_recordings("9 2 4000\\nAV 9_AV.hea 9_AV.wav 9_AV.tsv\\nMV 9_MV.hea", [np.zeros(8)] * 2)
        >>> [(rate, location) for _, rate, location in recs]
        [(4000.0, 'AV'), (4000.0, 'MV')]
    """
    lines = [line.split() for line in metadata_text.splitlines()]
    head = lines[0] if lines else []
    try:
        rate = float(head[2])
    except (IndexError, ValueError):
        rate = math.nan
    locations = [parts[0] if parts else None for parts in lines[1:1 + len(arrays)]]
    locations += [None] * (len(arrays) - len(locations))
    return [(np.asarray(a), rate, loc) for a, loc in zip(arrays, locations)]


def _patient_id(metadata_text: str) -> str:
    for line in metadata_text.splitlines():
        if line.strip():
            return line.split()[0]
    return "patient"


def _as_float_audio(samples: np.ndarray) -> np.ndarray:
    """Integer PCM scaled to [-1, 1) exactly as `data.wav.read_wav` does for 16-bit; floats unchanged."""
    samples = np.asarray(samples)
    if samples.dtype.kind == "i":
        return samples.astype(np.float32) / np.float32(2.0 ** (8 * samples.dtype.itemsize - 1))
    if samples.dtype.kind == "u":
        half = 2.0 ** (8 * samples.dtype.itemsize - 1)
        return ((samples.astype(np.float64) - half) / half).astype(np.float32)
    if samples.dtype.kind != "f":
        raise DataError(f"samples of dtype {samples.dtype} are not audio")
    return samples


def _window_batch(features: np.ndarray, window_frames: int) -> torch.Tensor:
    """Every window of one recording, cut exactly as `EvalWindows` cuts it: back to back, the leftover covered
    by one more window aligned to the end, a recording shorter than one window zero-padded."""
    n_mels, n = features.shape
    starts = list(range(0, max(n - window_frames, 0) + 1, window_frames))
    if starts[-1] + window_frames < n:
        starts.append(n - window_frames)
    x = torch.zeros(len(starts), n_mels, window_frames, dtype=torch.float32)
    for i, s in enumerate(starts):
        piece = torch.from_numpy(np.array(features[:, s:s + window_frames], dtype=np.float32))
        x[i, :, :piece.shape[1]] = piece
    return x


class Predictor:
    """A trained model (or an ensemble) with its decision layer, answering one patient at a time in memory.

    ``members`` are `TrainedModel` objects; ``decision`` overrides the first member's decision layer (e.g.
    an out-of-fold layer for a cross-validation ensemble); ``aggregation`` (recordings -> patient) defaults
    to the first member's run setting; ``batch_size`` windows go through a model at once (default: the
    first member's training batch size).

    Example::

        predictor = Predictor.load("runs/quick")                     # or a .pt / .safetensors, or a list
        result = predictor.predict_patient([(audio, 4000, "AV"), (audio2, 4000, "MV")], metadata_text)
        print(result.classes, result.labels, result.probabilities)
    """

    def __init__(self, members: Sequence[TrainedModel], decision: DecisionLayer | None = None,
                 aggregation: Literal["mean", "any"] | None = None, device: str = "cpu",
                 batch_size: int | None = None, unknown_margin: float = 0.1) -> None:
        self.members = list(members)
        if not self.members:
            raise ConfigError("a Predictor needs at least one model")
        first = self.members[0]
        check_same_labels(self.members)
        self.decision = decision if decision is not None else first.decision_layer(unknown_margin)
        refusal = challenge_refusal(first.learned_labels, first.config.format, self.decision)
        if refusal is not None:
            raise CheckpointError(f"{first.run_dir or first.source}: {refusal}")
        self.aggregation = aggregation or first.config.aggregation
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation={self.aggregation!r} is not one of: {', '.join(AGGREGATIONS)}")
        self.batch_size = int(batch_size or first.config.batch_size)
        self.device = resolve_device(device)
        for member in self.members:
            member.model.to(self.device).eval()

    @classmethod
    def load(cls, source: ModelSource | Sequence[ModelSource], *, decision: DecisionLayer | None = None,
             aggregation: Literal["mean", "any"] | None = None, device: str = "cpu",
             unknown_margin: float = 0.1) -> Predictor:
        """From a run directory, checkpoint or safetensors file, a `TrainedModel`, or an ensemble: a
        cross-validation experiment directory, an `export_ensemble` file or a list of models (the mean of
        the members' probabilities).

        ``unknown_margin`` only matters for a model saved without a decision layer (the legacy rule).

        Example::

            single = Predictor.load("model.safetensors")
            ensemble = Predictor.load("runs/cv-a")        # out-of-fold thresholds and decision layer
            listed = Predictor.load([f"runs/cv/fold{k}" for k in range(5)], decision=oof_layer)
        """
        model = load_model(source)
        members = model.members if isinstance(model, Ensemble) else [model]
        layer = decision if decision is not None else model.decision_layer(unknown_margin)
        refusal = challenge_refusal(model.learned_labels, model.config.format, layer)
        if refusal is not None:  # named by what was loaded (an experiment, an export), not its first member
            raise CheckpointError(f"{getattr(model, 'run_dir', None) or model.source}: {refusal}")
        return cls(members, decision=layer, aggregation=aggregation, device=device, unknown_margin=unknown_margin)

    # ------------------------------------------------------------------ inference
    def predict_patient(self, recordings: Sequence[RecordingInput], metadata_text: str = "") -> PatientPrediction:
        """The Challenge answer for one patient; nothing is read from or written to disk.

        ``recordings`` are ``(samples, sample_rate, location)``; ``metadata_text`` is the patient's CirCor
        text (its first token names the patient in warnings and in the result).
        """
        patient_id = _patient_id(metadata_text)
        features, skipped = self._features(patient_id, recordings)
        if not features:
            labels, probs = self.decision.prior_outputs()
            return PatientPrediction(patient_id, CHALLENGE_OUTPUT_CLASSES, tuple(int(v) for v in labels),
                                     tuple(float(p) for p in probs), {label: None for label in LABELS},
                                     tuple(skipped), from_prior=True)
        rec_probs = self._recording_probabilities(features)  # [R, 2] in LABELS order
        _, patient = aggregate(rec_probs, [patient_id] * len(rec_probs), self.aggregation)
        heart, murmur = float(patient[0, 0]), float(patient[0, 1])
        decided = PatientFeatures(murmur, heart, float(rec_probs[:, 1].max()), float(rec_probs[:, 1].min()))
        labels, probs = self.decision.outputs([decided])
        return PatientPrediction(patient_id, CHALLENGE_OUTPUT_CLASSES, tuple(int(v) for v in labels[0]),
                                 tuple(float(p) for p in probs[0]), {"heart": heart, "murmur": murmur}, tuple(skipped))

    def _features(self, patient_id: str, recordings: Sequence[RecordingInput]
                  ) -> tuple[list[dict[FeatureSettings, np.ndarray]], list[str]]:
        """Per usable recording, its features under each member's settings; a message per recording left out."""
        settings = list(dict.fromkeys(m.settings for m in self.members))
        usable, skipped = [], []
        for k, item in enumerate(recordings):
            location = item[2] if len(item) > 2 else None
            name = f"patient {patient_id}, recording {k + 1}" + (f" ({location})" if location else "")
            try:
                audio, rate = _as_float_audio(item[0]), float(item[1])
                if not (math.isfinite(rate) and rate >= 1.0):
                    raise DataError(f"{name}: sample rate {item[1]!r} is not a positive number of Hz")
                usable.append({s: compute_features(audio, int(round(rate)), s, source=name) for s in settings})
            except (DataError, TypeError, ValueError, IndexError) as e:
                message = str(e) if str(e).startswith(name) else f"{name}: {e}"
                log.warning("%s; skipped", message)
                skipped.append(message)
        return usable, skipped

    @torch.no_grad()
    def _recording_probabilities(self, features: list[dict[FeatureSettings, np.ndarray]]) -> np.ndarray:
        """[R, 2]: each recording's mean window probability, averaged over the members; a patient model
        (`bags.patient_window_probabilities`) gives every recording its patient's probabilities."""
        per_member = []
        for member in self.members:
            window_frames = frames_per_window(member.settings, member.config.window_seconds)
            if is_patient_model(member):  # one answer for the patient, carried by each of its recordings
                windows = [_window_batch(rec[member.settings], window_frames) for rec in features]
                patient, _ = patient_window_probabilities(member.model, windows, self.batch_size, self.device)
                per_member.append(np.tile(patient, (len(features), 1)))
                continue
            probs = []
            for rec in features:
                x = _window_batch(rec[member.settings], window_frames)
                chunks = [member.model(x[i:i + self.batch_size].to(self.device))[0]
                          for i in range(0, len(x), self.batch_size)]
                windows = torch.sigmoid(torch.cat(chunks).float()).double().cpu().numpy()
                if member.applies_calibration:  # calibrate: true, as `windows.run_windows` does
                    windows = apply_temperatures(windows, member.temperatures)
                probs.append(aggregate(windows, [0] * len(windows), "mean")[1][0])
            per_member.append(np.stack(probs))
        return per_member[0] if len(per_member) == 1 else mean_probabilities(per_member)
