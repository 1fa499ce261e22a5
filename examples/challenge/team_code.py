"""A PhysioNet/CinC 2022 Challenge entry on ignite_trainer's public API.

Put this file beside the Challenge's own scripts (``train_model.py``, ``run_model.py``, ``helper_code.py``)
with ignite_trainer installed; those scripts import the three functions below. Training uses the project's
defaults (the two-output model, thresholds and the Challenge decision layer tuned on a validation split);
`SETTINGS` changes any `TrainConfig` field (e.g. ``{"epochs": 30}``). Inference is in memory: no file is
read or written per patient, a recording that cannot be used is skipped with a warning, and a patient with
none left still gets an answer (the validation class frequencies).
"""

from pathlib import Path

from ignite_trainer import Predictor, TrainConfig, challenge_recordings, train

#: `TrainConfig` fields that differ from the project's defaults.
SETTINGS: dict = {}
#: The run directory's name inside the model folder.
RUN_NAME = "ignite_trainer"


def train_challenge_model(data_folder, model_folder, verbose):
    """Train on the CirCor folder the Challenge gives; the run (checkpoints, features) lives in ``model_folder``."""
    settings = {"cache_dir": str(Path(model_folder) / "cache"), "progress": verbose >= 2, **SETTINGS}
    train(TrainConfig(**settings, data=str(data_folder), format="circor2022", output_dir=str(model_folder),
                      name=RUN_NAME), overwrite=True)


def load_challenge_model(model_folder, verbose):
    """The trained run's best checkpoint with its decision layer, ready for one patient at a time."""
    return Predictor.load(Path(model_folder) / RUN_NAME)


def run_challenge_model(model, data, recordings, verbose):
    """``(classes, labels, probabilities)`` for one patient: its metadata text and its recordings' arrays."""
    result = model.predict_patient(challenge_recordings(data, recordings), data)
    return list(result.classes), list(result.labels), list(result.probabilities)
