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
* **Dead workers.** Each trial records its worker (host, pid, process start time). A worker starting on
  the same host fails a RUNNING trial whose process is gone; on an RDB storage Optuna's heartbeat does
  the same for any host. The failed trial is queued again with the same parameters (Optuna's
  ``WAITING`` state, as `RetryHeartbeatStaleTrialCallback` does) and the retry resumes the dead trial's
  run directory from its last checkpoint (or restarts it when none was written).
* **Seeds per trial.** A sampler seeded once per process would make two workers suggest the same
  parameters; `TrialSeededSampler` seeds each trial from ``(sweep seed, trial number)``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import CheckpointError, ConfigError, UserError
from ignite_trainer.runs.rundir import read_metrics_log
from ignite_trainer.experiments.space import Param, SweepSpace, load_space, space_to_dict

log = logging.getLogger("ignite_trainer")

TRIALS_DIR = "trials"
#: Seconds between a trial's heartbeats on an RDB storage, and how long one may be missing before the
#: trial counts as dead. A training epoch may take minutes; the heartbeat runs in its own thread.
HEARTBEAT_INTERVAL = 30
HEARTBEAT_GRACE = 180


class SurplusTrial(UserError):
    """Another worker already claimed the last trial of the budget; this one stops before training."""


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
    from ignite_trainer.training.run import train

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
    from ignite_trainer.experiments.cv import Experiment, collect_experiment, cross_validate, resume_cross_validation

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
    from ignite_trainer.experiments.cv import Experiment

    run_dir = Experiment.load(exp_dir).run_dir(member)
    if not metric.startswith("oof."):
        return best_score(run_dir, metric, direction)[0]
    import json

    try:
        result = json.loads((run_dir / "oof" / "metrics.json").read_text())
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
    import json

    from ignite_trainer.experiments.cv import Experiment

    exp = Experiment.load(exp_dir)
    per_run = [best_score(exp.run_dir(m), metric if not metric.startswith("oof.") else "val_loss", direction)
               for m in exp.members()]
    epochs = sum(n for _, n in per_run)
    if metric.startswith("oof."):
        try:
            pooled = json.loads((exp_dir / "report" / "summary.json").read_text())["pooled"]
        except (OSError, ValueError, KeyError):
            return None, epochs
        value = pooled.get(metric[len("oof."):])
        return (float(value) if isinstance(value, (int, float)) else None), epochs
    scores = [v for v, _ in per_run if v is not None]
    return (float(np.mean(scores)) if scores else None), epochs


def trial_score(run_dir: Path, metric: str, direction: str) -> tuple[float | None, int]:
    """A trial's score so far: `experiment_score` for a cross-validation experiment, else `best_score`."""
    if (Path(run_dir) / "experiment.yaml").is_file():
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
    records = read_metrics_log(Path(run_dir) / "metrics.jsonl")
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
        from ignite.engine import Events
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


# ---------------------------------------------------------------------------------------------- sampler
class TrialSeededSampler(BaseSampler):
    """TPE (or random) sampling seeded from ``(seed, trial number)`` rather than once per process.

    Workers started with the same sweep seed would otherwise draw the same random start-up points; a
    restarted worker would repeat its first trials. The inner sampler holds no state but its random
    generator (the history is read from the storage), so a fresh one per trial changes nothing else.

    Example::

        study = optuna.create_study(sampler=TrialSeededSampler("tpe", seed=0))
    """

    def __init__(self, name: str = "tpe", seed: int = 0) -> None:
        self.name = name
        self.seed = seed
        self._inner = self._for_trial(0)

    def _for_trial(self, number: int) -> BaseSampler:
        seed = int(np.random.SeedSequence([self.seed, number]).generate_state(1)[0])
        return TPESampler(seed=seed) if self.name == "tpe" else RandomSampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._for_trial(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)


def suggest(trial: optuna.Trial, param: Param) -> Any:
    if param.kind == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(param.name, float(param.low), float(param.high), step=param.step, log=param.log)


def make_pruner(space: SweepSpace) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(**space.pruner_args) if space.pruner == "median" else optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------- storage
def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """``--storage`` as given, or the embedded SQLite file ``SWEEP_DIR/study.db``."""
    return storage or f"sqlite:///{(Path(sweep_dir) / 'study.db').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: ``journal:PATH`` is a journal file (for shared file systems), anything
    else an SQLAlchemy URL (SQLite, PostgreSQL, MySQL) with Optuna's heartbeat on."""
    shown = _redacted(url)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal:"):]).expanduser()
            if not path.parent.is_dir():
                raise ConfigError(f"--storage {shown}: folder {path.parent} does not exist")
            return JournalStorage(JournalFileBackend(str(path)))
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat arguments
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                                                 grace_period=HEARTBEAT_GRACE,
                                                 heartbeat_stale_trial_callback=_requeue_stale)
        if url.startswith("sqlite"):
            _write_ahead_log(storage)
        return storage
    except ConfigError:
        raise
    except Exception as e:  # drivers raise their own types: a missing module, a refused connection, a bad file
        raise ConfigError(f"--storage {shown}: cannot open the storage ({_first_line(e)})") from None


def _write_ahead_log(storage: optuna.storages.RDBStorage) -> None:
    """SQLite in write-ahead-log mode, synced at checkpoints rather than at every commit: a trial writes
    about 18 small transactions, and with the default rollback journal each waits for its own fsync
    (measured 0.5 s a trial on a busy machine). A power cut may lose the last commits, never the file."""
    from sqlalchemy import event

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened while creating the tables pick the pragmas up again


def open_study(space: SweepSpace, storage: optuna.storages.BaseStorage, study_name: str, url: str) -> optuna.Study:
    """Create the study, or join it when it exists and was created from the same space."""
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=space.direction,
                                    sampler=TrialSeededSampler(space.sampler, space.seed), pruner=make_pruner(space),
                                    load_if_exists=True)
        fingerprint = study.user_attrs.get("space_fingerprint")
        if fingerprint is None:
            study.set_user_attr("space", space_to_dict(space))  # also proves the storage can be written
            study.set_user_attr("space_fingerprint", space.fingerprint())
        elif fingerprint != space.fingerprint():
            raise ConfigError(f"--storage {_redacted(url)}: study '{study_name}' was created from a different space; "
                              f"use another sweep directory or --study name")
        if study.direction.name.lower() != space.direction:
            raise ConfigError(f"--storage {_redacted(url)}: study '{study_name}' is {study.direction.name.lower()}d, "
                              f"the space asks to {space.direction}")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--storage {_redacted(url)}: cannot use the storage ({_first_line(e)})") from None
    return study


def _redacted(url: str) -> str:
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- workers
def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, pid and the process's start time (so a reused pid is not taken for it)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def worker_alive(worker: dict[str, Any]) -> bool | None:
    """Whether a trial's worker still runs; None when it ran on another host (only a heartbeat can tell)."""
    if worker.get("host") != socket.gethostname():
        return None
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = worker.get("started")
    return started is None or _process_start(pid) == started


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Queue a dead trial again: same parameters and run directory, ``retry_of`` naming the trial it replaces."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("fail_reason", "worker", "seconds", "epochs", "score")}
    attrs.update(retry_of=trial.number, retry_reason=reason, slot=budget_slot(trial))
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=attrs,
                                              intermediate_values=trial.intermediate_values))
    log.warning("trial %d: %s; queued again as a retry", trial.number, reason)


def _requeue_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    requeue(study, trial, "its worker stopped sending heartbeats")


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail (and queue again) each RUNNING trial whose worker is gone: on this host, its process has
    ended; on an RDB storage, its heartbeat stopped (any host; Optuna's own check, whose callback
    `_requeue_stale` queues the retry). Returns the numbers recovered through the process check.

    Optuna checks heartbeats only when it starts a trial; called here before the budget check, so that a
    budget filled with dead RUNNING trials is still recovered."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    recovered = []
    for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not isinstance(worker, dict) or worker_alive(worker) is not False:
            continue
        reason = f"its worker {worker['host']}:{worker['pid']} died"
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker recovered it first
        requeue(study, trial, reason)
        recovered.append(trial.number)
    return recovered


def budget_slot(trial: FrozenTrial | optuna.Trial) -> int:
    """A trial's place in the budget: its number, or for a retry the number of the trial it replaces."""
    return int(trial.user_attrs.get("slot", trial.number))


def counted_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use the budget: all but surplus ones and dead ones replaced by a retry."""
    replaced = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return [t for t in trials if t.number not in replaced and not t.user_attrs.get("surplus")]


def make_objective(space: SweepSpace, sweep_dir: Path, n_trials: int) -> Callable[[optuna.Trial], float]:
    """The function Optuna calls per trial: claim a place in the budget, build the config, train, score."""
    runner = TRIAL_RUNNERS[space.experiment]
    base = space.base_config()
    trials_dir = Path(sweep_dir) / TRIALS_DIR

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_identity())
        retry_of = trial.user_attrs.get("retry_of")
        counted = counted_trials(trial.study.get_trials(deepcopy=False))
        if sum(budget_slot(t) < budget_slot(trial) for t in counted) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"the sweep already has its {n_trials} trials")
        params = {p.name: suggest(trial, p) for p in space.params}
        run_dir = Path(trial.user_attrs.get("run_dir") or trials_dir / f"trial_{trial.number:04d}")
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
            resumable = (run_dir / "experiment.yaml").is_file() if cv else _has_checkpoint(run_dir)
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
    from ignite_trainer.runs.checkpoint import find_resume_checkpoint

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
               threads: int | None = None) -> None:
    """One worker: join the study and run trials until ``n_trials`` are counted (or claimed) in storage."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial comes from `_announce`
    study = open_study(space, open_storage(url), study_name, url)
    objective = make_objective(space, Path(sweep_dir), n_trials)
    while True:
        recover_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and len(counted_trials(trials)) >= n_trials:
            return
        study.optimize(objective, n_trials=1, catch=(UserError,), callbacks=[_announce])


# ---------------------------------------------------------------------------------------------- entry
def check_cv_experiment(space: SweepSpace) -> None:
    """Before any trial: the base config's dataset can be dealt into the space's folds (e.g. not more folds
    than the patients of the rarest stratum); a `ConfigError` otherwise."""
    from ignite_trainer.experiments.cv import dataset_recordings
    from ignite_trainer.data.splits import assign_folds

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
          study_name: str | None = None, workers: int = 1) -> dict[str, Any]:
    """Run (or join, or finish) a sweep of ``n_trials`` trials; write ``SWEEP_DIR/report/``; return its summary.

    Everything is checked before the first trial: the space, ``n_trials``/``workers``, the sweep
    directory and the storage (``None``: ``SWEEP_DIR/study.db``; ``journal:PATH``; any SQLAlchemy URL).
    With ``workers > 1``, that many processes work on the one study. Started again, it recovers dead
    workers' trials and runs what is left of the budget; with the budget spent it only writes the report.

    Example::

        from ignite_trainer.experiments.sweeps import sweep
        summary = sweep("space.yaml", "sweeps/lr", n_trials=20, workers=2)
        print(summary["best"]["run_dir"], summary["best"]["score"])
    """
    from ignite_trainer.experiments.sweep_report import write_sweep_report

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
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{sweep_dir}: cannot create the sweep directory ({e.strerror or e})") from None
    if not os.access(sweep_dir, os.W_OK):
        raise ConfigError(f"{sweep_dir}: the sweep directory is not writable")
    url = storage_url(storage, sweep_dir)
    study = open_study(space, open_storage(url), study_name, url)
    trials_dir = sweep_dir / TRIALS_DIR
    if not study.trials and trials_dir.is_dir() and any(trials_dir.iterdir()):
        raise ConfigError(f"{trials_dir}: holds trials that study '{study_name}' does not know; "
                          f"use an empty sweep directory (or the storage these trials belong to)")

    if workers == 1:
        run_worker(space, sweep_dir, n_trials, url, study_name)
    else:
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        processes = [context.Process(target=run_worker, args=(space, str(sweep_dir), n_trials, url, study_name, threads),
                                     name=f"sweep-worker-{i}") for i in range(workers)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        failed = [f"{p.name} exited with code {p.exitcode}" for p in processes if p.exitcode]
        if failed:
            log.warning("sweep: %s", "; ".join(failed))
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    return write_sweep_report(study, space, sweep_dir)
