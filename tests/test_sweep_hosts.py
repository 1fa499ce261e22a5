"""Sweep workers on different machines sharing one database: PostgreSQL (a real throw-away server) and SQLite.

Each worker presents itself as its own machine (`workers.WORKER_HOST_ENV`), with its own sweep directory, so
no worker can look another's process up: only Optuna's heartbeat tells that one died. Two workers started
at the same moment (racing to create the storage's tables and the study) finish exactly the budget, no
trial twice; a worker killed in the middle of a trial has that trial failed by the survivor once its
heartbeat is missed, and run again there. A journal file has no heartbeat, and a worker says so rather than
wait for ever. A storage that cannot be used is one ``error:`` line, without the password, before anything
is created.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cli import main
from pg_server import free_port
from ignite_trainer.experiments.storage import open_storage
from ignite_trainer.experiments.sweeps import sweep
from ignite_trainer.experiments.space import parse_space
from ignite_trainer.experiments.workers import WORKER_HOST_ENV, counted_trials
from test_sweep import KILL_AFTER_FIRST_EPOCH, base, make_space  # noqa: F401  (base is a fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(machine: str) -> dict[str, str]:
    return {**os.environ, WORKER_HOST_ENV: machine, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(tmp_path, request) -> str:
    """The database both machines share: an SQLite file, or a database of the throw-away PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


def test_two_machines_finish_the_budget_once_and_the_survivor_takes_over_a_killed_workers_trial(base, tmp_path,
                                                                                               shared_url):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(make_space(base, epochs=2)))
    n = 3
    # machine-a dies (SIGKILL, its heartbeat thread with it) after the first epoch of its first trial
    dying = subprocess.Popen([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, str(space_file), str(tmp_path / "a"),
                              shared_url, str(n), "hosts", "1"], cwd=REPO, env=_env("machine-a"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    survivor = subprocess.Popen([sys.executable, "cli.py", "sweep", str(space_file), "--trials", str(n), "--dir",
                                 str(tmp_path / "b"), "--storage", shared_url, "--study", "hosts", "--heartbeat", "1"],
                                cwd=REPO, env=_env("machine-b"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        _, dying_err = dying.communicate(timeout=240)
        out, err = survivor.communicate(timeout=240)
    finally:
        for p in (dying, survivor):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert survivor.returncode == 0, err[-3000:]

    assert dying.returncode == -signal.SIGKILL, dying_err[-2000:]  # it died inside its first trial

    trials = optuna.load_study(study_name="hosts", storage=open_storage(shared_url)).get_trials(deepcopy=False)
    hosts = {t.number: t.user_attrs["worker"]["host"] for t in trials if "worker" in t.user_attrs}
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert hosts[dead.number] == "machine-a"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert retry.state == TrialState.COMPLETE and hosts[retry.number] == "machine-b"
    assert "heartbeats" in retry.user_attrs["retry_reason"] and retry.params == dead.params
    assert Path(retry.user_attrs["run_dir"]).parent == tmp_path / "b" / "trials"  # in its own sweep directory
    counted = counted_trials(trials)
    assert len(counted) == n and all(t.state == TrialState.COMPLETE for t in counted)
    assert len({tuple(sorted(t.params.items())) for t in counted}) == n  # no parameter set twice
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert f"study hosts: {n + 1} trials ({n} complete, 1 fail)" in out

def test_a_journal_worker_says_it_cannot_tell_whether_another_machines_trial_is_alive(base, tmp_path, caplog):
    space = parse_space(make_space(base))
    url = f"journal:{tmp_path / 'study.journal'}"
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="j")
    elsewhere = study.ask()
    elsewhere.set_user_attr("worker", {"host": "elsewhere", "machine": "elsewhere", "pid": 1, "started": None})
    with caplog.at_level("WARNING", logger="ignite_trainer"):
        summary = sweep(space, tmp_path / "sw", 1, storage=url, study_name="j")
    assert summary["states"]["running"] == 1
    assert "journal storage cannot tell whether their workers are alive" in caplog.text


def test_an_unusable_postgresql_storage_is_one_line_without_the_password(base, tmp_path, capsys, postgres_server):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(make_space(base)))
    closed = free_port()
    cases = [(postgres_server.url("postgres", password="wrong-secret"), "password authentication failed"),
             (postgres_server.url("no_such_database"), 'database "no_such_database" does not exist'),
             (postgres_server.url("postgres", port=closed), "Connection refused"),
             ("mysql://user:wrong-secret@127.0.0.1/db", "driver 'MySQLdb' is not installed")]
    for url, message in cases:
        sweep_dir = tmp_path / "sw"
        code = main(["sweep", str(space_file), "--trials", "1", "--dir", str(sweep_dir), "--storage", url])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: --storage ") and message in err[0], err
        assert "wrong-secret" not in err[0] and postgres_server.password not in err[0]
        assert not sweep_dir.exists()


def test_a_trial_another_worker_failed_meanwhile_is_said_in_one_line_and_the_worker_goes_on(base, tmp_path, caplog,
                                                                                            monkeypatch):
    from ignite_trainer.experiments import trials as trial_module
    from ignite_trainer.experiments.workers import requeue

    url = f"sqlite:///{tmp_path / 'late.db'}"

    def late_heartbeat(config, metric, direction, **_):
        """While this trial trains, another worker takes its heartbeat for dead: fails and queues it again."""
        study = optuna.load_study(study_name="late", storage=open_storage(url))
        (mine,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if "retry_of" not in mine.user_attrs:
            study.tell(mine.number, state=TrialState.FAIL)
            requeue(study, mine, "its worker stopped sending heartbeats")
        run_dir = Path(config.output_dir) / config.name
        run_dir.mkdir(parents=True, exist_ok=True)
        return trial_module.TrialResult(run_dir, 0.5, 1)

    monkeypatch.setitem(trial_module.TRIAL_RUNNERS, "run", late_heartbeat)
    with caplog.at_level("WARNING", logger="ignite_trainer"):
        summary = sweep(parse_space(make_space(base)), tmp_path / "sw", 2, storage=url, study_name="late")
    assert "another worker failed it meanwhile" in caplog.text
    assert summary["counted"] == 2 and summary["states"]["complete"] == 2 and summary["states"]["fail"] == 2
