"""A cross-validation experiment's members handed out to several machines through a shared Optuna storage.

Every machine runs the same ``cv ... --storage URL`` command with its own local experiment folder (no shared
file system): it creates or joins its folder (as ``--only`` does), creates or joins the queue study, and then
claims one unfinished member after another, trains it with `cv.run_member` and marks it done, until every
member is done. Optuna does the queue, the claims and the heartbeats; this module adds what it lacks:

* **The queue.** A study (default name: the experiment folder's name) whose user attr ``cv_experiment``
  holds the experiment's fingerprint (`experiment_fingerprint`: the digests of the config fields that change
  the result and of the data, the folds as patient-id lists, the seeds). A machine whose experiment differs
  is refused with one line before any member starts. Each member that has no WAITING, RUNNING or COMPLETE
  trial is queued as a WAITING trial with user attr ``member`` (`enqueue_missing`).
* **One trial per claim.** A claim is ``study.optimize(claim, n_trials=1)``: Optuna pops the first WAITING
  trial (setting it RUNNING is atomic in the database) and runs its heartbeat thread while the member trains.
  The claim records its worker (`workers.worker_identity`). A claim that runs nothing ends PRUNED with its
  reason in user attr ``skipped``: a fresh trial Optuna made because another machine popped the last waiting
  one first, or a duplicate (below).
* **Duplicates never run at once.** Two machines may queue the same member at the same moment. The rule: a
  claim steps aside when its member already has a COMPLETE trial, or another WAITING or RUNNING trial with a
  *lower number* (or an earlier trial that failed on its own, unless the claim is a deliberate retry);
  otherwise it runs. Safety: of two claims of one member running at once, the one with the
  higher number checked after it became RUNNING, when the lower one already existed (numbers follow
  creation) and had not ended (it was still to run), so it would have stepped aside. No deadlock: the
  lowest-numbered WAITING or RUNNING trial of a member never steps aside for another one; it is popped (every
  claim pops the lowest WAITING trial first) and runs, or its claimant dies and its retry takes its place.
  A claim that steps aside ends at once and waits for nothing.
* **Dead claimants.** Before each claim `workers.recover_dead_trials` fails a RUNNING trial whose worker on
  this machine is gone and runs Optuna's `fail_stale_trials`, whose callback (`workers.requeue_stale`)
  queues a silent claimant's member again (``retry_of`` names the dead trial; ``member`` is kept). A machine
  with nothing left to claim waits (``min(heartbeat, 5)`` s) while other machines' members run, so the
  member of a claimant that dies is taken over: resumed from this machine's partial run of it if it has
  one, else trained afresh. A claim stopped on purpose (Ctrl-C, SIGTERM) ends FAIL and the member is queued
  again by the next machine that looks. A claimant that was only slow (its heartbeats late) finds at its end
  that its claim was failed: Optuna cannot record its end and raises; the machine says so and goes on (the
  member's retry finds its run finished here, or trains it where it is claimed).
* **Failures.** A member that raises (a `UserError` or anything else) is recorded with its reason (trial
  FAIL, user attrs ``fail_reason`` and ``failed_on_its_own``; its state file and log as `cv` writes them)
  and is not claimed again in this run (a duplicate of it steps aside): a start of the command queues it
  once more (``retry_failed``, user attr ``retry_after_failure``), as ``cv --resume`` retries failed members.
* **The end.** When every member is COMPLETE or failed on its own, a machine whose folder holds every
  finished member collects the experiment as `cv` does; otherwise it names the members that ran elsewhere:
  their run folders (``EXP_DIR/runs/<member>/``) copied in, ``cv --collect EXP_DIR`` builds the report.
  ``cv --collect EXP_DIR --storage URL`` checks the queue first (`check_queue_for_collect`).

A journal storage is refused: it has no heartbeat, so nothing could tell that a claimant on another machine
died. Everything about the storage (driver, server, password, database) is checked before the experiment
folder is created. One claim loop per command: ``--jobs`` with ``--storage`` is refused (start one command
per claim loop wanted).

Example::

    from ignite_trainer import TrainConfig
    from ignite_trainer.experiments.member_queue import queue_cross_validation
    queue_cross_validation(TrainConfig(epochs=30), 5, [0, 1, 2], exp_dir="runs/cv-a",
                           storage="postgresql://user:pw@db.example/cv")   # the same call on every machine
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ignite_trainer.core.errors import CheckpointError, ConfigError, UserError
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.vocabulary import HEARTBEAT_INTERVAL
from ignite_trainer.data.prepare import PreparedData
from ignite_trainer.runs.record import run_identity
from ignite_trainer.training.graceful import TrainingStopped
from ignite_trainer.experiments.cv import (collect_experiment, open_experiment, plan_experiment, record_failure,
                                           run_member, whole_dataset)
from ignite_trainer.experiments.layout import Experiment, member_status, write_state
from ignite_trainer.experiments.storage import open_storage, redacted, retrying
from ignite_trainer.experiments.workers import (ENDED_ELSEWHERE, failed_elsewhere, recover_dead_trials,
                                                wait_for_others, worker_identity)

__all__ = ["queue_cross_validation", "resume_from_queue", "check_queue_for_collect", "open_queue_storage",
           "open_member_queue", "experiment_fingerprint", "enqueue_missing", "member_states", "claim_members",
           "MemberClaim", "MemberState", "MemberFailed", "QUEUE_FORMAT", "MEMBER_ATTR"]

#: What the queue study's ``cv_experiment`` attr holds (a later change of its meaning changes the name).
QUEUE_FORMAT = "ignite_trainer/cv-queue/1"
#: The user attr naming a queued trial's member (``fold<k>_seed<s>``).
MEMBER_ATTR = "member"
_FINGERPRINT_ATTR = "cv_experiment"
#: Marks a member queued again after it failed on its own (a start of the command retries it once).
_RETRY_ATTR = "retry_after_failure"


class MemberFailed(UserError):
    """A claimed member raised while training or predicting; recorded, and the claim loop goes on."""


# ---------------------------------------------------------------------------------------------- the queue
def open_queue_storage(url: str, heartbeat: int = HEARTBEAT_INTERVAL) -> optuna.storages.BaseStorage:
    """The storage of a member queue: a database URL (SQLite, PostgreSQL, MySQL), opened and checked (driver,
    server, password, database: one `ConfigError` naming the URL without its password); ``journal:`` is refused."""
    if url.startswith("journal:"):
        raise ConfigError(f"--storage {redacted(url)}: a journal file cannot hold a cv experiment's queue: it has no "
                          "heartbeat, so nothing could tell that a member's claimant on another machine died; give a "
                          "database URL (sqlite:///FILE, postgresql://..., mysql://...)")
    return open_storage(url, heartbeat)  # a creation race with another machine is retried there


def experiment_fingerprint(exp: Experiment, data: PreparedData, fold_ids: Sequence[Sequence[str]]) -> dict[str, Any]:
    """What makes two machines' experiments the same: the digest of the config fields that change a result
    (where it is written, the cache and the data's path do not; `runs.record.run_identity`), the digest of
    the data (recording ids and file contents), the folds as patient-id lists and the seeds."""
    identity = run_identity(exp.config, data)
    return {"format": QUEUE_FORMAT, "config": identity["config"], "data": identity["data"],
            "folds": [sorted(str(p) for p in fold) for fold in fold_ids], "seeds": list(exp.seeds)}


def open_member_queue(storage: optuna.storages.BaseStorage, study_name: str, url: str,
                      fingerprint: dict[str, Any]) -> optuna.Study:
    """Create the queue study, or join it when it queues the same experiment (`experiment_fingerprint`);
    machines racing to create it retry, and a database that refuses is one line (`storage.retrying`)."""
    return retrying(url, lambda: _open_member_queue(storage, study_name, url, fingerprint), doing="use")


def _open_member_queue(storage: optuna.storages.BaseStorage, study_name: str, url: str,
                       fingerprint: dict[str, Any]) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the queue's own lines say what happens
    study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=0), load_if_exists=True)
    attrs = study.user_attrs  # one reading: another machine may be setting the attr at this moment
    saved = attrs.get(_FINGERPRINT_ATTR)
    if saved is None:
        if attrs:  # a sweep's study (its space) or another program's
            raise ConfigError(f"--storage {redacted(url)}: study '{study_name}' is not a cv experiment's queue "
                              f"(it holds {', '.join(sorted(attrs))}, e.g. a sweep's); give another --study")
        study.set_user_attr(_FINGERPRINT_ATTR, fingerprint)  # also proves the storage can be written
        saved = study.user_attrs.get(_FINGERPRINT_ATTR)  # two different experiments racing: the last one wins
    differ = [what for what in ("config", "data", "folds", "seeds", "format")
              if (saved or {}).get(what) != fingerprint[what]]
    if differ:
        raise ConfigError(f"--storage {redacted(url)}: study '{study_name}' queues another cv experiment (its "
                          f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''}); run the same config, folds "
                          "and seeds as the machines already on it, or give another --study")
    return study


@dataclass(frozen=True)
class MemberState:
    """A member as the queue sees it: ``done``, ``failed`` (on its own), ``running``, ``waiting`` or ``missing``
    (no trial will run it: never queued, or its claims died and nothing queued it again); ``host`` ran it (or
    runs it), ``reason`` why it failed."""

    name: str
    status: str
    host: str | None = None
    reason: str | None = None


def member_states(trials: Sequence[FrozenTrial], names: Sequence[str]) -> dict[str, MemberState]:
    """Each member's `MemberState` from the queue's trials."""
    by_member: dict[str, list[FrozenTrial]] = {n: [] for n in names}
    for t in trials:
        name = t.user_attrs.get(MEMBER_ATTR)
        if name in by_member:
            by_member[name].append(t)
    states = {}
    for name, ts in by_member.items():
        complete = [t for t in ts if t.state == TrialState.COMPLETE]
        running = [t for t in ts if t.state == TrialState.RUNNING]
        failed = [t for t in ts if t.state == TrialState.FAIL and t.user_attrs.get("failed_on_its_own")]
        if complete:
            states[name] = MemberState(name, "done", _host(complete[0]))
        elif running:
            states[name] = MemberState(name, "running", _host(running[0]))
        elif any(t.state == TrialState.WAITING for t in ts):
            states[name] = MemberState(name, "waiting")
        elif failed:
            states[name] = MemberState(name, "failed", _host(failed[-1]), failed[-1].user_attrs.get("fail_reason"))
        else:
            states[name] = MemberState(name, "missing")
    return states


def _host(trial: FrozenTrial) -> str | None:
    worker = trial.user_attrs.get("worker")
    return worker.get("host") if isinstance(worker, dict) else None


def enqueue_missing(study: optuna.Study, names: Sequence[str], retry_failed: bool = False) -> list[str]:
    """Queue each member that nothing will run (and, with ``retry_failed``, each that failed on its own);
    returns their names. Two machines doing this at once may queue a member twice: see the module's rule."""
    states = member_states(study.get_trials(deepcopy=False), names)
    todo = [n for n in names if states[n].status == "missing" or (retry_failed and states[n].status == "failed")]
    for name in todo:
        attrs = {MEMBER_ATTR: name, **({_RETRY_ATTR: True} if states[name].status == "failed" else {})}
        study.enqueue_trial(params={}, user_attrs=attrs)
    return todo


# ---------------------------------------------------------------------------------------------- claims
class MemberClaim:
    """What Optuna calls per claim: check the claimed trial is this member's to run, train it, mark it done."""

    def __init__(self, exp: Experiment, echo: Callable[[str], None], threads: int | None, setup: Callable | None):
        self.exp, self.echo, self.threads, self.setup = exp, echo, threads, setup
        self.members = {m.name: m for m in exp.members()}
        self.trial_number: int | None = None  # the claim under way (or the last one)

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_number = trial.number
        trial.set_user_attr("worker", worker_identity())
        name = trial.user_attrs.get(MEMBER_ATTR)
        if name is None:
            self._skip(trial, "nothing was waiting: another machine claimed the last queued member first")
        if name not in self.members:
            self._skip(trial, f"{name!r} is not a member of this experiment")
        others = [t for t in trial.study.get_trials(deepcopy=False)
                  if t.user_attrs.get(MEMBER_ATTR) == name and t.number != trial.number]
        if any(t.state == TrialState.COMPLETE for t in others):
            self._skip(trial, f"{name} is done already (queued twice)")
        earlier = [t.number for t in others if t.state in (TrialState.WAITING, TrialState.RUNNING)
                   and t.number < trial.number]
        if earlier:
            self._skip(trial, f"{name} is queued twice; trial {min(earlier)} of it goes first")
        failed = [t.number for t in others if t.state == TrialState.FAIL and t.user_attrs.get("failed_on_its_own")
                  and t.number < trial.number]
        if failed and not trial.user_attrs.get(_RETRY_ATTR):
            self._skip(trial, f"{name} failed on its own in trial {max(failed)}; a start of the command retries it")

        member = self.members[name]
        partial = member_status(self.exp.run_dir(member)) == "partial"
        dead = [t for t in others if t.state == TrialState.FAIL and not t.user_attrs.get("failed_on_its_own")
                and isinstance(t.user_attrs.get("worker"), dict)]
        how = "resuming this machine's partial run of it" if partial else "training it here from the start"
        if dead:
            reason = trial.user_attrs.get("retry_reason") or dead[-1].user_attrs.get("fail_reason") or "it stopped"
            self.echo(f"{name}: taking over from {_host(dead[-1])} ({reason}); {how}")
        else:
            self.echo(f"{name}: claimed (trial {trial.number}); {how}")
        start = time.perf_counter()
        try:
            action = run_member(self.exp, member, threads=self.threads, setup=self.setup)
        except (KeyboardInterrupt, TrainingStopped):
            trial.set_user_attr("fail_reason", "stopped on its machine; queued again for any machine")
            raise
        except Exception as e:  # noqa: BLE001 -- a failed member is recorded; the others go on
            message = record_failure(self.exp, member, e, time.perf_counter() - start, self.echo)
            trial.set_user_attr("fail_reason", message)
            trial.set_user_attr("failed_on_its_own", True)
            raise MemberFailed(message) from None
        seconds = time.perf_counter() - start
        write_state(self.exp, member, status="finished", seconds=seconds)
        trial.set_user_attr("action", action)
        trial.set_user_attr("seconds", round(seconds, 3))
        self.echo(f"{name}: finished" + (" (it had finished here earlier)" if action == "skipped" else ""))
        return seconds

    @staticmethod
    def _skip(trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("skipped", reason)
        raise optuna.TrialPruned(reason)


def claim_members(exp: Experiment, study: optuna.Study, *, heartbeat: int = HEARTBEAT_INTERVAL,
                  echo: Callable[[str], None] = print, threads: int | None = None,
                  setup: Callable | None = None) -> None:
    """Claim, train and mark done one member after another until every member is done or failed on its own;
    with nothing to claim, wait while other machines' members run (so that a dead claimant's member is
    taken over here)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per member comes from the claims
    names = [m.name for m in exp.members()]
    claim = MemberClaim(exp, echo, threads, setup)
    shown: list[str] | None = None
    while True:
        recover_dead_trials(study)
        enqueue_missing(study, names)
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            claim.trial_number = None
            try:
                study.optimize(claim, n_trials=1, catch=(MemberFailed,))
            except ENDED_ELSEWHERE:
                lost = failed_elsewhere(study, claim.trial_number)
                if lost is None or lost.user_attrs.get("failed_on_its_own"):
                    raise
                echo(f"{lost.user_attrs.get(MEMBER_ATTR)}: another machine gave this claim up meanwhile (its "
                     "heartbeats came late) and queued the member again; what was trained here stays here")
            shown = None
            continue
        running = [f"{s.name} on {s.host or 'another machine'}" for s in member_states(trials, names).values()
                   if s.status == "running"]
        if not running:
            return
        if running != shown:
            echo(f"waiting while other machines run {', '.join(running)} (taken over here if one stops)")
            shown = running
        wait_for_others(heartbeat)


# ---------------------------------------------------------------------------------------------- entry points
def queue_cross_validation(config: TrainConfig, folds: int | None, seeds: Sequence[int], *, storage: str,
                           study_name: str | None = None, heartbeat: int = HEARTBEAT_INTERVAL,
                           exp_dir: str | Path | None = None, split_seed: int | None = None,
                           splits: str | Path | None = None, bootstrap: int = 1000, figures: bool = True,
                           setup: Callable | None = None, threads: int | None = None,
                           echo: Callable[[str], None] = print) -> dict[str, Any]:
    """`cv.cross_validate` with its members handed out through the queue in ``storage`` (run the same call on
    every machine, each with its own ``exp_dir``); ``study_name`` defaults to the experiment folder's name.

    The storage is opened and checked, the data read, the folds dealt and the queue joined before the
    experiment folder is created or joined. Returns the collected summary (``collected``: True) when this
    folder holds every finished member, else ``elsewhere`` (member -> host); ``failed`` either way."""
    queue_storage = open_queue_storage(storage, heartbeat)
    plan = plan_experiment(config, folds, seeds, exp_dir=exp_dir, split_seed=split_seed, splits=splits, join=True)
    name = study_name or plan.exp.exp_dir.resolve().name
    study = open_member_queue(queue_storage, name, storage,
                              experiment_fingerprint(plan.exp, plan.data, plan.fold_ids))
    open_experiment(plan, echo=echo)
    echo(f"queue: study '{name}' in {redacted(storage)}")
    return _work(plan.exp, study, heartbeat, bootstrap, figures, setup, threads, echo)


def resume_from_queue(exp_dir: str | Path, *, storage: str, study_name: str | None = None,
                      heartbeat: int = HEARTBEAT_INTERVAL, bootstrap: int = 1000, figures: bool = True,
                      setup: Callable | None = None, threads: int | None = None,
                      echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Join the queue of the experiment in ``exp_dir`` (its own settings) and claim members as
    `queue_cross_validation` does."""
    queue_storage = open_queue_storage(storage, heartbeat)
    exp = _load(exp_dir)
    name = study_name or exp.exp_dir.resolve().name
    study = open_member_queue(queue_storage, name, storage,
                              experiment_fingerprint(exp, whole_dataset(exp.config), exp.folds()))
    echo(f"queue: study '{name}' in {redacted(storage)}")
    return _work(exp, study, heartbeat, bootstrap, figures, setup, threads, echo)


def check_queue_for_collect(exp_dir: str | Path, *, storage: str, study_name: str | None = None,
                            heartbeat: int = HEARTBEAT_INTERVAL) -> None:
    """Before ``cv --collect EXP_DIR --storage URL``: every member must be done (or failed on its own) in the
    queue, and every done member's run folder must be in ``EXP_DIR/runs/``; one `UserError` naming the
    members otherwise."""
    queue_storage = open_queue_storage(storage, heartbeat)
    exp = _load(exp_dir)
    name = study_name or exp.exp_dir.resolve().name
    try:
        optuna.load_study(study_name=name, storage=queue_storage)
    except KeyError:
        raise ConfigError(f"--storage {redacted(storage)}: no study '{name}' (the experiment's queue; --study "
                          "names another)") from None
    study = open_member_queue(queue_storage, name, storage,
                              experiment_fingerprint(exp, whole_dataset(exp.config), exp.folds()))
    states = member_states(study.get_trials(deepcopy=False), [m.name for m in exp.members()])
    undone = [s for s in states.values() if s.status not in ("done", "failed")]
    if undone:
        listing = ", ".join(s.name + (f" (running on {s.host})" if s.status == "running" else f" ({s.status})")
                            for s in undone)
        raise CheckpointError(f"{exp.exp_dir}: {len(undone)} member(s) of study '{name}' are not done yet: {listing}; "
                              "collect once every member is done")
    elsewhere = _ran_elsewhere(exp, states)
    if elsewhere:
        raise CheckpointError(f"{exp.exp_dir}: {len(elsewhere)} member(s) finished on other machines but their run "
                              f"folders are not here: {_listing(elsewhere)}; copy each {exp.runs_dir}/<member>/ from "
                              "the machine that ran it, then collect again")


def _load(exp_dir: str | Path) -> Experiment:
    exp = Experiment.load(exp_dir)
    if not exp.splits_path.is_file():
        raise CheckpointError(f"{exp.splits_path}: the experiment's split file is missing")
    return exp


def _work(exp: Experiment, study: optuna.Study, heartbeat: int, bootstrap: int, figures: bool,
          setup: Callable | None, threads: int | None, echo: Callable[[str], None]) -> dict[str, Any]:
    names = [m.name for m in exp.members()]
    before = member_states(study.get_trials(deepcopy=False), names)
    for name in enqueue_missing(study, names, retry_failed=True):
        if before[name].status == "failed":  # once per start, as cv --resume retries failed members
            echo(f"{name}: queued again (it failed on {before[name].host}: {before[name].reason})")
    claim_members(exp, study, heartbeat=heartbeat, echo=echo, threads=threads, setup=setup)
    states = member_states(study.get_trials(deepcopy=False), names)
    failed = {s.name: s.reason or "failed" for s in states.values() if s.status == "failed"}
    retry = "run the same cv --storage command again to retry them"
    elsewhere = _ran_elsewhere(exp, states)
    if elsewhere:
        echo(f"every member is done; {len(elsewhere)} ran on other machines: {_listing(elsewhere)}. Copy their run "
             f"folders ({exp.runs_dir}/<member>/) here, then `cv --collect {exp.exp_dir}` builds the report")
        return {"exp_dir": str(exp.exp_dir), "failed": failed, "collected": False, "elsewhere": elsewhere,
                "retry": retry}
    summary = collect_experiment(exp.exp_dir, bootstrap=bootstrap, figures=figures)
    return {**summary, "failed": failed, "collected": True, "elsewhere": {}, "retry": retry}


def _ran_elsewhere(exp: Experiment, states: dict[str, MemberState]) -> dict[str, str]:
    """Members done in the queue whose run folder here has not finished (it ran on another machine)."""
    members = {m.name: m for m in exp.members()}
    return {s.name: s.host or "another machine" for s in states.values()
            if s.status == "done" and member_status(exp.run_dir(members[s.name])) in ("new", "partial")}


def _listing(elsewhere: dict[str, str]) -> str:
    hosts: dict[str, list[str]] = {}
    for name, host in elsewhere.items():
        hosts.setdefault(host, []).append(name)
    return "; ".join(f"{', '.join(names)} on {host}" for host, names in hosts.items())

