"""What a researcher reads while a run trains: one line per epoch, and the closing summary of the best model.

Every line goes through the project's logger, so the console and ``train.log`` say the same thing, and is
complete in itself (no ``\\r``), so that a log file, ``tee`` or a job scheduler's output stays readable.
While a progress bar is drawn, `logs.setup_logging`'s console handler writes through ``tqdm.write``,
which lifts the bar, prints the line and redraws the bar below it.

An epoch line::

    epoch  4/20  train_loss 0.6021  val_loss 0.5812  macro_f1 0.604  tuned_f1 0.688  lr 9.05e-04  3.1s+0.4s  * best val_loss

``macro_f1`` is the validation windows' at threshold 0.5 (what ``--monitor macro_f1`` compares);
``tuned_f1`` the mean F1 of the validation recordings at the thresholds tuned this epoch (what the model
is used with). The monitored score is added when it is neither of these; the times are training +
validation; ``* best <monitor>`` marks an epoch that wrote a new best checkpoint, and the early stop is
said on the next line. A score that does not exist this epoch is ``n/a``.

The closing summary (`best_summary`, `summary_lines`) describes the *best checkpoint*, the model that
``evaluate``, ``predict`` and ``export`` use, not the last epoch: its epoch, monitored score, file, tuned
thresholds and per-label scores at those thresholds, and why ``evaluate``'s F1 differs.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from ignite.engine import Engine, Events

from ignite_trainer.runs.checkpoint import find_best_checkpoint, parse_checkpoint_name
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.core.vocabulary import LABELS

__all__ = ["EpochLines", "attach_epoch_lines", "format_score", "best_summary", "summary_lines", "split_fingerprint",
           "split_line"]

log = logging.getLogger("ignite_trainer")

#: Scores every epoch line shows; the monitored score is added when it is another one.
SHOWN = ("val_loss", "macro_f1")


def format_score(value: Any, digits: int = 3) -> str:
    """A score as text: ``n/a`` when it does not exist (None), else fixed-point with ``digits`` decimals.

    Example:

        >>> format_score(None), format_score(0.51234), format_score(0.51234, 4)
        ('n/a', '0.512', '0.5123')
    """
    if value is None:
        return "n/a"
    return f"{float(value):.{digits}f}"


class EpochLines:
    """Logs one line per validated epoch (module docstring); attach with `attach_epoch_lines`.

    The learning rate is read when the epoch starts (the rate the epoch trained with), like the metrics log.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, monitor: str) -> None:
        self.optimizer = optimizer
        self.monitor = monitor
        self.lr: float | None = None
        self.best_epoch: int | None = None

    def capture_lr(self, engine: Engine) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]

    def new_best(self, engine: Engine) -> None:
        self.best_epoch = engine.state.epoch

    def line(self, engine: Engine) -> str:
        """The epoch's line, from ``trainer.state`` after validation."""
        m = engine.state.validation_metrics
        width = len(str(engine.state.max_epochs or engine.state.epoch))
        train_loss = engine.state.metrics.get("train_loss")
        parts = [f"epoch {engine.state.epoch:>{width}}/{engine.state.max_epochs}",
                 f"train_loss {format_score(_float(train_loss), 4)}",
                 f"val_loss {format_score(m.get('val_loss'), 4)}",
                 f"macro_f1 {format_score(m.get('macro_f1'))}"]
        if self.monitor not in SHOWN:
            parts.append(f"{self.monitor} {format_score(m.get(self.monitor), 4)}")
        tuned = [s["f1"] for s in (getattr(engine.state, "threshold_scores", None) or {}).values()
                 if s.get("f1") is not None]
        if getattr(engine.state, "threshold_scores", None) is not None:
            parts.append(f"tuned_f1 {format_score(sum(tuned) / len(tuned) if tuned else None)}")
        lr = self.lr if self.lr is not None else self.optimizer.param_groups[0]["lr"]
        seconds = engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
        parts += [f"lr {lr:.2e}", f"{seconds:.1f}s+{getattr(engine.state, 'validation_seconds', 0.0):.1f}s"]
        if self.best_epoch == engine.state.epoch:
            parts.append(f"* best {self.monitor}")
        return "  ".join(parts)

    def __call__(self, engine: Engine) -> None:
        log.info(self.line(engine))
        if getattr(engine.state, "early_stopped_epoch", None) == engine.state.epoch:
            log.info(getattr(engine.state, "early_stop_reason", f"early stopping at epoch {engine.state.epoch}"))


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def attach_epoch_lines(trainer: Engine, optimizer: torch.optim.Optimizer, monitor: str = "val_loss") -> EpochLines:
    """Log one line per validated epoch on rank 0 (console and ``train.log``).

    Attach after the best checkpoint (`handlers.attach_best_checkpoint`), so that the epoch's
    ``BEST_MODEL_SAVED`` is known when its line is written.

    Example::

        run = RunDirectory(run_dir)  # the run directory's paths (runs.rundir)
        best = attach_best_checkpoint(trainer, to_save, run.checkpoints, "macro_f1")
        attach_epoch_lines(trainer, optimizer, "macro_f1")
    """
    lines = EpochLines(optimizer, monitor)
    trainer.add_event_handler(Events.EPOCH_STARTED, lines.capture_lr)
    trainer.add_event_handler(TrainerEvents.BEST_MODEL_SAVED, lines.new_best)
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, lines)
    return lines


# ---------------------------------------------------------------------------------------------- split
def split_fingerprint(train_patients: Iterable[str], val_patients: Iterable[str]) -> str:
    """12 hex digits that name a patient split: equal for two runs exactly when both sides hold the same
    patients (order does not matter), so runs scored on different patients are told apart at a glance.

    Example:

        >>> split_fingerprint(["b", "a"], ["c"]) == split_fingerprint(["a", "b"], ["c"]) != split_fingerprint(["a"], ["b", "c"])
        True
    """
    text = "train:" + ",".join(sorted(set(map(str, train_patients)))) + "\nval:" + ",".join(
        sorted(set(map(str, val_patients))))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def split_line(train: Iterable[Any], val: Iterable[Any]) -> str:
    """The line each run starts with: patients per side and the split's `split_fingerprint`.

    ``train`` and ``val`` are the recordings of each side (anything with a ``patient_id``).

    Example::

        log.info(split_line(data.train, data.val))   # split: 240 train / 60 validation patients, fingerprint 3f9a1c2b7d01
    """
    train_ids = {r.patient_id for r in train}
    val_ids = {r.patient_id for r in val}
    return (f"split: {len(train_ids)} train / {len(val_ids)} validation patients, "
            f"fingerprint {split_fingerprint(train_ids, val_ids)}")


# ---------------------------------------------------------------------------------------------- summary
def best_summary(run_dir: str | Path, monitor: str) -> dict[str, Any] | None:
    """What the run's best checkpoint is: ``epoch``, ``monitor``, ``score``, ``file``, ``thresholds`` and
    ``labels`` (each label's validation-recording scores at its tuned threshold, from ``metrics.jsonl``).

    None before the first best checkpoint exists (no epoch validated, or the monitored score was never
    defined).

    Example::

        best = best_summary("runs/quick", "val_loss")
        print(best["epoch"], best["score"], best["file"])
    """
    directory = RunDirectory(Path(run_dir))
    try:
        path = find_best_checkpoint(directory.path)
    except CheckpointError:
        return None
    parsed = parse_checkpoint_name(path.name)
    epoch = parsed.epoch if parsed is not None else None
    record = next((r for r in directory.metrics_log.records() if r.get("epoch") == epoch), None)
    if record is None:
        return {"epoch": epoch, "monitor": monitor, "score": None, "file": str(path), "thresholds": {}, "labels": {}}
    label, dot, stat = monitor.partition(".")
    score = record.get(label, {}).get(stat) if dot else record.get(monitor)
    thresholds = {lab: record[lab]["threshold"] for lab in LABELS
                  if isinstance(record.get(lab), Mapping) and record[lab].get("threshold") is not None}
    labels = {lab: dict(record[lab]["at_threshold"]) for lab in LABELS
              if isinstance(record.get(lab), Mapping) and record[lab].get("at_threshold")}
    return {"epoch": epoch, "monitor": monitor, "score": score, "file": str(path), "thresholds": thresholds,
            "labels": labels, "val_loss": record.get("val_loss"), "train_loss": record.get("train_loss")}


#: Columns of the per-label table of `summary_lines`.
SUMMARY_COLUMNS = ("accuracy", "precision", "recall", "specificity", "f1")


def summary_lines(best: Mapping[str, Any] | None, *, last_epoch: int | None = None,
                  early_stopped: bool = False) -> list[str]:
    """The closing summary of a run as text lines (`best_summary`'s dictionary).

    Example::

        for line in summary_lines(best_summary(run_dir, "val_loss"), last_epoch=20):
            print(line)
    """
    if best is None:
        return ["no best checkpoint: the monitored score was never defined on the validation split"]
    ended = "" if last_epoch is None else f" (training ended at epoch {last_epoch}" + (
        ", stopped early)" if early_stopped else ")")
    lines = [f"best checkpoint: epoch {best['epoch']}, {best['monitor']} {format_score(best['score'], 4)}{ended}",
             f"  file: {best['file']}"]
    if best["thresholds"]:
        lines.append("  tuned thresholds: " + ", ".join(f"{lab} {t:.3f}" for lab, t in best["thresholds"].items()))
    if best["labels"]:
        lines.append(f"  {'label':<8}" + "".join(f"{n:>12}" for n in SUMMARY_COLUMNS))
        for label, scores in best["labels"].items():
            lines.append(f"  {label:<8}" + "".join(f"{format_score(scores.get(n)):>12}" for n in SUMMARY_COLUMNS))
        lines.append("  (validation recordings at the tuned thresholds; n/a = undefined on this split. `evaluate` "
                     "scores patients, recordings aggregated by the run's rule, so its F1 differs.)")
    return lines
