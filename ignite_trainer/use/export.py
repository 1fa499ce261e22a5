"""A trained model or an ensemble written as one safetensors file: weights, plus the config, thresholds and
decision layer in its metadata, and no pickle at all.

`export_safetensors` writes one model (`model_files.load_trained_model` reads it back),
`export_ensemble` every member of an ensemble (`ensemble.load_ensemble` reads it back), and
`check_export_target` refuses a bad output name before any work; both exports write through the same
atomic, durable write, so a file is never left half-written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import safetensors.torch
import torch

from ignite_trainer.core.atomic import atomic_path, created_parents, write_failure
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.use.ensemble import ENSEMBLE_FORMAT, Ensemble, is_ensemble, load_ensemble
from ignite_trainer.use.model_files import SAFETENSORS_FORMAT, load_trained_model

__all__ = ["check_export_target", "export_safetensors", "export_ensemble"]


def check_export_target(out_path: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, an export name that is not ``.safetensors`` or that would replace a file
    without ``overwrite``; every export (one model or an ensemble) goes through here."""
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"{out_path}: the export must end in .safetensors")
    if out_path.exists() and not overwrite:
        raise CheckpointError(f"{out_path}: already exists; pass --overwrite to replace it")
    return out_path


def export_safetensors(checkpoint_or_run_dir: str | Path, out_path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model's weights as safetensors, with the config (YAML), thresholds and decision layer
    (JSON) in its metadata, and the calibration (`scoring.calibration.Calibration`) when the model has one.

    The export is enough on its own to evaluate or predict (`load_trained_model` reads it), holds no
    pickle at all, and is a fraction of a training checkpoint (no optimizer or resume state). An existing
    ``out_path`` is replaced only with ``overwrite``. A cross-validation experiment directory is written
    as its ensemble (`export_ensemble`).

    Example::

        export_safetensors("runs/quick", "quick.safetensors")
        trained = load_trained_model("quick.safetensors")
    """
    if is_ensemble(checkpoint_or_run_dir):  # a cv experiment directory: every member in one file
        return export_ensemble(checkpoint_or_run_dir, out_path, overwrite=overwrite)
    out_path = check_export_target(out_path, overwrite)
    trained = load_trained_model(checkpoint_or_run_dir)
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "config": trained.config.to_yaml(),
        "thresholds": json.dumps(trained.thresholds) if trained.thresholds_tuned else "",
        "epoch": "" if trained.epoch is None else str(trained.epoch),
        "decision": "" if trained.decision is None else trained.decision.to_json(),
        "source": trained.source.name,
    }
    if trained.calibration is not None:  # a model from before calibration files exports exactly as it did
        metadata["calibration"] = trained.calibration.to_json()
    return _write(_weights(trained.model), metadata, out_path)


def export_ensemble(source: Ensemble | str | Path | Sequence[str | Path], out_path: str | Path, *,
                    overwrite: bool = False) -> Path:
    """Write every member's weights, its config, the ensemble's thresholds and decision layer into one
    safetensors file.

    Tensors are named ``member<i>.<parameter>``; the metadata holds each member's config (YAML), epoch and
    source, the thresholds and the decision layer (`DecisionLayer.to_json`) with where they came from.
    `load_ensemble` reads it back. ``out_path`` is replaced only with ``overwrite``.

    Example::

        export_ensemble("runs/cv-a", "cv-a.safetensors")
        ensemble = load_ensemble("cv-a.safetensors")
    """
    out_path = check_export_target(out_path, overwrite)
    ensemble = source if isinstance(source, Ensemble) else load_ensemble(source)
    tensors, members = {}, []
    for i, trained in enumerate(ensemble.members):
        tensors.update({f"member{i}.{key}": value for key, value in _weights(trained.model).items()})
        members.append({"config": trained.config.to_yaml(), "epoch": trained.epoch, "source": str(trained.source)})
        if trained.calibration is not None:
            members[-1]["calibration"] = trained.calibration.to_dict()
    metadata = {"format": ENSEMBLE_FORMAT, "members": json.dumps(members), "thresholds": json.dumps(ensemble.thresholds),
                "thresholds_tuned": json.dumps(ensemble.thresholds_tuned), "threshold_source": ensemble.threshold_source,
                "combine": "mean of the members' probabilities",
                "decision": "" if ensemble.decision is None else ensemble.decision.to_json(),
                "decision_source": ensemble.decision_source}
    if ensemble.calibration is not None:
        metadata["calibration"] = ensemble.calibration.to_json()
    return _write(tensors, metadata, out_path)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as contiguous CPU copies (what safetensors stores)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out_path: Path) -> Path:
    """One atomic, durable safetensors write; a failure the file system explains (a full disk: safetensors
    raises its own ``SafetensorError`` then) is a one-line `CheckpointError`, and leaves neither a partial
    file nor a folder made for the export."""
    try:
        with created_parents(out_path), atomic_path(out_path, durable=True) as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    except Exception as e:
        reason = write_failure(e)
        if reason is None:
            raise  # not the disk or the path: a bug, keep the traceback
        raise CheckpointError(f"{out_path}: cannot write the export ({reason})") from None
    return out_path
