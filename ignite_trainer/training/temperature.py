"""After each validation, the per-label temperatures (`scoring.calibration`); the best checkpoint's go to a file.

`attach_temperature_fitting` fits ``T`` per label on the validation windows of every epoch (one scalar
search per label: milliseconds) and keeps it on ``trainer.state.calibration``. With the run's
``calibrate: true`` the thresholds and the Challenge decision layer of that epoch are then tuned on the
calibrated probabilities (`decisions.validation_recordings` reads ``state.calibration``), so a checkpoint's
thresholds, decision layer and temperatures always belong together. With ``calibrate: false`` (the
default) nothing downstream changes: the temperatures are fitted and reported only.

Whenever a new best checkpoint is written and it is the run's best (`checkpoint.best_checkpoint_file`, the
owner of which file that is), the epoch's calibration is written to ``calibration.json``
(`rundir.RunDirectory.calibration_file`) whole (`atomic.atomic_write`). At the end of training that file
is therefore the best checkpoint's, fitted on the validation set that chose it; a resumed run keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ignite.engine import Engine

from ignite_trainer.core.atomic import atomic_write
from ignite_trainer.runs.checkpoint import best_checkpoint_file
from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.scoring.calibration import fit_temperatures
from ignite_trainer.training.events import TrainerEvents

__all__ = ["attach_temperature_fitting"]


def attach_temperature_fitting(trainer: Engine, evaluator_metric_name: str, val_dataset: Any, *, aggregation: str,
                               applied: bool, run_dir: str | Path | None = None) -> Callable[[Engine], None]:
    """Fit ``state.calibration`` after each validation; with ``run_dir``, write the best checkpoint's to its file.

    Attach it before threshold tuning and the decision layer (they read ``state.calibration`` when
    ``applied``) and before the best checkpoint (whose ``BEST_MODEL_SAVED`` writes the file). Only the
    rank that writes files passes ``run_dir``.

    Example::

        attach_validation(trainer, evaluator, val_loader)
        attach_temperature_fitting(trainer, "predictions", val_dataset, aggregation="mean", applied=False,
                                   run_dir="runs/x")
        attach_threshold_tuning(trainer, "predictions", "f1", val_dataset)
    """

    def fit(engine: Engine) -> None:
        output = getattr(engine.state, "validation_output", None)
        if output is None or evaluator_metric_name not in output.metrics:
            raise KeyError(f"no '{evaluator_metric_name}' in the evaluator's metrics; attach a PredictionCollector")
        engine.state.calibration = fit_temperatures(output.metrics[evaluator_metric_name],
                                                    val_dataset.window_recording, val_dataset.recordings,
                                                    aggregation, epoch=int(engine.state.epoch), applied=applied)

    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, fit)
    if run_dir is not None:
        directory = RunDirectory(Path(run_dir))

        def store(engine: Engine) -> None:
            best = best_checkpoint_file(directory.checkpoints)
            calibration = getattr(engine.state, "calibration", None)
            if calibration is None or best is None or best[0] != calibration.epoch:
                return  # a kept but not best checkpoint (n_saved_best > 1): the file stays the best's
            with atomic_write(directory.calibration_file, durable=True) as f:
                f.write(calibration.to_json())

        trainer.add_event_handler(TrainerEvents.BEST_MODEL_SAVED, store)
    return fit
