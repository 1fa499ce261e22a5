"""Several trained models used as one: the fold models of a cross-validation experiment, or any list of them.

The ensemble's probability for a recording is the **mean of its members' probabilities** (each member
runs its own features and windows, averages its windows per recording, and the recording probabilities
are then averaged over members); recordings become patients as for a single model (``aggregation``), so
with ``mean`` aggregation a patient's probability is also the mean of the members' patient probabilities.
Probability averaging, not a vote: it keeps a ranking (AUROC, AUPRC) and lets one threshold decide.

Decisions use thresholds that were tuned where the members never trained: a cross-validation
experiment's out-of-fold thresholds (``EXP_DIR/ensemble.json``, written by `cv.collect_experiment`). For a plain
list of models they can be given; otherwise the mean of the members' own validation thresholds is used,
and `Ensemble.threshold_source` says which.

`load_ensemble` reads an experiment directory, a list of run directories / checkpoints / exports, or a
file written by `export_ensemble` (one safetensors file holding every member's weights, config and the
thresholds; no pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import yaml

from ignite_trainer.data.records import LABELS, Recording
from ignite_trainer.errors import CheckpointError, ConfigError, DataError

__all__ = ["Ensemble", "load_ensemble", "export_ensemble", "is_ensemble", "mean_probabilities", "ENSEMBLE_FORMAT"]

ENSEMBLE_FORMAT = "ignite_trainer/ensemble/1"


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


@dataclass
class Ensemble:
    """Trained members (`inference.TrainedModel`) and the thresholds that decide their mean probability.

    Example::

        ensemble = load_ensemble("runs/cv-a")
        recordings, patients, warnings = ensemble.levels(discover_recordings(["new/"]))
        print(patients.probs, ensemble.thresholds)
    """

    members: list  # list[TrainedModel]
    thresholds: dict[str, float]
    thresholds_tuned: bool
    threshold_source: str
    source: Path

    @property
    def config(self):
        """The first member's config: aggregation, window and label settings a caller may need."""
        return self.members[0].config

    def levels(self, recordings: Sequence[Recording], how: Literal["mean", "any"] | None = None,
               device: str = "cpu") -> tuple:
        """``(recording, patient)`` `LevelPredictions` of the ensemble and the inputs' warnings.

        Every member predicts every recording; the recording probabilities are averaged over members
        (`mean_probabilities`), then aggregated to patients with ``how`` (default: the first member's).
        """
        from ignite_trainer.inference import run_windows
        from ignite_trainer.predictions import LevelPredictions, patient_predictions

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
    """Whether ``path`` is an ensemble: an experiment directory or a file written by `export_ensemble`.

    Example::

        model = load_ensemble(path) if is_ensemble(path) else load_trained_model(path)
    """
    path = Path(path)
    if path.is_dir():
        return (path / "ensemble.json").is_file() or (path / "experiment.yaml").is_file()
    if path.suffix == ".safetensors" and path.is_file():
        return _safetensors_metadata(path).get("format") == ENSEMBLE_FORMAT
    return False


def load_ensemble(source: str | Path | Sequence[str | Path], thresholds: Mapping[str, float] | None = None) -> Ensemble:
    """An experiment directory, an `export_ensemble` file, or a list of models -> `Ensemble`.

    Each model of a list is a run directory (its best checkpoint), a checkpoint or a single-model export.
    ``thresholds`` replaces the stored ones.

    Example::

        ensemble = load_ensemble("runs/cv-a")                          # out-of-fold thresholds
        ensemble = load_ensemble(["runs/a", "runs/b"], {"heart": 0.4, "murmur": 0.35})
    """
    from ignite_trainer.model_files import load_trained_model

    given = _checked_thresholds(thresholds, "thresholds") if thresholds is not None else None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _from_experiment(path, given)
        if path.suffix == ".safetensors" and _safetensors_metadata(path).get("format") == ENSEMBLE_FORMAT:
            return _from_export(path, given)
        paths = [path]
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise CheckpointError("an ensemble needs at least one model")
    members = [load_trained_model(p) for p in paths]
    if given is not None:
        return Ensemble(members, given, True, "given", paths[0])
    if all(m.thresholds_tuned for m in members):
        mean = {label: float(np.mean([m.thresholds[label] for m in members])) for label in LABELS}
        return Ensemble(members, mean, True, "mean of the members' own validation thresholds", paths[0])
    return Ensemble(members, {label: 0.5 for label in LABELS}, False, "default 0.5 (a member holds no tuned "
                    "thresholds)", paths[0])


def _checked_thresholds(value: object, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or set(value) != set(LABELS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0 for v in value.values()):
        raise ConfigError(f"{where}: {value!r} is not one number in [0, 1] per label {LABELS}")
    return {label: float(value[label]) for label in LABELS}


def _from_experiment(exp_dir: Path, given: dict[str, float] | None) -> Ensemble:
    from ignite_trainer.model_files import load_trained_model

    manifest_path = exp_dir / "ensemble.json"
    if not manifest_path.is_file():
        what = "a cross-validation experiment that was never collected" if (exp_dir / "experiment.yaml").is_file() \
            else "not a cross-validation experiment"
        raise CheckpointError(f"{exp_dir}: {what} (no ensemble.json); run cli.py cv --collect {exp_dir}")
    try:
        manifest = json.loads(manifest_path.read_text())
        member_dirs = [exp_dir / p for p in manifest["members"]]
        stored = _checked_thresholds(manifest["thresholds"], str(manifest_path))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: damaged ensemble manifest ({e})") from None
    if not member_dirs:
        raise CheckpointError(f"{manifest_path}: lists no member")
    members = [load_trained_model(p) for p in member_dirs]
    if given is not None:
        return Ensemble(members, given, True, "given", exp_dir)
    return Ensemble(members, stored, True, str(manifest.get("thresholds_source", "out-of-fold")), exp_dir)


# ---------------------------------------------------------------------------------------------- one file
def _safetensors_metadata(path: Path) -> dict[str, str]:
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def export_ensemble(source: Ensemble | str | Path | Sequence[str | Path], out_path: str | Path) -> Path:
    """Write every member's weights, its config and the ensemble's thresholds into one safetensors file.

    Tensors are named ``member<i>.<parameter>``; the metadata holds each member's config (YAML), epoch and
    source, and the thresholds with where they came from. `load_ensemble` reads it back.

    Example::

        export_ensemble("runs/cv-a", "cv-a.safetensors")
        ensemble = load_ensemble("cv-a.safetensors")
    """
    import safetensors.torch

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"{out_path}: the export must end in .safetensors")
    ensemble = source if isinstance(source, Ensemble) else load_ensemble(source)
    tensors, members = {}, []
    for i, trained in enumerate(ensemble.members):
        for key, value in trained.model.state_dict().items():
            tensors[f"member{i}.{key}"] = value.detach().cpu().contiguous().clone()
        members.append({"config": trained.config.to_yaml(), "epoch": trained.epoch, "source": str(trained.source)})
    metadata = {"format": ENSEMBLE_FORMAT, "members": json.dumps(members), "thresholds": json.dumps(ensemble.thresholds),
                "thresholds_tuned": json.dumps(ensemble.thresholds_tuned), "threshold_source": ensemble.threshold_source,
                "combine": "mean of the members' probabilities"}
    tmp = out_path.with_name(f".{out_path.name}.partial")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{out_path}: cannot write the export ({e.strerror or e})") from None
    return out_path


def _from_export(path: Path, given: dict[str, float] | None) -> Ensemble:
    import safetensors

    from ignite_trainer.checkpoint import load_model_weights
    from ignite_trainer.config import TrainConfig
    from ignite_trainer.data.features import FeatureSettings
    from ignite_trainer.model_files import TrainedModel
    from ignite_trainer.models import build_model

    metadata = _safetensors_metadata(path)
    try:
        members_meta = json.loads(metadata["members"])
        thresholds = _checked_thresholds(json.loads(metadata["thresholds"]), str(path))
        tuned = bool(json.loads(metadata.get("thresholds_tuned", "true")))
        with safetensors.safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged ensemble metadata ({e})") from None
    members = []
    for i, meta in enumerate(members_meta):
        prefix = f"member{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            config = TrainConfig.from_mapping(yaml.safe_load(meta["config"]), source=f"{path} member {i}")
            model = build_model(config.model, n_mels=config.n_mels)
        except (ConfigError, yaml.YAMLError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: member {i} cannot be rebuilt ({e})") from None
        load_model_weights(model, state, f"{path} member {i}")
        model.eval()
        members.append(TrainedModel(model=model, config=config, settings=FeatureSettings.from_config(config),
                                    thresholds=dict(thresholds), thresholds_tuned=tuned, source=path, run_dir=None,
                                    epoch=meta.get("epoch")))
    if not members:
        raise CheckpointError(f"{path}: holds no member")
    if given is not None:
        return Ensemble(members, given, True, "given", path)
    return Ensemble(members, thresholds, tuned, metadata.get("threshold_source", ""), path)
