"""Using a trained model: load it (run directory, checkpoint or safetensors export), export it, run it on recordings.

A trained model is only useful away from its training run, so everything that `evaluate` and `predict`
share lives here: `load_trained_model` rebuilds the exact model and feature settings from what the file
itself stores (never from the current defaults), `export_safetensors` writes one self-contained file,
`discover_recordings` turns WAV files or a dataset folder (labelled or not, either format) into
`Recording` objects, `run_windows` runs the model over every window, and `predict` / the two writers turn
that into per-recording and per-patient decisions (CSV, and the 2022 Challenge's per-patient files).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TextIO

import safetensors
import safetensors.torch
import torch
import yaml

from ignite_trainer.checkpoint import load_checkpoint, load_model_weights
from ignite_trainer.config import TrainConfig
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.circor import LOCATIONS, parse_patient_file, patient_folder, read_training_table
from ignite_trainer.data.datasets import EvalWindows
from ignite_trainer.data.features import FeatureCache, FeatureSettings, feature_workers
from ignite_trainer.data.loaders import make_eval_loader
from ignite_trainer.data.records import LABELS, Recording
from ignite_trainer.engine import create_evaluator
from ignite_trainer.errors import CheckpointError, ConfigError, DataError
from ignite_trainer.models import build_model
from ignite_trainer.predictions import (
    DEFAULT_THRESHOLDS, LevelPredictions, PredictionCollector, WindowPredictions, murmur_classes,
    patient_predictions, recording_predictions, unknown_band, window_level,
)
from ignite_trainer.run import cache_root, resolve_device

__all__ = [
    "TrainedModel", "find_best_checkpoint", "load_trained_model", "export_safetensors", "detect_format",
    "has_labels", "discover_recordings", "WindowRun", "run_windows", "PredictionResult", "predict",
    "write_predictions_csv", "write_challenge_outputs", "CHALLENGE_CLASSES", "PREDICTION_COLUMNS",
]

log = logging.getLogger("ignite_trainer")

SAFETENSORS_FORMAT = "ignite_trainer/1"
#: The 2022 Challenge's class order in its per-patient output files.
CHALLENGE_CLASSES = ("Present", "Unknown", "Absent", "Abnormal", "Normal")
PREDICTION_COLUMNS = ("level", "id", "patient_id", "windows", "heart_prob", "heart_pred", "murmur_prob",
                      "murmur_pred", "murmur_class")
_BEST = re.compile(r"^best_checkpoint_(\d+)_.*=(-?[0-9.]+(?:e[-+]?\d+)?)\.pt$", re.IGNORECASE)
_CIRCOR_NAME = re.compile(r"^(?P<pid>.+?)_(?:" + "|".join(LOCATIONS) + r")(?:_\d+)?$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class TrainedModel:
    """A model ready to run (eval mode) with everything needed to feed it and read its output."""

    model: torch.nn.Module
    config: TrainConfig
    settings: FeatureSettings
    thresholds: dict[str, float]
    thresholds_tuned: bool  # False: the file held none, 0.5 is used
    source: Path
    run_dir: Path | None
    epoch: int | None


def find_best_checkpoint(run_dir: str | Path) -> Path:
    """The best checkpoint of a run: highest score in ``best_checkpoint_<epoch>_<name>=<score>.pt``.

    Scores in the names are "larger is better" (a loss is stored negated); ties go to the later epoch.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    ranked = []
    for p in ckpt_dir.glob("best_checkpoint_*.pt") if ckpt_dir.is_dir() else []:
        m = _BEST.match(p.name)
        if m:
            ranked.append((float(m.group(2)), int(m.group(1)), p))
    if not ranked:
        raise CheckpointError(f"{run_dir}: no best_checkpoint_*.pt in {ckpt_dir} (has the run validated an epoch?)")
    return max(ranked)[2]


def load_trained_model(path: str | Path, map_location: str | torch.device = "cpu") -> TrainedModel:
    """Load a run directory (its best checkpoint), a ``.pt`` checkpoint or a ``.safetensors`` export.

    The model, its feature settings and its window length come from the config stored *in the file*, so a
    file can never be run with settings other than its own; weights that do not fit that model (another
    model or feature setting) are a one-line `CheckpointError`, as are a missing config and a model name
    that is not registered. Checkpoints are only ever read with ``weights_only=True``.

    Example::

        trained = load_trained_model("runs/quick")          # or runs/quick/checkpoints/best_...pt
        print(trained.config.model, trained.thresholds)
    """
    path = Path(path)
    if path.is_dir():
        run_dir: Path | None = path
        path = find_best_checkpoint(path)
    elif not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    else:
        parent = path.parent
        run_dir = parent.parent if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file() else None
    if path.suffix == ".safetensors":
        state, saved, thresholds, epoch = _read_safetensors(path)
    else:
        ckpt = load_checkpoint(path, map_location="cpu")
        if "model_state_dict" not in ckpt:
            raise CheckpointError(f"{path}: checkpoint holds no model_state_dict")
        state, saved = ckpt["model_state_dict"], ckpt.get("config")
        thresholds, epoch = ckpt.get("thresholds"), ckpt.get("epoch")
    config = _config_from(saved, path)
    try:
        model = build_model(config.model, n_mels=config.n_mels)
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot rebuild its model ({e})") from None
    load_model_weights(model, state, path)
    model.to(map_location).eval()
    tuned = _thresholds_from(thresholds, path)
    return TrainedModel(model=model, config=config, settings=FeatureSettings.from_config(config),
                        thresholds=tuned or dict(DEFAULT_THRESHOLDS), thresholds_tuned=tuned is not None,
                        source=path, run_dir=run_dir, epoch=int(epoch) if isinstance(epoch, int) else None)


def _config_from(saved: Any, path: Path) -> TrainConfig:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{path}: holds no training config; cannot tell which model and features it needs")
    try:
        return TrainConfig.from_mapping(saved, source=str(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: its training config is not usable ({e})") from None


def _thresholds_from(value: Any, path: Path) -> dict[str, float] | None:
    """The tuned thresholds a checkpoint carries, or None when it has none."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != set(LABELS) or not all(
            isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0 for v in value.values()):
        raise CheckpointError(f"{path}: thresholds {value!r} are not one number in [0, 1] per label {LABELS}")
    return {label: float(value[label]) for label in LABELS}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], Any, Any, Any]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if metadata.get("format") != SAFETENSORS_FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: safetensors file holds no ignite_trainer config "
                              "(not written by `cli.py export`?)")
    try:
        saved = yaml.safe_load(metadata["config"])
        thresholds = json.loads(metadata["thresholds"]) if metadata.get("thresholds") else None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged metadata ({type(e).__name__})") from None
    epoch = int(metadata["epoch"]) if metadata.get("epoch", "").isdigit() else None
    return state, saved, thresholds, epoch


def export_safetensors(checkpoint_or_run_dir: str | Path, out_path: str | Path) -> Path:
    """Write the model's weights as safetensors, with the config (YAML) and thresholds in its metadata.

    The export is enough on its own to evaluate or predict (`load_trained_model` reads it), holds no
    pickle at all, and is a fraction of a training checkpoint (no optimizer or resume state).

    Example::

        export_safetensors("runs/quick", "quick.safetensors")
        trained = load_trained_model("quick.safetensors")
    """
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"{out_path}: the export must end in .safetensors")
    trained = load_trained_model(checkpoint_or_run_dir)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in trained.model.state_dict().items()}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "config": trained.config.to_yaml(),
        "thresholds": json.dumps(trained.thresholds) if trained.thresholds_tuned else "",
        "epoch": "" if trained.epoch is None else str(trained.epoch),
        "source": trained.source.name,
    }
    tmp = out_path.with_name(f".{out_path.name}.partial")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{out_path}: cannot write the export ({e.strerror or e})") from None
    return out_path


# ---------------------------------------------------------------------------------------------- input discovery
def detect_format(root: str | Path) -> str | None:
    """``"circor2022"`` (patient ``.txt`` files), ``"physionet2016"`` (``training-*`` or ``REFERENCE.csv``),
    or None for a plain folder of WAV files."""
    root = Path(root)
    if any(patient_folder(root).glob("*.txt")):
        return "circor2022"
    if any(p.is_dir() for p in root.glob("training-*")) or any(root.glob("REFERENCE*.csv")):
        return "physionet2016"
    return None


def has_labels(root: str | Path, fmt: str | None) -> bool:
    """Whether a dataset folder carries any label at all (a hidden test set or a WAV folder does not)."""
    root = Path(root)
    if fmt == "circor2022":
        lenient = BadInputPolicy(skip=True)
        for txt in sorted(patient_folder(root).glob("*.txt")):
            patient = parse_patient_file(txt, lenient)
            if patient and any(_given(patient.fields.get(k)) for k in ("outcome", "murmur")):
                return True
        table = root / "training_data.csv"
        if table.is_file():
            rows = read_training_table(table, lenient)
            return any(_given(row.get(k)) for row in rows.values() for k in ("outcome", "murmur"))
        return False
    if fmt == "physionet2016":
        return any(root.glob("REFERENCE*.csv")) or any(root.glob("training-*/REFERENCE*.csv"))
    return False


def _given(value: str | None) -> bool:
    return value is not None and value.strip() != "" and value.strip().lower() != "nan"


def _unlabelled(wav: Path, patient_id: str | None = None, location: str | None = None) -> Recording:
    if patient_id is None:
        m = _CIRCOR_NAME.match(wav.stem)
        patient_id = m.group("pid") if m else wav.stem
    return Recording(recording_id=wav.stem, patient_id=patient_id, wav_path=wav, labels=(0.0, 0.0),
                     mask=(False, False), location=location)


def discover_recordings(paths: Sequence[str | Path], fmt: str | None = None) -> list[Recording]:
    """WAV files and dataset folders -> recordings with every label masked (prediction needs none).

    A folder is read in ``fmt`` or the detected format: CirCor patient files group recordings by patient;
    PhysioNet 2016 and plain WAV folders give one patient per recording, except that CirCor-style names
    (``<pid>_<LOC>[_<n>].wav``) are grouped by ``<pid>``. A file named twice is read once.

    Example::

        recs = discover_recordings(["new_patient/", "extra/9999_AV.wav"])
    """
    found: list[Recording] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            if path.suffix.lower() != ".wav":
                raise DataError(f"{path}: not a .wav file or a dataset folder")
            found.append(_unlabelled(path))
        elif path.is_dir():
            found.extend(_folder_recordings(path, fmt or detect_format(path)))
        else:
            raise DataError(f"{path}: no such file or folder")
    unique: dict[str, Recording] = {}
    for r in found:
        other = unique.get(r.recording_id)
        if other is not None and other.wav_path.resolve() != r.wav_path.resolve():
            raise DataError(f"{r.wav_path}: recording id {r.recording_id} is also {other.wav_path}")
        unique.setdefault(r.recording_id, r)
    return list(unique.values())


def _folder_recordings(root: Path, fmt: str | None) -> list[Recording]:
    if fmt == "circor2022":
        data_dir = patient_folder(root)
        recordings = []
        for txt in sorted(data_dir.glob("*.txt")):
            patient = parse_patient_file(txt)
            assert patient is not None  # the strict policy raises instead
            for location, names in patient.recordings:
                wav = data_dir / names[1]
                if not wav.is_file():
                    raise DataError(f"{txt}: names {names[1]}, which does not exist in {data_dir}")
                recordings.append(_unlabelled(wav, patient.patient_id, LOCATIONS.get(location.lower(), location)))
        return recordings
    folders = sorted(p for p in root.glob("training-*") if p.is_dir()) if fmt == "physionet2016" else []
    wavs = [w for folder in (folders or [root]) for w in sorted(folder.glob("*.wav"))]
    if not wavs:
        raise DataError(f"{root}: no .wav files and no dataset layout (CirCor 2022 or PhysioNet 2016)")
    return [_unlabelled(w) for w in wavs]


# ---------------------------------------------------------------------------------------------- running
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
    dataset = EvalWindows(usable, cache, config.window_seconds)
    warnings = []
    for r, n in zip(dataset.recordings, dataset.n_frames):
        if n < dataset.window_frames:
            message = (f"{r.wav_path}: {n / trained.settings.frames_per_second:.2f} s is shorter than one "
                       f"{config.window_seconds:g} s window; zero-padded to one window")
            log.warning(message)
            warnings.append(message)
    torch_device = resolve_device(device)
    model = trained.model.to(torch_device)
    loader = make_eval_loader(dataset, batch_size or config.batch_size, 0, torch_device)
    evaluator = create_evaluator(model, {"predictions": PredictionCollector()}, torch_device)
    windows = evaluator.run(loader).metrics["predictions"]
    return WindowRun(windows, dataset, warnings)


# ---------------------------------------------------------------------------------------------- predicting
@dataclass
class PredictionResult:
    """Per-recording and per-patient probabilities with the thresholds and murmur band that decide them."""

    recordings: LevelPredictions
    patients: LevelPredictions
    thresholds: dict[str, float]
    unknown_margin: float
    source: Path
    warnings: list[str]

    @property
    def band(self) -> tuple[float, float]:
        """Murmur probabilities in ``[low, high)`` are called "Unknown"."""
        return unknown_band(self.thresholds["murmur"], self.unknown_margin)

    def murmur_classes(self, level: LevelPredictions) -> list[str]:
        return murmur_classes(level.probs[:, 1], self.thresholds["murmur"], self.unknown_margin)


def predict(model: str | Path | TrainedModel, inputs: Sequence[str | Path], fmt: str | None = None,
            aggregation: Literal["mean", "any"] | None = None, unknown_margin: float = 0.1,
            device: str = "cpu") -> PredictionResult:
    """Run a trained model on WAV files or dataset folders (labels, if any, are ignored).

    ``aggregation`` defaults to the run's own (``config.aggregation``); the thresholds are the tuned ones
    stored with the model (0.5 where it holds none); murmur probabilities within ``unknown_margin`` of the
    murmur threshold are called "Unknown" (see `predictions.unknown_band`).

    Example::

        result = predict("runs/quick", ["patient_folder/"])
        write_predictions_csv(result, "predictions.csv")
    """
    trained = model if isinstance(model, TrainedModel) else load_trained_model(model)
    unknown_band(trained.thresholds["murmur"], unknown_margin)  # rejects a negative margin before the model runs
    recordings = discover_recordings(inputs, fmt)
    run = run_windows(trained, recordings, device=device)
    _, recs, patients = run.levels(aggregation or trained.config.aggregation)
    return PredictionResult(recs, patients, dict(trained.thresholds), unknown_margin, trained.source, run.warnings)


def _prediction_rows(result: PredictionResult) -> list[dict[str, Any]]:
    rows = []
    t_heart, t_murmur = result.thresholds["heart"], result.thresholds["murmur"]
    for level in (result.recordings, result.patients):
        classes = result.murmur_classes(level)
        for i, item in enumerate(level.ids):
            rows.append({
                "level": level.level, "id": item, "patient_id": level.patient_ids[i],
                "windows": int(level.n_windows[i]),
                "heart_prob": repr(float(level.probs[i, 0])), "heart_pred": int(level.probs[i, 0] >= t_heart),
                "murmur_prob": repr(float(level.probs[i, 1])), "murmur_pred": int(level.probs[i, 1] >= t_murmur),
                "murmur_class": classes[i],
            })
    return rows


def write_predictions_csv(result: PredictionResult, out: str | Path | TextIO | None = None) -> None:
    """One row per recording, then per patient (``level`` column); stdout when ``out`` is None.

    Probabilities are written with full precision (``repr``) so that re-thresholding the CSV gives exactly
    the ``*_pred`` columns.
    """
    rows = _prediction_rows(result)
    if out is None or hasattr(out, "write"):
        stream = sys.stdout if out is None else out
        _write_rows(stream, rows)
        return
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            _write_rows(f, rows)
    except OSError as e:
        raise DataError(f"{path}: cannot write predictions ({e.strerror or e})") from None


def _write_rows(stream: TextIO, rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(stream, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def write_challenge_outputs(result: PredictionResult, out_dir: str | Path) -> list[Path]:
    """The 2022 Challenge's per-patient output files, ``<out_dir>/<patient id>.csv``::

        #<patient id>
        Present,Unknown,Absent,Abnormal,Normal
        <five 0/1 labels>
        <five probabilities>

    The murmur call is Present/Unknown/Absent through the murmur threshold's uncertainty band, the outcome
    Abnormal when ``heart_prob >= threshold``. The model has one murmur output, so the probabilities are
    ``p``, 0 and ``1 - p`` for Present, Unknown, Absent, and ``q``, ``1 - q`` for Abnormal, Normal.

    Example::

        write_challenge_outputs(predict("runs/quick", ["test_data/"]), "outputs/")
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from None
    patients = result.patients
    calls = result.murmur_classes(patients)
    written = []
    for i, pid in enumerate(patients.ids):
        p_murmur, p_heart, call = float(patients.probs[i, 1]), float(patients.probs[i, 0]), calls[i]
        abnormal = p_heart >= result.thresholds["heart"]
        labels = [int(call == "Present"), int(call == "Unknown"), int(call == "Absent"),
                  int(abnormal), int(not abnormal)]
        probs = [p_murmur, 0.0, 1.0 - p_murmur, p_heart, 1.0 - p_heart]
        text = (f"#{pid}\n{','.join(CHALLENGE_CLASSES)}\n{','.join(map(str, labels))}\n"
                f"{','.join(f'{p:.6g}' for p in probs)}\n")
        path = out_dir / f"{pid}.csv"
        try:
            path.write_text(text)
        except OSError as e:
            raise DataError(f"{path}: cannot write ({e.strerror or e})") from None
        written.append(path)
    return written
