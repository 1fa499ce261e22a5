"""`python cli.py runs`: one row per run directory made by real tiny trainings (finished, stopped early,
interrupted, failed, running), the Challenge scores of an evaluated run, config differences, JSON."""

import json
import shutil

import pytest

import cli
from conftest import CONSTANT_MODEL, tiny_config
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.use.evaluation import evaluate
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.training.run import train
from ignite_trainer.runs.lock import hold_run_lock, is_running
from ignite_trainer.runs.table import config_diff, read_run, read_runs


def stop_after_first_epoch(trainer, evaluator):
    """A research hook ending training early by hand: the run is not finished and can be resumed."""
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED(once=1), lambda e: e.terminate())


def crash_in_second_epoch(trainer, evaluator):
    """A fault in epoch 2. Training logs the error that stopped it to train.log as its last record."""

    def crash(engine):
        raise RuntimeError("disk on fire")

    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED(once=2), crash)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs_table")
    data = write_synthetic(base / "data", 12, 4)
    train(tiny_config(data, base, name="finished", epochs=2))
    train(tiny_config(data, base, name="early", epochs=6, early_stopping_patience=1, model=CONSTANT_MODEL))
    train(tiny_config(data, base, name="interrupted", epochs=3), setup=stop_after_first_epoch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(tiny_config(data, base, name="failed", epochs=3), setup=crash_in_second_epoch)
    (base / "runs" / "mlruns" / "0").mkdir(parents=True)  # a tracking store beside the runs is no run
    return base / "runs"


def test_each_run_gets_its_state_epochs_and_best(runs):
    rows = {r.name: r for r in read_runs(runs)}
    assert sorted(rows) == ["early", "failed", "finished", "interrupted"]
    assert {name: r.state for name, r in rows.items()} == {
        "early": "stopped early", "failed": "failed", "finished": "finished", "interrupted": "interrupted"}
    assert (rows["finished"].epochs_run, rows["finished"].max_epochs) == (2, 2)
    assert (rows["early"].epochs_run, rows["early"].max_epochs, rows["early"].best_epoch) == (2, 6, 1)
    assert rows["interrupted"].epochs_run == 1 and rows["failed"].epochs_run == 2
    assert rows["failed"].error == "stopped by an error at epoch 2: RuntimeError: disk on fire"
    assert rows["early"].model == CONSTANT_MODEL and rows["finished"].model == "attention_cnn"

    finished = rows["finished"]
    epochs = [json.loads(line) for line in (runs / "finished" / "metrics.jsonl").read_text().splitlines()]
    best = min(epochs, key=lambda r: (r["val_loss"], -r["epoch"]))  # ties go to the later epoch's file
    assert finished.monitor == "val_loss"
    assert (finished.best_epoch, finished.best_score) == (best["epoch"], best["val_loss"])
    assert finished.seconds == pytest.approx(sum(r["seconds"] + r["val_seconds"] for r in epochs), abs=1e-3)
    assert finished.challenge is None  # never evaluated


def test_a_run_training_now_is_running(runs):
    with hold_run_lock(runs / "interrupted"):
        assert is_running(runs / "interrupted") is True
        assert read_run(runs / "interrupted").state == "running"
    assert read_run(runs / "interrupted").state == "interrupted"


def test_evaluated_run_shows_its_challenge_scores(runs, tmp_path):
    copy = tmp_path / "evaluated"
    shutil.copytree(runs / "finished", copy)
    result = evaluate(copy)
    row = read_run(copy)
    assert row.challenge["murmur_weighted_accuracy"] == result["challenge"]["murmur_weighted_accuracy"]
    assert row.challenge["outcome_cost"] == result["challenge"]["outcome_cost"]
    assert row.challenge["split"] == "val"


def test_cli_table_and_json(runs, capsys):
    assert cli.main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "state", "model"]
    by_name = {line.split()[0]: line for line in out[1:5]}
    assert "stopped early" in by_name["early"] and "2/6" in by_name["early"]
    assert " failed " in by_name["failed"] and " interrupted " in by_name["interrupted"]
    assert "mlruns" not in by_name

    assert cli.main(["runs", str(runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    early = next(r for r in rows if r["name"] == "early")
    assert early["state"] == "stopped early" and early["challenge"] is None and early["config"]["epochs"] == 6


def test_diff_lists_the_config_fields_that_differ(runs, capsys):
    differences = {k: (a, b) for k, a, b in config_diff(runs / "finished", runs / "early")}
    assert differences == {"epochs": (2, 6), "early_stopping_patience": (0, 1),
                           "model": ("attention_cnn", CONSTANT_MODEL)}

    assert cli.main(["runs", str(runs), "--diff", "finished", "early"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "field"
    assert any(line.split() == ["epochs", "2", "6"] for line in lines)
    assert cli.main(["runs", str(runs), "--diff", "finished", "finished", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_bad_folder_or_run_is_one_error_line(runs, tmp_path, capsys):
    assert cli.main(["runs", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert cli.main(["runs", str(runs), "--diff", "finished", "mlruns"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mlruns: not a run directory" in err
