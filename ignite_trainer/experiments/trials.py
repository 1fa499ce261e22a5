"""One trial of a sweep: run its experiment (a training run or a cross-validation experiment), score it, prune it.

* **Trials are runs.** `run_trial` trains one run with the run's ``monitor`` set to the objective, so its
  best checkpoint is the one the score comes from; the score is the best value of the objective over the
  run's epochs, read back from ``metrics.jsonl`` (`best_score`).
* **Or cross-validated experiments.** `run_cv_trial` runs one cross-validation experiment, scored by a
  pooled out-of-fold score of its report (``oof.<metric>``) or by the mean over its runs of each run's
  best per-epoch score (`experiment_score`). Its pruning steps are folds, not epochs (`FoldPruning`).
* **Pruning keeps the checkpoint.** `PruningHook` hands Optuna's `PyTorchIgnitePruningHandler` the epoch's
  score at the end of the trainer's epoch (after the last checkpoint) and a pruned trial stops with
  ``terminate()``, so the run directory holds the pruned epoch and stays resumable.

`TRIAL_RUNNERS` maps the space's experiment kind to its runner; `sweeps` calls it once per trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from ignite.engine import Events

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import UserError
from ignite_trainer.runs.rundir import RunDirectory, read_metrics_log
from ignite_trainer.training.run import train
from ignite_trainer.experiments.cv import collect_experiment, cross_validate, resume_cross_validation
from ignite_trainer.experiments.layout import Experiment, experiment_file, oof_dir

__all__ = ["TrialResult", "run_trial", "run_cv_trial", "member_score", "experiment_score", "trial_score", "best_score",
           "metric_value", "TRIAL_RUNNERS", "PruningHook", "FoldPruning"]


@dataclass(frozen=True)
class TrialResult:
    """What one trial's experiment gives back: where it lives, its score and how many epochs it ran."""

    run_dir: Path
    score: float
    epochs: int


# ---------------------------------------------------------------------------------------------- one trial
def run_trial(config: TrainConfig, metric: str, direction: str, *, resume: Path | None = None,
              overwrite: bool = False, setup: Callable | None = None) -> TrialResult:
    """Train one run (or resume it) and score it: the best ``metric`` over its epochs in ``metrics.jsonl``.

    This is the ``run`` experiment of `TRIAL_RUNNERS`; a cross-validated experiment plugs in with the
    same signature (its ``setup`` attached to each fold, its score the folds' summary).

    Example::

        result = run_trial(config, "macro_f1", "maximize")
        print(result.run_dir, result.score, result.epochs)
    """
    if resume is not None:
        summary = train(config, resume=resume, overrides={"progress": False}, setup=setup)
    else:
        summary = train(config, overwrite=overwrite, setup=setup)
    run_dir = Path(summary["run_dir"])
    score, epochs = best_score(run_dir, metric, direction)
    if score is None:
        raise UserError(f"{run_dir}: no epoch reported {metric} (undefined on this validation split)")
    return TrialResult(run_dir, score, epochs)


def run_cv_trial(config: TrainConfig, metric: str, direction: str, *, resume: Path | None = None,
                 overwrite: bool = False, setup: Callable | None = None, folds: int, seeds: Sequence[int] = (0,),
                 split_seed: int | None = None, prune: Callable[[int, float], None] | None = None) -> TrialResult:
    """Run (or resume) one cross-validation experiment in ``config``'s run directory and score it.

    The members run one after another in this process (``setup`` attached to each); after each, ``prune``
    gets ``(runs finished, mean of their member scores)`` and may raise `optuna.TrialPruned`. A member's
    score (`member_score`) is its best per-epoch ``metric``, or for ``oof.<metric>`` the same score on its
    own fold from its out-of-fold evaluation. The trial's score (`experiment_score`) is the pooled
    out-of-fold one, or the mean over runs of each run's best.

    Example::

        result = run_cv_trial(config, "oof.murmur_weighted_accuracy", "maximize", folds=5, seeds=[0])
    """
    exp_dir = Path(config.output_dir) / str(config.name)
    quiet = dict(bootstrap=0, figures=False, setup=setup, echo=lambda _: None)
    if resume is None:
        exp_dir.parent.mkdir(parents=True, exist_ok=True)
        members = None
    else:
        members = Experiment.load(exp_dir).members()
    if members is None:  # create the experiment and run its first member
        first = f"0:{list(seeds)[0]}"
        cross_validate(config, folds, seeds, exp_dir=exp_dir, split_seed=split_seed, only=[first],
                       overwrite=overwrite, **quiet)
        members = Experiment.load(exp_dir).members()
        finished = [members[0]]
    else:
        finished = []
    for m in members:
        if m not in finished:
            resume_cross_validation(exp_dir, only=[m], **quiet)
            finished.append(m)
        if prune is not None:
            scores = [v for v in (member_score(exp_dir, x, metric, direction) for x in finished) if v is not None]
            if scores:
                prune(len(finished), float(np.mean(scores)))
    collect_experiment(exp_dir, bootstrap=0, figures=False)
    score, epochs = experiment_score(exp_dir, metric, direction)
    if score is None:
        raise UserError(f"{exp_dir}: the experiment reports no {metric} (undefined on these patients)")
    return TrialResult(exp_dir, score, epochs)


def member_score(exp_dir: Path, member: Any, metric: str, direction: str) -> float | None:
    """One finished member's score for pruning: its best per-epoch ``metric``, or for ``oof.<metric>`` the
    same score on its own fold (its out-of-fold ``metrics.json``; decisions by its own validation tuning)."""
    run_dir = Experiment.load(exp_dir).run_dir(member)
    if not metric.startswith("oof."):
        return best_score(run_dir, metric, direction)[0]
    try:
        result = json.loads((oof_dir(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    name = metric[len("oof."):]
    challenge = result.get("challenge") or {}
    head, _, cls = name.partition(".")
    if name in ("murmur_weighted_accuracy", "outcome_cost"):
        value = challenge.get(name)
    elif head.startswith(("murmur_", "outcome_")):  # murmur_f_measure, outcome_accuracy.Abnormal, ...
        task, _, key = head.partition("_")
        section = challenge.get(task) or {}
        value = section.get(f"{key}_classes", {}).get(cls) if cls else section.get(key)
    else:  # heart.f1 ...: the patient-level per-label score (sensitivity is the recall)
        scores = result.get("levels", {}).get("patient", {}).get(head, {})
        value = scores.get(cls, scores.get("recall") if cls == "sensitivity" else None)
    return float(value) if isinstance(value, (int, float)) else None


def experiment_score(exp_dir: Path, metric: str, direction: str) -> tuple[float | None, int]:
    """A cross-validation experiment's score and the epochs its runs logged in all: ``oof.<metric>`` from
    its report's pooled out-of-fold scores, else the mean over its runs of each run's best ``metric``."""
    exp = Experiment.load(exp_dir)
    per_run = [best_score(exp.run_dir(m), metric if not metric.startswith("oof.") else "val_loss", direction)
               for m in exp.members()]
    epochs = sum(n for _, n in per_run)
    if metric.startswith("oof."):
        try:
            pooled = json.loads(exp.summary_file.read_text())["pooled"]
        except (OSError, ValueError, KeyError):
            return None, epochs
        value = pooled.get(metric[len("oof."):])
        return (float(value) if isinstance(value, (int, float)) else None), epochs
    scores = [v for v, _ in per_run if v is not None]
    return (float(np.mean(scores)) if scores else None), epochs


def trial_score(run_dir: Path, metric: str, direction: str) -> tuple[float | None, int]:
    """A trial's score so far: `experiment_score` for a cross-validation experiment, else `best_score`."""
    if experiment_file(run_dir).is_file():
        try:
            return experiment_score(Path(run_dir), metric, direction)
        except UserError:
            return None, 0
    return best_score(run_dir, metric, direction)


#: Experiment kind (SPACE.yaml ``experiment``) -> the function that runs and scores one trial.
TRIAL_RUNNERS: dict[str, Callable[..., TrialResult]] = {"run": run_trial, "cv": run_cv_trial}


def best_score(run_dir: Path, metric: str, direction: str) -> tuple[float | None, int]:
    """The best value of ``metric`` (``val_loss``, ``macro_f1``, ``heart.f1``, ...) over a run's logged
    epochs, and the number of epochs logged. Epochs where it is undefined (null) are left out."""
    records = read_metrics_log(RunDirectory(Path(run_dir)).metrics_file)
    values = [v for v in (metric_value(r, metric) for r in records) if v is not None]
    if not values:
        return None, len(records)
    return (max(values) if direction == "maximize" else min(values)), len(records)


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """``record["heart"]["f1"]`` for ``heart.f1``; ``record["macro_f1"]`` for a top-level score."""
    label, dot, name = metric.partition(".")
    value = record.get(label, {}).get(name) if dot else record.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


class PruningHook:
    """The ``setup`` hook of a trial: reports the objective after every epoch and stops a pruned run.

    Optuna's `PyTorchIgnitePruningHandler` makes the report/prune decision; it is handed the epoch's
    validation score after the epoch's checkpoint is saved, and a `TrialPruned` it raises becomes
    ``trainer.terminate()`` (the run ends cleanly, its last checkpoint resumable) and is kept in
    ``pruned`` for the caller to raise once `train` has returned.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned: optuna.TrialPruned | None = None

    def __call__(self, trainer: Any, evaluator: Any) -> None:
        # deferred: importing optuna_integration loads every integration it ships (seconds); only pruned trials
        from optuna_integration import PyTorchIgnitePruningHandler

        handler = PyTorchIgnitePruningHandler(self.trial, self.metric, trainer)

        def check(engine: Any) -> None:
            value = getattr(engine.state, "validation_metrics", {}).get(self.metric)
            if value is None or engine.should_terminate:  # undefined score, or stopping anyway
                return
            try:
                handler(SimpleNamespace(state=SimpleNamespace(metrics={self.metric: float(value)})))
            except optuna.TrialPruned as e:
                self.pruned = e
                engine.terminate()

        trainer.add_event_handler(Events.EPOCH_COMPLETED, check)


class FoldPruning:
    """The pruning of a cross-validation trial: ``(runs finished, mean score)`` after each run, reported to
    Optuna at that step; raises `optuna.TrialPruned` when the pruner says so (the finished runs stay)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def __call__(self, step: int, value: float) -> None:
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {step} run(s): mean score {value:.4g}")
