"""Cross-validation across machines: members handed out through a shared storage queue (`member_queue`), and the
scheduler-array form (one ``cv --only F:S`` process per member).

Machines are ``cli.py cv --storage`` subprocesses, each with its own experiment folder and its own
``IGNITE_TRAINER_WORKER_HOST``: they present themselves as different hosts, so only the heartbeat can tell that
one died. Every member must run exactly once overall, and the run folders copied together must collect to the
very same pooled out-of-fold scores as the experiment run on one machine without a storage (each member's
training is deterministic, and every process here trains on one torch thread, as the suite does).

Every subprocess has a timeout and is killed (its whole process group) in ``finally``; no test asserts a
wall-clock figure. The waits are for a file or a process, each bounded by `DEADLINE`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cli import main
from conftest import tiny_config
from pg_server import free_port
from ignite_trainer.core.errors import DataError
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.experiments import member_queue
from ignite_trainer.experiments.cv import cross_validate, open_experiment, plan_experiment
from ignite_trainer.experiments.layout import member_status
from ignite_trainer.experiments.member_queue import (MemberClaim, claim_members, enqueue_missing,
                                                     experiment_fingerprint, member_states, open_member_queue,
                                                     open_queue_storage)
from ignite_trainer.experiments.workers import WORKER_HOST_ENV

ROOT = Path(__file__).resolve().parents[1]
FOLDS, SEEDS = 2, [0, 1]
MEMBERS = [f"fold{k}_seed{s}" for s in SEEDS for k in range(FOLDS)]
#: Bound of every wait for a subprocess or a file it writes.
DEADLINE = 300


@dataclass(frozen=True)
class Setup:
    base: Path
    config_file: Path
    pooled: dict
    oof: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    """The tiny data, its config file, and the experiment run on one machine without a storage (the reference)."""
    base = tmp_path_factory.mktemp("cvq")
    data = write_synthetic(base / "data", 14, 47)  # 3 strata of >= 3 patients: 2 folds hold every class
    config = tiny_config(data, base, epochs=1)
    config_file = base / "tiny.yaml"
    config_file.write_text(config.to_yaml())
    one = base / "one"
    cross_validate(config, FOLDS, SEEDS, exp_dir=one, bootstrap=0, figures=False, echo=lambda _: None)
    pooled = json.loads((one / "report" / "summary.json").read_text())["pooled"]
    return Setup(base, config_file, pooled, (one / "oof_predictions.csv").read_text())


def cv_args(setup: Setup, folder: Path, *extra, config_file: Path | None = None, seeds=SEEDS) -> list[str]:
    """The same ``cv`` options every machine gives (only --output-dir, its local folder, differs)."""
    return ["cv", "--config", str(config_file or setup.config_file), "--folds", str(FOLDS),
            "--seeds", ",".join(map(str, seeds)), "--output-dir", str(folder), "--name", "exp",
            "--bootstrap", "0", "--no-figures", *map(str, extra)]


@contextmanager
def machines():
    """Started machines (`start`), each killed with its whole process group at the end if still running."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def start(started: list, args: list[str], host: str, log: Path, program: list[str] | None = None) -> subprocess.Popen:
    """``cli.py ARGS`` (or ``program ARGS``) as machine ``host``: one torch thread, output into ``log``."""
    env = {**os.environ, WORKER_HOST_ENV: host, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        proc = subprocess.Popen([*(program or [sys.executable, str(ROOT / "cli.py")]), *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started.append(proc)
    return proc


def finish(proc: subprocess.Popen, log: Path) -> list[str]:
    """Wait for ``proc`` (bounded); its exit code must be 0. Returns its output lines."""
    code = proc.wait(timeout=DEADLINE)
    lines = log.read_text().splitlines()
    assert code == 0, "\n".join(lines[-30:])
    return lines


def queue_trials(url: str, study: str = "exp") -> list:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def local_members(exp_dir: Path) -> set[str]:
    return {m for m in MEMBERS if (exp_dir / "runs" / m).exists()}


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    return request.getfixturevalue("postgres_url")


# ---------------------------------------------------------------------------------------------- two machines
def test_two_machines_run_every_member_once_and_collect_the_one_machine_result(setup, queue_url, tmp_path, capsys):
    folders = {"machine-a": tmp_path / "a", "machine-b": tmp_path / "b"}
    with machines() as started:
        # --heartbeat 2: a machine with nothing left waits 2 s between looks (not 5), and a machine counts as
        # dead after 12 s without one (a busy test machine may delay a heartbeat, not six of them)
        procs = {host: start(started, cv_args(setup, folder, "--storage", queue_url, "--heartbeat", 2), host,
                             tmp_path / f"{host}.log")
                 for host, folder in folders.items()}
        output = {host: finish(proc, tmp_path / f"{host}.log") for host, proc in procs.items()}

    # every member ran exactly once, on the machine whose folder holds it, and nothing else ran
    trials = queue_trials(queue_url)
    said = "\n".join(f"{t.number} {t.state.name} {t.user_attrs}" for t in trials) + "\n" + "\n".join(
        line for lines in output.values() for line in lines if not line.startswith((" ", "epoch", "data", "split")))
    ran = [t for t in trials if t.state != TrialState.PRUNED]
    assert sorted(t.user_attrs["member"] for t in ran) == sorted(MEMBERS), said
    assert all(t.state == TrialState.COMPLETE for t in ran), said
    host_of = {t.user_attrs["member"]: t.user_attrs["worker"]["host"] for t in ran}
    for host, folder in folders.items():
        mine = {m for m, h in host_of.items() if h == host}
        assert local_members(folder / "exp") == mine, said
        assert all(member_status(folder / "exp" / "runs" / m) == "done" for m in mine), said
        finished = [line for line in output[host] if line.endswith(": finished")]
        assert sorted(finished) == sorted(f"{m}: finished" for m in mine), said
        elsewhere = sorted(set(MEMBERS) - mine)
        if elsewhere:  # said in one line, nothing collected here
            (line,) = [line for line in output[host] if "ran on other machines" in line]
            assert all(m in line for m in elsewhere) and "cv --collect" in line
            assert not (folder / "exp" / "report").exists()
    assert sum(len(local_members(f / "exp")) for f in folders.values()) == len(MEMBERS)

    # a folder lacking members: --collect with the storage names them and writes nothing
    short = next(f / "exp" for f in folders.values() if local_members(f / "exp") != set(MEMBERS))
    code, errors = run_cli(capsys, "cv", "--collect", short, "--storage", queue_url)
    missing = sorted(set(MEMBERS) - local_members(short))
    assert code == 2 and len(errors) == 1 and "finished on other machines" in errors[0], errors
    assert all(m in errors[0] for m in missing) and not (short / "report").exists()

    # started again on a machine, the command finds every member done and trains nothing
    before = {p: p.stat().st_mtime_ns for p in (short / "runs").rglob("*") if p.is_file()}
    code, errors = run_cli(capsys, "cv", "--resume", short, "--storage", queue_url, "--bootstrap", 0, "--no-figures")
    assert code == 0 and errors == [], said
    assert {p: p.stat().st_mtime_ns for p in (short / "runs").rglob("*") if p.is_file()} == before

    # the run folders copied together collect to the one-machine experiment's scores, exactly
    merged = tmp_path / "merged"
    shutil.copytree(folders["machine-a"] / "exp", merged)
    for m in local_members(folders["machine-b"] / "exp"):
        shutil.copytree(folders["machine-b"] / "exp" / "runs" / m, merged / "runs" / m)
    code, errors = run_cli(capsys, "cv", "--collect", merged, "--storage", queue_url, "--study", "exp",
                           "--bootstrap", 0, "--no-figures")
    assert code == 0 and errors == []
    assert json.loads((merged / "report" / "summary.json").read_text())["pooled"] == setup.pooled
    assert (merged / "oof_predictions.csv").read_text() == setup.oof


HANG_AFTER_FIRST_EPOCH = """
import sys, time
from ignite.engine import Events
import cli
from ignite_trainer.experiments import member_queue

train_member = member_queue.run_member

def hang(trainer, evaluator):  # after the epoch's metrics line and checkpoint: a machine that stops responding
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: time.sleep(3600))

def hanging_member(exp, member, threads=None, progress=None, setup=None):
    return train_member(exp, member, threads=threads, progress=progress, setup=hang)

member_queue.run_member = hanging_member
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_killed_claimants_member_is_taken_over_and_finished_by_another_machine(setup, tmp_path):
    config_file = tmp_path / "two_epochs.yaml"  # two epochs, so the claimant dies in the middle of its member
    config_file.write_text(setup.config_file.read_text().replace("epochs: 1\n", "epochs: 2\n"))
    assert "epochs: 2\n" in config_file.read_text()
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    a, b = tmp_path / "a", tmp_path / "b"
    members = ["fold0_seed0", "fold1_seed0"]
    with machines() as started:
        dying = start(started, cv_args(setup, a, "--storage", url, "--heartbeat", 1, config_file=config_file,
                                       seeds=[0]),
                      "machine-a", tmp_path / "a.log", program=[sys.executable, "-c", HANG_AFTER_FIRST_EPOCH])
        deadline = time.monotonic() + DEADLINE
        claimed = None
        while claimed is None:
            assert dying.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "machine-a never finished an epoch"
            logs = [p for p in (a / "exp" / "runs").glob("*/metrics.jsonl") if p.read_text().strip()]
            claimed = logs[0].parent.name if logs else None
            time.sleep(0.2)
        other = start(started, cv_args(setup, b, "--storage", url, "--heartbeat", 1, config_file=config_file,
                                       seeds=[0]),
                      "machine-b", tmp_path / "b.log")
        os.killpg(dying.pid, signal.SIGKILL)
        assert dying.wait(timeout=60) == -signal.SIGKILL
        output = finish(other, tmp_path / "b.log")

    assert member_status(a / "exp" / "runs" / claimed) == "partial"  # it died in the middle of the member
    trials = queue_trials(url)
    assert {s.status for s in member_states(trials, members).values()} == {"done"}
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert dead.user_attrs["member"] == retry.user_attrs["member"] == claimed
    assert dead.user_attrs["worker"]["host"] == "machine-a" and retry.user_attrs["worker"]["host"] == "machine-b"
    assert retry.state == TrialState.COMPLETE and "heartbeats" in retry.user_attrs["retry_reason"]
    assert f"{claimed}: taking over from machine-a (its worker stopped sending heartbeats); training it here " \
           "from the start" in output
    assert local_members(b / "exp") == set(members)  # so machine-b collected the experiment itself
    assert (b / "exp" / "report" / "summary.json").is_file()


# ---------------------------------------------------------------------------------------------- scheduler array
def test_array_tasks_one_member_each_then_collect_give_the_one_machine_result(setup, tmp_path, capsys):
    shared = tmp_path / "shared"  # the array's tasks share a file system: one experiment folder
    with machines() as started:
        tasks = []
        for task in range(len(MEMBERS)):  # what $SLURM_ARRAY_TASK_ID maps to
            fold, seed = task % FOLDS, SEEDS[task // FOLDS]
            tasks.append(start(started, cv_args(setup, shared, "--only", f"{fold}:{seed}"), f"node-{task}",
                               tmp_path / f"task{task}.log"))
        for task, proc in enumerate(tasks):
            finish(proc, tmp_path / f"task{task}.log")
    code, errors = run_cli(capsys, "cv", "--collect", shared / "exp", "--bootstrap", 0, "--no-figures")
    assert code == 0 and errors == []
    assert json.loads((shared / "exp" / "report" / "summary.json").read_text())["pooled"] == setup.pooled
    assert (shared / "exp" / "oof_predictions.csv").read_text() == setup.oof


# ---------------------------------------------------------------------------------------------- the queue's rules
@pytest.fixture
def queue(setup, tmp_path):
    """An experiment folder and its queue on SQLite, nothing trained: ``(exp, study, url)``."""
    config = tiny_config(setup.base / "data", setup.base, epochs=1)
    plan = plan_experiment(config, FOLDS, SEEDS, exp_dir=tmp_path / "exp")
    open_experiment(plan, echo=lambda _: None)
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    study = open_member_queue(open_queue_storage(url, 1), "q", url,
                              experiment_fingerprint(plan.exp, plan.data, plan.fold_ids))
    return plan.exp, study, url


def test_duplicates_step_aside_a_failed_member_is_recorded_once_and_the_others_go_on(queue, monkeypatch):
    exp, study, _ = queue
    trained = []

    def fake_member(exp, member, threads=None, progress=None, setup=None):  # the claims' rules, without training
        trained.append(member.name)
        if member.name == "fold1_seed0":
            raise DataError("fold1_seed0: a bad recording")
        return "trained"

    monkeypatch.setattr(member_queue, "run_member", fake_member)
    assert enqueue_missing(study, MEMBERS) == MEMBERS
    for name in ("fold0_seed1", "fold1_seed0"):  # two machines queued these at the same moment
        study.enqueue_trial(params={}, user_attrs={"member": name})
    lines = []
    claim_members(exp, study, heartbeat=1, echo=lines.append)

    assert sorted(trained) == sorted(MEMBERS)  # each once: the duplicates stepped aside, the failure is not retried
    trials = study.get_trials(deepcopy=False)
    states = member_states(trials, MEMBERS)
    assert states["fold1_seed0"].status == "failed" and states["fold1_seed0"].reason == "fold1_seed0: a bad recording"
    assert all(states[m].status == "done" for m in MEMBERS if m != "fold1_seed0")
    skipped = [t for t in trials if t.state == TrialState.PRUNED]
    assert [t.user_attrs["member"] for t in skipped] == ["fold0_seed1", "fold1_seed0"]
    assert "done already" in skipped[0].user_attrs["skipped"]
    assert "failed on its own in trial 1" in skipped[1].user_attrs["skipped"]
    assert json.loads(exp.state_file(exp.members()[1]).read_text())["status"] == "failed"
    assert "fold1_seed0: failed: fold1_seed0: a bad recording" in lines
    # the next start of the command queues it once more, as cv --resume retries failed members
    assert enqueue_missing(study, MEMBERS) == [] and enqueue_missing(study, MEMBERS, retry_failed=True) == ["fold1_seed0"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_claim_runs_nothing_when_an_earlier_claim_of_its_member_is_queued_or_running(queue, monkeypatch):
    exp, study, _ = queue
    monkeypatch.setattr(member_queue, "run_member", lambda *a, **k: "trained")
    claim = MemberClaim(exp, lambda _: None, None, None)
    for _ in range(2):
        study.enqueue_trial(params={}, user_attrs={"member": "fold0_seed0"})
    first, second = study.ask(), study.ask()  # both claimed at once, by two machines
    with pytest.raises(optuna.TrialPruned, match="trial 0 of it goes first"):
        claim(second)
    assert claim(first) >= 0  # the lower one runs
    fresh = study.ask()  # nothing waiting: Optuna made a trial of no member
    with pytest.raises(optuna.TrialPruned, match="nothing was waiting"):
        claim(fresh)


# ---------------------------------------------------------------------------------------------- bad input
def assert_refused_before_anything(capsys, setup, tmp_path, url, message, secret):
    out = tmp_path / "out"
    code, errors = run_cli(capsys, *cv_args(setup, out, "--storage", url))
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: --storage ") and message in errors[0], errors
    assert secret not in errors[0]
    assert not out.exists()  # the experiment folder is made only after the storage was opened and checked


@pytest.mark.parametrize("url, message", [
    ("journal:{tmp}/queue.journal", "a journal file cannot hold a cv experiment's queue"),
    ("mysql://u:hidden-secret@127.0.0.1/x", "driver 'MySQLdb' is not installed"),  # no MySQL driver here
    ("postgresql://u:hidden-secret@127.0.0.1:{port}/x", "cannot open the storage"),  # nothing listens there
])
def test_an_unusable_storage_is_one_error_line_and_creates_nothing(setup, tmp_path, capsys, url, message):
    url = url.format(tmp=tmp_path, port=free_port())
    assert_refused_before_anything(capsys, setup, tmp_path, url, message, "hidden-secret")


@pytest.mark.parametrize("case", ["wrong password", "missing database"])
def test_a_refusing_postgres_server_is_one_error_line_and_creates_nothing(setup, postgres_server, tmp_path, capsys,
                                                                           case):
    if case == "wrong password":
        url, message = postgres_server.url("postgres", password="hidden-secret"), "password authentication failed"
    else:
        url, message = postgres_server.url("no_such_database"), 'database "no_such_database" does not exist'
    assert_refused_before_anything(capsys, setup, tmp_path, url, message, postgres_server.password)
    assert "hidden-secret" not in capsys.readouterr().err


def test_a_machine_with_another_experiment_is_refused_before_any_member(queue, setup, tmp_path, capsys):
    _, _, url = queue
    out = tmp_path / "other"
    code, errors = run_cli(capsys, *cv_args(setup, out, "--storage", url, "--study", "q", "--lr", 0.01))
    assert code == 2 and len(errors) == 1 and "study 'q' queues another cv experiment (its config differs)" in errors[0]
    assert not out.exists()


def test_collect_with_the_storage_names_the_members_not_done_yet(queue, setup, capsys):
    exp, study, url = queue
    enqueue_missing(study, MEMBERS)
    code, errors = run_cli(capsys, "cv", "--collect", exp.exp_dir, "--storage", url, "--study", "q")
    assert code == 2 and len(errors) == 1, errors
    assert "4 member(s) of study 'q' are not done yet: fold0_seed0 (waiting)" in errors[0]
    assert not exp.report_dir.exists()


@pytest.mark.parametrize("args, message", [
    (["--only", "0:0", "--storage", "sqlite:///{tmp}/q.db"], "--only cannot be combined with --storage"),
    (["--jobs", "2", "--storage", "sqlite:///{tmp}/q.db"], "--jobs cannot be combined with --storage"),
    (["--overwrite", "--storage", "sqlite:///{tmp}/q.db"], "--overwrite cannot be combined with --storage"),
    (["--study", "q"], "--study and --heartbeat go with --storage"),
    (["--heartbeat", "5"], "--study and --heartbeat go with --storage"),
])
def test_storage_flags_that_do_not_go_together_are_one_line(tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    code, errors = run_cli(capsys, "cv", "--output-dir", tmp_path, "--name", "exp", *args)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "exp").exists() and not (tmp_path / "q.db").exists()


def test_a_study_of_something_else_is_not_taken_for_a_queue(queue, setup, tmp_path, capsys):
    _, _, url = queue
    sweep = optuna.create_study(storage=url, study_name="a-sweep")
    sweep.set_user_attr("space_fingerprint", "0123")  # what a sweep's study holds
    out = tmp_path / "other"
    code, errors = run_cli(capsys, *cv_args(setup, out, "--storage", url, "--study", "a-sweep"))
    assert code == 2 and len(errors) == 1 and "study 'a-sweep' is not a cv experiment's queue" in errors[0], errors
    assert not out.exists()


def test_a_claim_another_machine_gave_up_meanwhile_does_not_stop_the_machine(queue, monkeypatch):
    exp, study, _ = queue
    given_up = []

    def slow_member(exp, member, threads=None, progress=None, setup=None):
        if not given_up:  # meanwhile another machine found its heartbeats late, failed it and queued it again
            (running,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            study._storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
            study.enqueue_trial(params={}, user_attrs={"member": member.name, "retry_of": running.number})
            given_up.append(member.name)
        return "trained"

    monkeypatch.setattr(member_queue, "run_member", slow_member)
    lines = []
    claim_members(exp, study, heartbeat=1, echo=lines.append)
    assert f"{given_up[0]}: another machine gave this claim up meanwhile (its heartbeats came late) and queued the " \
           "member again; what was trained here stays here" in lines
    assert {s.status for s in member_states(study.get_trials(deepcopy=False), MEMBERS).values()} == {"done"}
