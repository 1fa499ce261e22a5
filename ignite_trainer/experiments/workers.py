"""Who runs a sweep's trials and how many count: worker liveness, dead trials queued again, the trial budget.

* **One budget across workers.** Optuna's ``n_trials`` counts per process and `MaxTrialsCallback` checks
  only after a trial, so K workers can overshoot. Storage hands out trial numbers atomically; a trial
  whose place in the budget (`budget_slot`) among the `counted_trials` is ``>= N`` is marked surplus and
  stops before it trains (`SurplusTrial`; a retry takes the place of the trial it replaces).
* **Dead workers.** Each trial records its worker (`worker_identity`: host name, machine, pid, process
  start time). `recover_dead_trials` fails a RUNNING trial whose process on this machine is gone
  (`worker_alive`); on an RDB storage Optuna's heartbeat does the same for any machine (`requeue_stale`).
  The failed trial is queued again with the same parameters (`requeue`, Optuna's ``WAITING`` state).
* **Which machine.** A pid means something only in the process table it came from, so "this machine" is
  the kernel's boot id and the pid namespace (two containers on one host, or two hosts that share a host
  name, are different machines), not the host name alone. ``IGNITE_TRAINER_WORKER_HOST`` replaces both
  (a worker that should be taken for another machine, as the tests' workers are); only a heartbeat can
  then tell whether it died.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ignite_trainer.core.errors import UserError

__all__ = ["SurplusTrial", "worker_identity", "worker_alive", "WORKER_HOST_ENV", "requeue", "requeue_stale",
           "recover_dead_trials", "ENDED_ELSEWHERE", "failed_elsewhere", "wait_for_others", "budget_slot",
           "counted_trials"]

log = logging.getLogger("ignite_trainer")

#: Environment variable naming the machine a worker presents itself as (host name and machine both).
WORKER_HOST_ENV = "IGNITE_TRAINER_WORKER_HOST"


class SurplusTrial(UserError):
    """Another worker already claimed the last trial of the budget; this one stops before training."""


# ---------------------------------------------------------------------------------------------- workers
def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host name, machine (`_machine`), pid and the process's start time (so a reused pid
    is not taken for it)."""
    named = os.environ.get(WORKER_HOST_ENV)
    return {"host": named or socket.gethostname(), "machine": named or _machine(), "pid": os.getpid(),
            "started": _process_start(os.getpid())}


@functools.cache
def _machine() -> str:
    """The process table this process's pid belongs to: the kernel's boot id and the pid namespace (fixed
    for the life of the process: read once)."""
    parts = []
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("?")
    return f"{socket.gethostname()}/{'/'.join(parts)}"


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def worker_alive(worker: dict[str, Any]) -> bool | None:
    """Whether a trial's worker still runs; None when it ran on another machine (only a heartbeat can tell).
    A record from before machines were recorded is compared by host name."""
    me = worker_identity()
    if worker.get("machine", worker.get("host")) != me["machine" if "machine" in worker else "host"]:
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


def requeue_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat callback: a trial whose heartbeat stopped is queued again (`requeue`)."""
    requeue(study, trial, "its worker stopped sending heartbeats")


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail (and queue again) each RUNNING trial whose worker is gone: on this host, its process has
    ended; on an RDB storage, its heartbeat stopped (any host; Optuna's own check, whose callback
    `requeue_stale` queues the retry). Returns the numbers recovered through the process check.

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


#: What Optuna raises when a worker ends a trial that has ended already: another worker failed it meanwhile,
#: its heartbeats having come too late (a machine paused for minutes, a database that was unreachable).
ENDED_ELSEWHERE = (ValueError, AssertionError, optuna.exceptions.UpdateFinishedTrialError)


def failed_elsewhere(study: optuna.Study, number: int | None) -> FrozenTrial | None:
    """Trial ``number`` (this worker's last) when another worker failed it meanwhile; None otherwise, and
    for None (the worker had not started one). Call it in an ``except ENDED_ELSEWHERE``: what else raised
    is not this."""
    if number is None:
        return None
    trial = study.get_trials(deepcopy=False)[number]
    return trial if trial.state == TrialState.FAIL else None


def wait_for_others(heartbeat: int) -> None:
    """One pause of a worker that has nothing to start while other workers' trials run: short enough to
    take over promptly, long enough not to load the database (at most a heartbeat)."""
    time.sleep(min(heartbeat, 5))


def budget_slot(trial: FrozenTrial | optuna.Trial) -> int:
    """A trial's place in the budget: its number, or for a retry the number of the trial it replaces."""
    return int(trial.user_attrs.get("slot", trial.number))


def counted_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use the budget: all but surplus ones and dead ones replaced by a retry."""
    replaced = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return [t for t in trials if t.number not in replaced and not t.user_attrs.get("surplus")]
