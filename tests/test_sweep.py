"""Sweeps on tiny data: trials are run directories scored from their own metrics, the budget holds across
worker processes, pruned and failed trials are recorded as such, a killed worker's trial is resumed on
restart, the same seed gives the same sweep, best.yaml trains the best trial again, and bad input is one
``error:`` line before any trial runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cli import main
from conftest import read_csv, tiny_config
from ignite_trainer.runs.checkpoint import find_resume_checkpoint
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.runs.rundir import read_metrics_log
from ignite_trainer.experiments import storage as storage_module
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.experiments.storage import open_storage, open_study, storage_url
from ignite_trainer.experiments.sweeps import make_objective, sweep
from ignite_trainer.experiments.workers import SurplusTrial, counted_trials
from ignite_trainer.experiments.space import SWEEP_OWNED_FIELDS, load_space, parse_space

LR = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_synthetic(root / "data", 12, 4)
    return root


def base_config(base: Path, **changes) -> dict:
    values = tiny_config(base / "data", base, **changes).to_dict()
    return {k: v for k, v in values.items() if k not in SWEEP_OWNED_FIELDS}


def make_space(base: Path, params=None, pruner=None, metric="val_loss", seed=0, **changes) -> dict:
    return {"params": params or {"learning_rate": LR}, "objective": {"metric": metric},
            "sampler": {"name": "tpe", "seed": seed}, "pruner": pruner or {"name": "none"},
            "base": base_config(base, **changes)}


def trials_of(sweep_dir: Path, storage: str | None = None) -> list:
    study = optuna.load_study(study_name=sweep_dir.name, storage=open_storage(storage_url(storage, sweep_dir)))
    return study.get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def four(base):
    """A 4-trial sweep through the command line; its summary.json."""
    space_file = base / "four.yaml"
    space_file.write_text(yaml.safe_dump(make_space(base)))
    sweep_dir = base / "four"
    assert main(["sweep", str(space_file), "--trials", "4", "--dir", str(sweep_dir)]) == 0
    return sweep_dir, json.loads((sweep_dir / "report" / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- a sweep
def test_four_trial_sweep_runs_scores_and_reports_every_trial(four):
    sweep_dir, summary = four
    trials = trials_of(sweep_dir)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    for t in trials:
        run_dir = sweep_dir / "trials" / f"trial_{t.number:04d}"
        assert Path(t.user_attrs["run_dir"]) == run_dir
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["learning_rate"] == t.params["learning_rate"] and config["monitor"] == "val_loss"
        losses = [r["val_loss"] for r in read_metrics_log(run_dir / "metrics.jsonl")]
        assert len(losses) == 2 and t.value == min(losses)
    assert len({t.params["learning_rate"] for t in trials}) == 4

    rows = read_csv(sweep_dir / "report" / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert {r["state"] for r in rows} == {"complete"} and all(r["epochs"] == "2" for r in rows)
    assert [float(r["score"]) for r in rows] == [t.value for t in trials]
    best = min(trials, key=lambda t: t.value)
    saved = summary
    assert saved["best"]["number"] == best.number and saved["study"] == "four"
    assert saved["best"]["run_dir"] == str(sweep_dir / "trials" / f"trial_{best.number:04d}")
    assert saved["states"]["complete"] == 4
    assert (sweep_dir / "report" / "history.png").stat().st_size > 0
    assert (sweep_dir / "report" / "importance.png").stat().st_size > 0
    assert set(saved["importances"]) == {"learning_rate"}


def test_a_finished_sweep_started_again_runs_nothing_more(four):
    sweep_dir, _ = four
    mtimes = {p: p.stat().st_mtime_ns for p in (sweep_dir / "trials").glob("*/metrics.jsonl")}
    summary = sweep(parse_space(make_space(sweep_dir.parent)), sweep_dir, 4)
    assert summary["trials"] == 4
    assert {p: p.stat().st_mtime_ns for p in (sweep_dir / "trials").glob("*/metrics.jsonl")} == mtimes


def test_same_seed_and_empty_storage_give_the_same_trials_and_scores(four, base):
    first = trials_of(four[0])[:2]
    again_dir = base / "again"
    sweep(parse_space(make_space(base)), again_dir, 2)
    again = trials_of(again_dir)
    assert [t.params for t in again] == [t.params for t in first]
    assert [t.value for t in again] == [t.value for t in first]


def test_best_yaml_trains_the_best_trial_again_to_the_same_score(four, capsys):
    sweep_dir, summary = four
    best_yaml = sweep_dir / "report" / "best.yaml"
    assert main(["train", "--config", str(best_yaml)]) == 0
    rerun = sweep_dir / "best" / f"trial_{summary['best']['number']:04d}"
    losses = [r["val_loss"] for r in read_metrics_log(rerun / "metrics.jsonl")]
    assert min(losses) == summary["best"]["score"]


# ---------------------------------------------------------------------------------------------- workers
def test_two_workers_finish_exactly_n_trials_without_repeating_a_parameter_set(base):
    sweep_dir, storage = base / "workers", None  # the default SQLite file; the killed-worker test uses a journal
    summary = sweep(parse_space(make_space(base)), sweep_dir, 3, storage=storage, workers=2)
    trials = trials_of(sweep_dir, storage)
    counted = counted_trials(trials)
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)
    assert all(t.state == TrialState.FAIL and t.user_attrs.get("surplus") for t in trials if t not in counted)
    assert len({t.params["learning_rate"] for t in counted}) == 3
    pids = {t.user_attrs["worker"]["pid"] for t in counted}  # usually both; one may start late on a busy machine
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    assert sorted(p.name for p in (sweep_dir / "trials").iterdir()) == sorted(
        f"trial_{t.number:04d}" for t in counted)
    assert summary["counted"] == 3


def test_a_trial_claimed_after_the_budget_is_full_stops_before_training(base):
    space = parse_space(make_space(base))
    study = optuna.create_study(direction="minimize")
    for value in (0.5, 0.6):
        study.add_trial(optuna.trial.create_trial(value=value))
    trial = study.ask()
    with pytest.raises(SurplusTrial):
        make_objective(space, base / "surplus", n_trials=2)(trial)
    assert trial.user_attrs["surplus"] is True and not (base / "surplus").exists()


KILL_AFTER_FIRST_EPOCH = """
import os, signal, sys
sys.path.insert(0, "tests")
from ignite.engine import Events
from ignite_trainer.experiments import sweeps as sweep_module, trials as trial_module
from ignite_trainer.experiments.space import load_space

run = trial_module.TRIAL_RUNNERS["run"]

def dying_run(config, metric, direction, *, setup, **kw):
    def setup_and_die(trainer, evaluator):
        setup(trainer, evaluator)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: os.kill(os.getpid(), signal.SIGKILL))
    return run(config, metric, direction, setup=setup_and_die, **kw)

trial_module.TRIAL_RUNNERS["run"] = dying_run
# SPACE SWEEP_DIR STORAGE [TRIALS STUDY HEARTBEAT]
trials, study, heartbeat = (int(sys.argv[4]), sys.argv[5], int(sys.argv[6])) if len(sys.argv) > 4 else (1, None, 30)
sweep_module.sweep(load_space(sys.argv[1]), sys.argv[2], trials, storage=sys.argv[3], study_name=study,
                   heartbeat=heartbeat)
"""


def test_a_killed_workers_trial_is_resumed_from_its_checkpoint_on_restart(base, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(make_space(base)))
    sweep_dir = base / "killed"
    storage = f"journal:{base / 'killed.journal'}"  # no heartbeat: the worker's pid tells it is dead
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, str(space_file), str(sweep_dir), storage],
                          env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (dead,) = trials_of(sweep_dir, storage)
    assert dead.state == TrialState.RUNNING
    run_dir = sweep_dir / "trials" / "trial_0000"
    assert find_resume_checkpoint(run_dir)[1]["epoch"] == 1

    summary = sweep(load_space(space_file), sweep_dir, 1, storage=storage)
    dead, retry = trials_of(sweep_dir, storage)
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0 and retry.user_attrs["resumed"]
    assert retry.params == dead.params and Path(retry.user_attrs["run_dir"]) == run_dir
    assert [r["epoch"] for r in read_metrics_log(run_dir / "metrics.jsonl")] == [1, 2]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert summary["counted"] == 1 and summary["states"]["fail"] == 1  # the dead trial is replaced, not counted
    assert summary["best"]["number"] == 1
    rows = read_csv(sweep_dir / "report" / "trials.csv")
    assert rows[0]["state"] == "fail" and rows[0]["reason"].endswith("died; retried as trial 1")
    assert rows[1]["retry_of"] == "0" and rows[1]["run_dir"] == str(run_dir)


# ---------------------------------------------------------------------------------------------- pruned, failed
def test_a_pruned_trial_stops_at_once_keeps_its_checkpoint_and_is_marked_pruned(base):
    sweep_dir = base / "pruned"
    space = make_space(base, pruner={"name": "median", "n_startup_trials": 1}, epochs=3)
    sweep(parse_space(space), sweep_dir, 2)
    first, second = trials_of(sweep_dir)
    assert first.state == TrialState.COMPLETE and second.state == TrialState.PRUNED
    pruned_at = max(second.intermediate_values)
    assert pruned_at < 3 and second.user_attrs["epochs"] == pruned_at
    run_dir = sweep_dir / "trials" / "trial_0001"
    path, ckpt = find_resume_checkpoint(run_dir)
    assert ckpt["epoch"] == pruned_at and not ckpt["finished"]  # the pruned epoch is saved and resumable
    assert len(read_metrics_log(run_dir / "metrics.jsonl")) == pruned_at
    rows = read_csv(sweep_dir / "report" / "trials.csv")
    assert rows[1]["state"] == "pruned" and float(rows[1]["score"]) == second.user_attrs["score"]


def test_a_trial_that_fails_on_its_own_is_recorded_with_its_reason_and_the_sweep_goes_on(base):
    sweep_dir = base / "nan"
    space = make_space(base, params={"learning_rate": {"type": "categorical", "choices": [1e-3, 1e30]}},
                       gradient_clip=0.0)
    summary = sweep(parse_space(space), sweep_dir, 3)
    trials = trials_of(sweep_dir)
    assert len(trials) == 3
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["learning_rate"] == 1e30 for t in failed)
    assert all(t.user_attrs["fail_reason"].startswith("non-finite loss") for t in failed)
    assert any(t.state == TrialState.COMPLETE for t in trials)
    rows = read_csv(sweep_dir / "report" / "trials.csv")
    assert [r["reason"].startswith("non-finite") for r in rows] == [t.state == TrialState.FAIL for t in trials]
    assert summary["states"]["fail"] == len(failed)


# ---------------------------------------------------------------------------------------------- bad input
def _bad(space: dict, key: str, value) -> dict:
    space = json.loads(json.dumps(space))
    target = space
    *path, last = key.split(".")
    for part in path:
        target = target.setdefault(part, {})
    target[last] = value
    return space


@pytest.mark.parametrize("key,value,message", [
    ("params.no_such_field", LR, "params.no_such_field: unknown config field 'no_such_field'"),
    ("params.learning_rate", {"type": "float", "low": 0.0, "high": 0.1}, "learning_rate=0.0 is out of range"),
    ("params.window_seconds", {"type": "float", "low": 2.0, "high": 61.0}, "window_seconds=61.0 is out of range"),
    ("params.scheduler", {"type": "categorical", "choices": ["none", "step"]}, "scheduler='step' is not one of"),
    ("params.epochs", {"type": "int", "low": 3, "high": 1}, "params.epochs: low=3 must be below high=1"),
    ("params.name", {"type": "categorical", "choices": ["a", "b"]}, "params.name: 'name' is set by the sweep"),
    ("objective.metric", "auroc", "objective: metric='auroc' is not a score a run reports"),
    ("objective.direction", "maximize", "objective: direction=maximize contradicts val_loss"),
    ("sampler.name", "grid", "sampler: name='grid' is not one of"),
    ("pruner.name", "hyperband", "pruner: name='hyperband' is not one of"),
    ("base.epochs", 0, "base: epochs=0 is out of range"),
])
def test_a_bad_space_is_one_error_line_before_any_trial(base, tmp_path, capsys, key, value, message):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(_bad(make_space(base), key, value)))
    sweep_dir = tmp_path / "sw"
    assert main(["sweep", str(space_file), "--trials", "2", "--dir", str(sweep_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not sweep_dir.exists()


@pytest.mark.parametrize("storage,message", [
    ("postgresql://user:secret@127.0.0.1:1/nodb", "cannot open the storage"),
    ("sqlite:///{tmp}/a_file/study.db", "cannot"),
    ("journal:{tmp}/no/such/folder/study.journal", "does not exist"),
])
def test_an_unusable_storage_is_one_error_line_before_any_trial(base, tmp_path, capsys, storage, message):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(make_space(base)))
    (tmp_path / "a_file").write_text("")
    sweep_dir = tmp_path / "sw"
    code = main(["sweep", str(space_file), "--trials", "2", "--dir", str(sweep_dir),
                 "--storage", storage.format(tmp=tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --storage ") and message in err[0], err
    assert "secret" not in err[0]
    assert not sweep_dir.exists()  # the storage is checked before the sweep directory is created


@pytest.mark.parametrize("flag,value,message", [("--trials", "0", "--trials=0 must be"),
                                               ("--workers", "0", "--workers=0 must be")])
def test_a_bad_count_is_one_error_line(base, tmp_path, capsys, flag, value, message):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(make_space(base)))
    args = ["sweep", str(space_file), "--trials", "2", "--dir", str(tmp_path / "sw"), flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_joining_a_study_with_another_space_or_foreign_trials_is_refused(base, tmp_path, capsys):
    url = storage_url(None, tmp_path)
    open_study(parse_space(make_space(base)), open_storage(url), "s", url)
    other = parse_space(make_space(base, params={"weight_decay": {"type": "float", "low": 0.0, "high": 0.1}}))
    with pytest.raises(ConfigError, match="study 's' was created from a different space"):
        open_study(other, open_storage(url), "s", url)

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(make_space(base)))
    stray = tmp_path / "fresh" / "trials" / "trial_0000"
    stray.mkdir(parents=True)
    (stray / "config.yaml").write_text("epochs: 1\n")
    assert main(["sweep", str(space_file), "--trials", "1", "--dir", str(tmp_path / "fresh")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds trials that study 'fresh' does not know" in err[0], err
    assert (stray / "config.yaml").read_text() == "epochs: 1\n"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_heartbeat_stopped_is_failed_and_retried(base, monkeypatch):
    monkeypatch.setattr(storage_module, "GRACE_HEARTBEATS", 1)
    space = parse_space(make_space(base))
    sweep_dir = base / "heartbeat"
    sweep_dir.mkdir()
    url = storage_url(None, sweep_dir)
    storage = open_storage(url, heartbeat=1)
    study = open_study(space, storage, "heartbeat", url)
    silent = study.ask()  # a worker on another host (no pid to check) that stopped sending heartbeats
    silent.set_user_attr("worker", {"host": "another-host", "pid": 1, "started": None})
    storage.record_heartbeat(silent._trial_id)
    time.sleep(2.5)
    summary = sweep(space, sweep_dir, 1, heartbeat=1)
    dead, retry = trials_of(sweep_dir)
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["retry_of"] == 0 and "heartbeats" in retry.user_attrs["retry_reason"]
    assert summary["counted"] == 1
