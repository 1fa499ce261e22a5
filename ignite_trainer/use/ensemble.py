"""Several trained models used as one: the fold models of a cross-validation experiment, or any list of them.

The ensemble's probability for a recording is the **mean of its members' probabilities** (each member
runs its own features and windows, averages its windows per recording, and the recording probabilities
are then averaged over members); recordings become patients as for a single model (``aggregation``), so
with ``mean`` aggregation a patient's probability is also the mean of the members' patient probabilities.
Probability averaging, not a vote: it keeps a ranking (AUROC, AUPRC) and lets one threshold decide.

Every member must have learned the same labels (`check_same_labels`, from each member's data format,
`vocabulary.FORMAT_LABELS`): a PhysioNet 2016 model's murmur output was never trained, and averaging it
with CirCor models' murmur outputs would pull every murmur probability towards noise without a word. Such an
ensemble is refused when it is built (so by ``export``, ``evaluate``, ``predict`` and `Predictor` alike),
with one line naming the members and their labels. A per-label mean over only the members that learned
each label was not chosen: the thresholds and decision layer would then be fitted to one mix of members
and applied to another.

Decisions use thresholds and a Challenge decision layer that were tuned where the members never trained:
a cross-validation experiment's out-of-fold ones (``EXP_DIR/ensemble.json``, ``thresholds`` in it and
``EXP_DIR/decision.json``, written by `cv.collect_experiment`). For a plain list of models they can be
given; otherwise the mean of the members' own validation thresholds and the first member's own decision
layer are used, and `Ensemble.threshold_source` / `Ensemble.decision_source` say which.

`load_ensemble` reads an experiment directory, a list of run directories / checkpoints / exports /
`TrainedModel` objects, or a file written by `export.export_ensemble` (one safetensors file holding every
member's weights, config, the thresholds and the decision layer; no pickle), whose members are rebuilt by
`model_files.rebuild_model` like any other model file. `load_model` is the one entry for a path that may
be either a single model or an ensemble.

`mean_probabilities` is the one "mean of the members" of the project: `Ensemble.levels` (through the
feature cache) and `predictor.Predictor` (in memory) both combine members with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import yaml

from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.core.config import TrainConfig, read_text_file
from ignite_trainer.core.errors import CheckpointError, ConfigError, DataError
from ignite_trainer.data.features import FeatureSettings
from ignite_trainer.data.records import LABELS, Recording
from ignite_trainer.scoring.calibration import Calibration
from ignite_trainer.scoring.decision import DecisionLayer
from ignite_trainer.scoring.predictions import LevelPredictions, patient_predictions
from ignite_trainer.use.model_files import (TrainedModel, checked_thresholds, load_trained_model, read_safetensors,
                                            rebuild_model)
from ignite_trainer.use.windows import run_windows

__all__ = ["Ensemble", "load_ensemble", "load_model", "is_ensemble", "mean_probabilities", "check_same_labels",
           "ENSEMBLE_FORMAT", "EXPERIMENT_FILE", "ENSEMBLE_MANIFEST"]

#: The ``format`` metadata of an `export.export_ensemble` file and of an experiment's ensemble manifest.
ENSEMBLE_FORMAT = "ignite_trainer/ensemble/1"
#: In an experiment folder: what makes it an experiment, and the manifest its collect step writes (members,
#: out-of-fold thresholds, decision layer), which makes it an ensemble.
EXPERIMENT_FILE = "experiment.yaml"
ENSEMBLE_MANIFEST = "ensemble.json"


def mean_probabilities(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: the element-wise mean of the members' (same items, same order).

    Example:

        >>> mean_probabilities([np.array([[0.2, 0.9]]), np.array([[0.4, 0.5]])]).round(6).tolist()
        [[0.3, 0.7]]
    """
    if not member_probs:
        raise ValueError("an ensemble needs at least one member")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
    return stacked.mean(axis=0)


def check_same_labels(members: Sequence[TrainedModel]) -> None:
    """Refuse members that learned different labels (`TrainedModel.learned_labels`), with one
    `CheckpointError` naming each group of members, its labels and the data format it trained on.

    Example::

        check_same_labels([load_trained_model("runs/circor"), load_trained_model("runs/p2016")])
        # CheckpointError: the ensemble's members learned different labels: heart and murmur (runs/circor) ...
    """
    names = [str(m.run_dir or m.source) for m in members]
    if len(set(names)) < len(names):  # members of one export file: tell them apart by position
        names = [f"{name} member {i}" for i, name in enumerate(names)]
    groups: dict[tuple[str, ...], list[str]] = {}
    formats: dict[tuple[str, ...], set[str]] = {}
    for member, name in zip(members, names):
        groups.setdefault(member.learned_labels, []).append(name)
        formats.setdefault(member.learned_labels, set()).add(member.config.format)
    if len(groups) < 2:
        return
    parts = [f"{' and '.join(labels)} ({', '.join(group)}; format={', '.join(sorted(formats[labels]))})"
             for labels, group in groups.items()]
    untrained = sorted({label for labels in groups for label in LABELS if label not in labels})
    raise CheckpointError(f"the ensemble's members learned different labels: {' vs '.join(parts)}; the mean of "
                          f"the members would average untrained {' and '.join(untrained)} outputs into trained "
                          "ones: ensemble models trained on the same labels")


@dataclass
class Ensemble:
    """Trained members (`model_files.TrainedModel`), the thresholds and the decision layer that decide their
    mean probability.

    Example::

        ensemble = load_ensemble("runs/cv-a")
        recordings, patients, warnings = ensemble.levels(discover_recordings(["new/"]))
        print(patients.probs, ensemble.thresholds, ensemble.decision_source)
    """

    members: list[TrainedModel]
    thresholds: dict[str, float]
    thresholds_tuned: bool
    threshold_source: str
    source: Path
    #: The Challenge decision layer (None: the legacy rule from ``thresholds``, see `decision_layer`).
    decision: DecisionLayer | None = None
    decision_source: str = ""
    #: The ensemble's own temperatures, fitted on its members' out-of-fold predictions (a collected
    #: experiment's ``calibration.json``); reported by ``evaluate``, never applied to its decisions (its
    #: thresholds and decision layer were tuned on the members' outputs as they are).
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        check_same_labels(self.members)

    @property
    def learned_labels(self) -> tuple[str, ...]:
        """The labels every member learned (`check_same_labels` holds them equal)."""
        return self.members[0].learned_labels

    @property
    def config(self):
        """The first member's config: aggregation, window and label settings a caller may need."""
        return self.members[0].config

    @property
    def epoch(self) -> None:
        """An ensemble has no single epoch (its members' are in ``members``)."""
        return None

    def decision_layer(self, unknown_margin: float = 0.1) -> DecisionLayer:
        """The ensemble's decision layer, or the legacy rule from its thresholds (Unknown within
        ``unknown_margin`` of the murmur threshold) when it has none."""
        if self.decision is not None:
            return self.decision
        return DecisionLayer.legacy(self.thresholds["murmur"], self.thresholds["heart"], unknown_margin)

    def levels(self, recordings: Sequence[Recording], how: Literal["mean", "any"] | None = None,
               device: str = "cpu") -> tuple:
        """``(recording, patient)`` `LevelPredictions` of the ensemble and the inputs' warnings.

        Every member predicts every recording; the recording probabilities are averaged over members
        (`mean_probabilities`), then aggregated to patients with ``how`` (default: the first member's).
        """
        how = how or self.config.aggregation
        per_member, warnings, reference = [], [], None
        for trained in self.members:
            run = run_windows(trained, recordings, device=device)
            _, recs, _ = run.levels(how)
            if reference is None:
                reference, used = recs, run.dataset.recordings
            elif recs.ids != reference.ids:
                raise DataError(f"{trained.source}: its member saw other recordings than {self.members[0].source}")
            per_member.append(recs.probs)
            warnings.extend(w for w in run.warnings if w not in warnings)
        recs = LevelPredictions("recording", reference.ids, mean_probabilities(per_member), reference.targets,
                                reference.mask, reference.patient_ids, reference.murmur_classes, reference.n_windows)
        return recs, patient_predictions(recs, used, how), warnings


def is_ensemble(path: str | Path) -> bool:
    """Whether ``path`` is an ensemble: an experiment directory or a file written by `export.export_ensemble`.

    Example::

        model = load_ensemble(path) if is_ensemble(path) else load_trained_model(path)
    """
    path = Path(path)
    if path.is_dir():
        return (path / ENSEMBLE_MANIFEST).is_file() or (path / EXPERIMENT_FILE).is_file()
    return _is_export(path)


def _is_export(path: Path) -> bool:
    """Whether ``path`` is a safetensors file written by `export.export_ensemble`."""
    return path.suffix == ".safetensors" and path.is_file() and \
        read_safetensors(path, tensors=False)[0].get("format") == ENSEMBLE_FORMAT


def load_ensemble(source, thresholds: Mapping[str, float] | None = None,
                  decision: DecisionLayer | None = None) -> Ensemble:
    """An experiment directory, an `export.export_ensemble` file, or a list of models -> `Ensemble`.

    Each model of a list is a run directory (its best checkpoint), a checkpoint, a single-model export or a
    `TrainedModel`. ``thresholds`` and ``decision`` replace the stored ones.

    Example::

        ensemble = load_ensemble("runs/cv-a")                          # out-of-fold thresholds and layer
        ensemble = load_ensemble(["runs/a", "runs/b"], {"heart": 0.4, "murmur": 0.35})
    """
    given = checked_thresholds(thresholds, "thresholds", ConfigError) if thresholds is not None else None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and not RunDirectory(path).config_file.is_file():
            return _with(_from_experiment(path), given, decision)
        if _is_export(path):
            return _with(_from_export(path), given, decision)
        items: list = [path]
    elif isinstance(source, TrainedModel):
        items = [source]
    else:
        items = list(source)
    if not items:
        raise CheckpointError("an ensemble needs at least one model")
    members = [m if isinstance(m, TrainedModel) else load_trained_model(m) for m in items]
    first = members[0]
    layer, layer_source = ((first.decision, "the first member's own (validation) decision layer")
                           if first.decision is not None else (None, "legacy rule from the thresholds"))
    if all(m.thresholds_tuned for m in members):
        mean = {label: float(np.mean([m.thresholds[label] for m in members])) for label in LABELS}
        ensemble = Ensemble(members, mean, True, "mean of the members' own validation thresholds", first.source,
                            layer, layer_source)
    else:
        ensemble = Ensemble(members, {label: 0.5 for label in LABELS}, False,
                            "default 0.5 (a member holds no tuned thresholds)", first.source, layer, layer_source)
    return _with(ensemble, given, decision)


def load_model(source):
    """A `TrainedModel` for one model, an `Ensemble` for an experiment directory, an `export.export_ensemble`
    file or a list: what `evaluate`, `predict` and `Predictor.load` accept.

    Example::

        model = load_model("runs/cv-a")        # Ensemble
        model = load_model("runs/quick")       # TrainedModel
    """
    if isinstance(source, TrainedModel):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_ensemble(source) if is_ensemble(source) else load_trained_model(source)
    return load_ensemble(source)


def _with(ensemble: Ensemble, thresholds: dict[str, float] | None, decision: DecisionLayer | None) -> Ensemble:
    if thresholds is not None:
        ensemble = replace(ensemble, thresholds=thresholds, thresholds_tuned=True, threshold_source="given")
    if decision is not None:
        ensemble = replace(ensemble, decision=decision, decision_source="given")
    return ensemble


def _from_experiment(exp_dir: Path) -> Ensemble:
    manifest_path = exp_dir / ENSEMBLE_MANIFEST
    if not manifest_path.is_file():
        what = "a cross-validation experiment that was never collected" if (exp_dir / EXPERIMENT_FILE).is_file() \
            else "not a cross-validation experiment"
        raise CheckpointError(f"{exp_dir}: {what} (no {ENSEMBLE_MANIFEST}); run cli.py cv --collect {exp_dir}")
    text = read_text_file(manifest_path, "the ensemble manifest", CheckpointError)
    try:
        manifest = json.loads(text)
        member_dirs = [exp_dir / p for p in manifest["members"]]
        stored = checked_thresholds(manifest["thresholds"], f"{manifest_path}: thresholds", ConfigError)
        decision_file = manifest.get("decision")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: damaged ensemble manifest ({e})") from None
    if not member_dirs:
        raise CheckpointError(f"{manifest_path}: lists no member")
    layer, layer_source = None, "legacy rule from the out-of-fold thresholds (collected before decision layers)"
    if decision_file:
        layer_path = exp_dir / str(decision_file)
        try:
            layer = DecisionLayer.from_json(read_text_file(layer_path, "the decision layer", CheckpointError))
        except CheckpointError as e:
            raise CheckpointError(f"{layer_path}: unreadable decision layer ({e})") from None
        layer_source = str(manifest.get("decision_source", "out-of-fold"))
    calibration = None
    if manifest.get("calibration"):
        calibration_path = exp_dir / str(manifest["calibration"])
        try:
            calibration = Calibration.from_json(read_text_file(calibration_path, "the calibration", CheckpointError))
        except CheckpointError as e:
            raise CheckpointError(f"{calibration_path}: {e}") from None
    members = [load_trained_model(p) for p in member_dirs]
    return Ensemble(members, stored, True, str(manifest.get("thresholds_source", "out-of-fold")), exp_dir,
                    layer, layer_source, calibration)


# ---------------------------------------------------------------------------------------------- one file
def _from_export(path: Path) -> Ensemble:
    metadata, tensors = read_safetensors(path)
    try:
        members_meta = json.loads(metadata["members"])
        thresholds = checked_thresholds(json.loads(metadata["thresholds"]), f"{path}: thresholds", ConfigError)
        tuned = bool(json.loads(metadata.get("thresholds_tuned", "true")))
        layer = DecisionLayer.from_json(metadata["decision"]) if metadata.get("decision") else None
        calibration = Calibration.from_json(metadata["calibration"]) if metadata.get("calibration") else None
        member_calibrations = [Calibration.from_dict(m["calibration"]) if m.get("calibration") else None
                               for m in members_meta]
    except (KeyError, json.JSONDecodeError, TypeError, AttributeError, CheckpointError) as e:
        raise CheckpointError(f"{path}: damaged ensemble metadata ({e})") from None
    members = []
    for i, meta in enumerate(members_meta):
        prefix = f"member{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        source = f"{path} member {i}"
        try:
            config = TrainConfig.from_mapping(yaml.safe_load(meta["config"]), source=source)
            model = rebuild_model(config, state, source)
        except (ConfigError, yaml.YAMLError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: member {i} cannot be rebuilt ({e})") from None
        members.append(TrainedModel(model=model, config=config, settings=FeatureSettings.from_config(config),
                                    thresholds=dict(thresholds), thresholds_tuned=tuned, source=path, run_dir=None,
                                    epoch=meta.get("epoch"), calibration=member_calibrations[i]))
    if not members:
        raise CheckpointError(f"{path}: holds no member")
    return Ensemble(members, thresholds, tuned, metadata.get("threshold_source", ""), path, layer,
                    metadata.get("decision_source", "") if layer is not None else "legacy rule from the thresholds",
                    calibration)
