"""A trained model as a file: read it back from a run directory, a checkpoint or a safetensors export.

A trained model is only useful away from its training run, so `load_trained_model` rebuilds the exact
model and feature settings from what the file itself stores (never from the current defaults).
`rebuild_model` is the one place a model is rebuilt from a stored config and its weights (a single
model's file here, every member of an ensemble export in `ensemble`), `checked_thresholds` the one check
of stored or given per-label thresholds, and `challenge_refusal` the one rule of which models may answer the 2022 Challenge. Writing files is `export`'s;
reading a safetensors file is `runs.weights.read_safetensors`'s (re-exported here).

Which labels a model learned follows from the data format it trained on (`vocabulary.FORMAT_LABELS`,
recorded in the config every checkpoint and export stores): a PhysioNet 2016 model never trained its
murmur output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from ignite_trainer.core.vocabulary import SAFETENSORS_FORMAT
from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.runs.checkpoint import find_best_checkpoint, load_checkpoint, load_model_weights
from ignite_trainer.runs.weights import read_safetensors
from ignite_trainer.core.config import TrainConfig, read_text_file
from ignite_trainer.model import cpu_kernels
from ignite_trainer.model.blocks import use_cpu_kernel
from ignite_trainer.data.features import FeatureSettings
from ignite_trainer.scoring.calibration import Calibration
from ignite_trainer.scoring.decision import DecisionLayer
from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.model.registry import model_from_config
from ignite_trainer.scoring.predictions import DEFAULT_THRESHOLDS
from ignite_trainer.core.vocabulary import FORMAT_LABELS, LABELS

__all__ = ["TrainedModel", "load_trained_model", "read_calibration", "rebuild_model", "checked_thresholds", "read_safetensors",
           "challenge_refusal", "SAFETENSORS_FORMAT"]

# ``SAFETENSORS_FORMAT`` (core.vocabulary): the ``format`` metadata of our safetensors files; a file without it was not written by us.


@dataclass
class TrainedModel:
    """A model ready to run (eval mode) with everything needed to feed it and read its output.

    Example::

        trained = load_trained_model("runs/quick")
        layer = trained.decision_layer()  # what evaluate and predict decide the Challenge classes with
        predictor = Predictor([trained])
    """

    model: torch.nn.Module
    config: TrainConfig
    settings: FeatureSettings
    thresholds: dict[str, float]
    thresholds_tuned: bool  # False: the file held none, 0.5 is used
    source: Path
    run_dir: Path | None
    epoch: int | None
    #: The Challenge decision layer fitted on validation when the model was trained (None: an older file).
    decision: DecisionLayer | None = None
    #: The per-label temperatures fitted on validation for this checkpoint (None: a file from before
    #: calibration, or a checkpoint that is not the one the run's calibration file belongs to: T = 1).
    calibration: Calibration | None = None

    @property
    def temperatures(self) -> dict[str, float]:
        """The stored temperatures, or 1 for every label without a calibration."""
        return dict((self.calibration or Calibration.identity()).temperatures)

    @property
    def applies_calibration(self) -> bool:
        """Whether predictions and decisions use the temperatures (the run's ``calibrate``, with a calibration)."""
        return bool(self.config.calibrate) and self.calibration is not None

    @property
    def learned_labels(self) -> tuple[str, ...]:
        """The labels the model had targets for: those its data format carries (`vocabulary.FORMAT_LABELS`)."""
        return FORMAT_LABELS[self.config.format]

    def decision_layer(self, unknown_margin: float = 0.1) -> DecisionLayer:
        """The stored decision layer, or for a file without one the legacy rule: Unknown within
        ``unknown_margin`` of the murmur threshold, Abnormal at or above the heart threshold."""
        if self.decision is not None:
            return self.decision
        return DecisionLayer.legacy(self.thresholds["murmur"], self.thresholds["heart"], unknown_margin)


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
        run = RunDirectory(parent.parent)
        run_dir = run.path if parent == run.checkpoints and run.config_file.is_file() else None
    calibration: Calibration | None = None
    if path.suffix == ".safetensors":
        state, saved, thresholds, epoch, decision, calibration = _read_safetensors(path)
    else:
        ckpt = load_checkpoint(path, map_location="cpu")
        if "model_state_dict" not in ckpt:
            raise CheckpointError(f"{path}: checkpoint holds no model_state_dict")
        state, saved = ckpt["model_state_dict"], ckpt.get("config")
        thresholds, epoch = ckpt.get("thresholds"), ckpt.get("epoch")
        decision = _decision_from(ckpt.get("decision"), path)
        if ckpt.get("calibration") is not None:
            calibration = _calibration_from(ckpt["calibration"], path)
    config = _config_from(saved, path)
    epoch = int(epoch) if isinstance(epoch, int) else None
    if calibration is None and run_dir is not None:
        calibration = read_calibration(run_dir, epoch)
    if config.calibrate and calibration is None:
        raise CheckpointError(f"{path}: its run decides on calibrated probabilities (calibrate: true) but no "
                              f"calibration for epoch {epoch} is stored with it (checkpoint key 'calibration' or "
                              f"{RunDirectory(run_dir or path.parent).calibration_file.name} of its run)")
    try:
        model = rebuild_model(config, state, path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot rebuild its model ({e})") from None
    model.to(map_location)
    tuned = None if thresholds is None else checked_thresholds(thresholds, f"{path}: thresholds", CheckpointError)
    return TrainedModel(model=model, config=config, settings=FeatureSettings.from_config(config),
                        thresholds=tuned or dict(DEFAULT_THRESHOLDS), thresholds_tuned=tuned is not None,
                        source=path, run_dir=run_dir, epoch=epoch, decision=decision, calibration=calibration)


def _config_from(saved: Any, path: Path) -> TrainConfig:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{path}: holds no training config; cannot tell which model and features it needs")
    try:
        return TrainConfig.from_mapping(saved, source=str(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: its training config is not usable ({e})") from None


def rebuild_model(config: TrainConfig, state: Mapping[str, torch.Tensor], source: str | Path) -> torch.nn.Module:
    """The model ``config`` describes (its name, ``n_mels``, ``demographics`` and ``patient_model``) with the weights ``state``,
    in eval mode on the CPU: every model read back from a file is rebuilt here.

    A model name that is not registered is the `ConfigError` of `build_model` (callers say which file it
    came from); weights that do not fit the model are a one-line `CheckpointError` naming ``source``.

    Example::

        model = rebuild_model(TrainConfig.from_mapping(ckpt["config"]), ckpt["model_state_dict"], path)
    """
    model = model_from_config(config)
    load_model_weights(model, state, source)
    # a model trained with the fused CPU kernel uses it where it is already built; nothing is built for a prediction
    use_cpu_kernel(model, config.cpu_kernel and cpu_kernels.load_built())
    return model.eval()


def checked_thresholds(value: Any, what: str, error: type[Exception]) -> dict[str, float]:
    """``value`` as one float in [0, 1] per label (`LABELS`), or ``error`` naming ``what``.

    A mapping with other labels, or a value that is not a number (a bool or a string included) or lies
    outside [0, 1], is refused: the one check of thresholds read from a file or given by a caller.

    Example:

        >>> checked_thresholds({"heart": 0.4, "murmur": 1}, "thresholds", ValueError)
        {'heart': 0.4, 'murmur': 1.0}
    """
    if not isinstance(value, Mapping) or set(value) != set(LABELS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0
            for v in value.values()):
        raise error(f"{what} {value!r} are not one number in [0, 1] per label {LABELS}")
    return {label: float(value[label]) for label in LABELS}


def challenge_refusal(learned_labels: Sequence[str], trained_format: str, decision: DecisionLayer | None
                      ) -> str | None:
    """Why a model may not make the 2022 Challenge's calls (murmur Present/Unknown/Absent, outcome
    Abnormal/Normal), or None when it may.

    Both outputs must have been trained (``learned_labels``; ``trained_format`` names the data it learned
    from), and the decision layer that turns them into calls must have been fitted on at least one
    validation patient with a murmur class and one with an outcome (`DecisionLayer.unfitted_tasks`; a layer
    that does not record its patients, e.g. from an older file, is taken as fitted). A layer fitted on no
    patient is its starting point, not a decision: with an untrained murmur output it calls every patient
    Present. `predict` (Challenge files) and `Predictor` refuse such a model with this reason.

    Example:

        >>> challenge_refusal(("heart",), "physionet2016", None)[:47]
        'it never learned the murmur label: it trained o'
    """
    missing = [label for label in LABELS if label not in learned_labels]
    if missing:
        return (f"it never learned the {' and '.join(missing)} label: it trained on format={trained_format}, which "
                f"has {', '.join(learned_labels) or 'no label'} only, so its {' and '.join(missing)} output is "
                "untrained; the Challenge's murmur and outcome calls need a model trained on circor2022 data")
    unfitted = decision.unfitted_tasks() if decision is not None else []
    if unfitted:
        return (f"its Challenge decision layer was fitted on 0 validation patients with a {' or '.join(unfitted)} "
                f"label, so its {' and '.join(unfitted)} calls were never fitted to anything; retrain with a "
                "validation split that holds both labels")
    return None


def _decision_from(value: Any, path: Path) -> DecisionLayer | None:
    """The decision layer a checkpoint carries (a `DecisionLayer.to_dict`), or None when it has none."""
    if value is None:
        return None
    try:
        return DecisionLayer.from_dict(value)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_calibration(run_dir: str | Path, epoch: int | None) -> Calibration | None:
    """The run's calibration file for the checkpoint of ``epoch`` (None: no file, written before calibration
    existed, or the file belongs to another epoch's checkpoint); a damaged file is a `CheckpointError` naming
    it and the field.

    Example::

        calibration = read_calibration("runs/quick", trained.epoch)
    """
    path = RunDirectory(Path(run_dir)).calibration_file
    if not path.is_file():
        return None
    calibration = _calibration_from(read_text_file(path, "the calibration file", CheckpointError), path)
    return calibration if calibration.epoch == epoch else None


def _calibration_from(value: Any, path: Path) -> Calibration:
    """A `Calibration` from a checkpoint's dict or a file's JSON text; anything else names ``path``."""
    try:
        return Calibration.from_json(value) if isinstance(value, str) else Calibration.from_dict(value)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], Any, Any, Any, DecisionLayer | None,
                                           Calibration | None]:
    metadata, state = read_safetensors(path)
    if metadata.get("format") != SAFETENSORS_FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: safetensors file holds no ignite_trainer config "
                              "(not written by `cli.py export`?)")
    try:
        saved = yaml.safe_load(metadata["config"])
        thresholds = json.loads(metadata["thresholds"]) if metadata.get("thresholds") else None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged metadata ({type(e).__name__})") from None
    epoch = int(metadata["epoch"]) if metadata.get("epoch", "").isdigit() else None
    try:
        decision = DecisionLayer.from_json(metadata["decision"]) if metadata.get("decision") else None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    calibration = _calibration_from(metadata["calibration"], path) if metadata.get("calibration") else None
    return state, saved, thresholds, epoch, decision, calibration
