"""Search a `SweepSpace` with Optuna: every trial is a normal run directory, scored from its own metrics log.

Optuna does the searching, the storage and the pruning decisions; this module adds what a sweep of
training runs needs on top:

* **Trials are runs.** Trial ``n`` trains ``SWEEP_DIR/trials/trial_{n:04d}`` through `train`, with the
  run's ``monitor`` set to the objective, so its best checkpoint is the one the score comes from. The
  score is the best value of the objective over the run's epochs, read back from ``metrics.jsonl``.
* **Or cross-validated experiments.** With ``experiment: {kind: cv, ...}`` trial ``n`` is a cross-validation
  experiment directory ``SWEEP_DIR/trials/trial_{n:04d}`` (`run_cv_trial`), scored by a pooled
  out-of-fold score of its report (``oof.<metric>``) or by the mean over its runs of each run's best
  per-epoch score. Its pruning steps are folds, not epochs: after each finished run, the mean of the
  finished runs' scores is reported at step = runs finished, so trials are compared after the same
  number of folds (runs' epochs would mix folds whose validation patients differ).
* **Pruning keeps the checkpoint.** Optuna's `PyTorchIgnitePruningHandler` raises from inside the
  evaluator, before the epoch's metrics line and checkpoint are written; here it is called at the end of
  the trainer's epoch (after the last checkpoint) and a pruned trial stops with ``terminate()``, so the
  run directory holds the pruned epoch and stays resumable.
* **One budget across workers.** Optuna's ``n_trials`` counts per process and `MaxTrialsCallback` checks
  only after a trial, so K workers can overshoot. Storage hands out trial numbers atomically; a trial
  whose rank among the counted trials is ``>= N`` is marked surplus and stops before it trains (a
  retry takes the place of the trial it replaces).
* **Dead workers.** Each trial records its worker (host, machine, pid, process start time). A worker on
  the same machine fails a RUNNING trial whose process is gone; on an RDB storage Optuna's heartbeat does
  the same for any machine. The failed trial is queued again with the same parameters (Optuna's
  ``WAITING`` state, as `RetryHeartbeatStaleTrialCallback` does) and the retry resumes the dead trial's
  run directory from its last checkpoint (or restarts it when none was written: another machine's
  worker, without a shared file system). A worker with nothing left to start waits while other workers'
  trials run, so that a trial whose worker dies last is still taken over.
* **Seeds per trial.** A sampler seeded once per process would make two workers suggest the same
  parameters; `TrialSeededSampler` seeds each trial from ``(sweep seed, trial number)``.

This module runs the sweep: `sweep` checks everything and starts the workers, `run_worker` runs trials
until the budget is spent, `make_objective` is what Optuna calls per trial. One trial's experiment, its
score and its pruning are `trials`; the study's storage `storage`; the sampler and pruner `sampler`;
worker liveness and the trial budget `workers`; the report `sweep_report`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ignite_trainer.core.errors import CheckpointError, ConfigError, UserError
from ignite_trainer.data.splits import assign_folds
from ignite_trainer.runs.checkpoint import find_resume_checkpoint
from ignite_trainer.experiments.cv import dataset_recordings
from ignite_trainer.experiments.layout import experiment_file
from ignite_trainer.experiments.sampler import suggest
from ignite_trainer.experiments.space import SweepSpace, load_space
from ignite_trainer.experiments.storage import (HEARTBEAT_INTERVAL, has_heartbeat, open_storage, open_study,
                                                storage_url)
from ignite_trainer.experiments.sweep_report import write_sweep_report
from ignite_trainer.experiments.trials import TRIAL_RUNNERS, FoldPruning, PruningHook, trial_score
from ignite_trainer.experiments.workers import (ENDED_ELSEWHERE, SurplusTrial, budget_slot, counted_trials,
                                                failed_elsewhere, recover_dead_trials, wait_for_others, worker_alive,
                                                worker_identity)

__all__ = ["sweep", "run_worker", "make_objective", "check_cv_experiment", "TRIALS_DIR"]

log = logging.getLogger("ignite_trainer")

TRIALS_DIR = "trials"


# ---------------------------------------------------------------------------------------------- one worker
def make_objective(space: SweepSpace, sweep_dir: Path, n_trials: int) -> Callable[[optuna.Trial], float]:
    """The function Optuna calls per trial: claim a place in the budget, build the config, train, score."""
    runner = TRIAL_RUNNERS[space.experiment]
    base = space.base_config()
    trials_dir = Path(sweep_dir) / TRIALS_DIR

    def objective(trial: optuna.Trial) -> float:
        objective.last_trial = trial.number  # type: ignore[attr-defined]
        trial.set_user_attr("worker", worker_identity())
        retry_of = trial.user_attrs.get("retry_of")
        counted = counted_trials(trial.study.get_trials(deepcopy=False))
        if sum(budget_slot(t) < budget_slot(trial) for t in counted) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"the sweep already has its {n_trials} trials")
        params = {p.name: suggest(trial, p) for p in space.params}
        # a retry keeps the dead trial's folder name, in this worker's own sweep directory: the same folder
        # (resumed) on the same machine, a fresh one on a machine that does not share the file system
        run_dir = trials_dir / Path(trial.user_attrs.get("run_dir") or f"trial_{trial.number:04d}").name
        trial.set_user_attr("run_dir", str(run_dir))
        cv = space.experiment == "cv"
        hook = PruningHook(trial, space.metric)
        fold_pruning = FoldPruning(trial)
        started = time.perf_counter()
        try:
            monitor = base.monitor if space.metric.startswith("oof.") else space.metric
            config = base.updated(params, source=f"trial {trial.number}").updated(
                {"name": run_dir.name, "output_dir": str(run_dir.parent), "monitor": monitor, "progress": False},
                source=f"trial {trial.number}")
            resumable = experiment_file(run_dir).is_file() if cv else _has_checkpoint(run_dir)
            resume = run_dir if retry_of is not None and resumable else None
            if resume is not None:
                trial.set_user_attr("resumed", True)
            extra = {**space.experiment_args, "prune": fold_pruning} if cv else {}
            if cv and extra.get("split_seed") is None and not base.split_file:
                extra["split_seed"] = base.effective_split_seed  # the same folds for every trial, whatever `seed` is
            result = runner(config, space.metric, space.direction, resume=resume, overwrite=retry_of is not None,
                            setup=None if cv else hook, **extra)
        except UserError as e:
            trial.set_user_attr("fail_reason", _first_line_of(e))
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
            score, epochs = trial_score(run_dir, space.metric, space.direction)
            trial.set_user_attr("epochs", epochs)
            if score is not None:
                trial.set_user_attr("score", score)
        if hook.pruned is not None:
            raise hook.pruned
        return result.score

    return objective


def _has_checkpoint(run_dir: Path) -> bool:
    try:
        find_resume_checkpoint(run_dir)
    except CheckpointError:
        return False
    return True


def _first_line_of(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _announce(study: optuna.Study, trial: FrozenTrial) -> None:
    if trial.user_attrs.get("surplus"):
        return
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    state = trial.state.name.lower()
    if trial.state == TrialState.COMPLETE:
        log.info("trial %d complete: %.4f (%s)", trial.number, trial.value, params)
    elif trial.state == TrialState.FAIL:
        log.info("trial %d failed: %s (%s)", trial.number, trial.user_attrs.get("fail_reason", "?"), params)
    else:
        log.info("trial %d %s at epoch %s (%s)", trial.number, state, trial.user_attrs.get("epochs"), params)


def run_worker(space: SweepSpace, sweep_dir: str | Path, n_trials: int, url: str, study_name: str,
               threads: int | None = None, heartbeat: int = HEARTBEAT_INTERVAL) -> None:
    """One worker: join the study and run trials until ``n_trials`` are counted (or claimed) in storage and
    none is running any more. While another worker's trial runs, this one waits: should that worker die,
    its trial is failed here and its retry runs here (`recover_dead_trials`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial comes from `_announce`
    storage = open_storage(url, heartbeat)
    study = open_study(space, storage, study_name, url)
    objective = make_objective(space, Path(sweep_dir), n_trials)
    while True:
        recover_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if waiting or len(counted_trials(trials)) < n_trials:
            objective.last_trial = None  # type: ignore[attr-defined]
            try:
                study.optimize(objective, n_trials=1, catch=(UserError,), callbacks=[_announce])
            except ENDED_ELSEWHERE:
                lost = failed_elsewhere(study, objective.last_trial)  # type: ignore[attr-defined]
                if lost is None:
                    raise
                log.warning("trial %d: another worker failed it meanwhile (its heartbeats came late) and queued it "
                            "again; what was trained here stays in its run directory", lost.number)
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if not has_heartbeat(storage):
            unknowable = [t for t in running if worker_alive(t.user_attrs.get("worker") or {}) is None]
            if unknowable:  # a journal file: no heartbeat tells whether a worker elsewhere is alive
                log.warning("trial(s) %s run on another machine; a journal storage cannot tell whether their "
                            "workers are alive: if one died, start a worker on its machine again",
                            ", ".join(str(t.number) for t in unknowable))
                return
        if not running:
            return
        wait_for_others(heartbeat)


# ---------------------------------------------------------------------------------------------- entry
def check_cv_experiment(space: SweepSpace) -> None:
    """Before any trial: the base config's dataset can be dealt into the space's folds (e.g. every fold holds
    a patient of each class of each label); a `ConfigError` otherwise."""
    base = space.base_config()
    split_seed = space.experiment_args.get("split_seed")
    if base.split_file:  # the folds come from the file; cross_validate checks it against the data
        return
    try:
        assign_folds(dataset_recordings(base), space.experiment_args["folds"],
                     base.effective_split_seed if split_seed is None else split_seed)
    except UserError as e:
        raise type(e)(f"experiment.folds: {e}") from None


def sweep(space: SweepSpace | str | Path, sweep_dir: str | Path, n_trials: int, *, storage: str | None = None,
          study_name: str | None = None, workers: int = 1, heartbeat: int = HEARTBEAT_INTERVAL) -> dict[str, Any]:
    """Run (or join, or finish) a sweep of ``n_trials`` trials; write ``SWEEP_DIR/report/``; return its summary.

    Everything is checked before the first trial: the space, ``n_trials``/``workers``, the sweep
    directory and the storage (``None``: ``SWEEP_DIR/study.db``; ``journal:PATH``; any SQLAlchemy URL, with
    Optuna's heartbeat every ``heartbeat`` seconds). With ``workers > 1``, that many processes work on the one
    study. Started again, it recovers dead workers' trials and runs what is left of the budget; with the budget
    spent it only writes the report.

    Example::

        from ignite_trainer.experiments.sweeps import sweep
        summary = sweep("space.yaml", "sweeps/lr", n_trials=20, workers=2)
        print(summary["best"]["run_dir"], summary["best"]["score"])
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial comes from `_announce`
    space = space if isinstance(space, SweepSpace) else load_space(space)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"--trials={n_trials!r} must be an integer >= 1")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers={workers!r} must be an integer >= 1")
    if space.experiment == "cv":
        check_cv_experiment(space)
    sweep_dir = Path(sweep_dir).expanduser()
    study_name = study_name or sweep_dir.resolve().name
    url = storage_url(storage, sweep_dir)
    # a storage of its own is opened (server reached, credentials and database checked) before anything is
    # created here; the default one is a file in the sweep directory
    opened = open_storage(url, heartbeat) if storage is not None else None
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{sweep_dir}: cannot create the sweep directory ({e.strerror or e})") from None
    if not os.access(sweep_dir, os.W_OK):
        raise ConfigError(f"{sweep_dir}: the sweep directory is not writable")
    study = open_study(space, opened or open_storage(url, heartbeat), study_name, url)
    trials_dir = sweep_dir / TRIALS_DIR
    if not study.trials and trials_dir.is_dir() and any(trials_dir.iterdir()):
        raise ConfigError(f"{trials_dir}: holds trials that study '{study_name}' does not know; "
                          f"use an empty sweep directory (or the storage these trials belong to)")

    if workers == 1:
        run_worker(space, sweep_dir, n_trials, url, study_name, heartbeat=heartbeat)
    else:
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        processes = [context.Process(target=run_worker, name=f"sweep-worker-{i}",
                                     args=(space, str(sweep_dir), n_trials, url, study_name, threads, heartbeat))
                     for i in range(workers)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        failed = [f"{p.name} exited with code {p.exitcode}" for p in processes if p.exitcode]
        if failed:
            log.warning("sweep: %s", "; ".join(failed))
    study = optuna.load_study(study_name=study_name, storage=open_storage(url, heartbeat))
    return write_sweep_report(study, space, sweep_dir)
