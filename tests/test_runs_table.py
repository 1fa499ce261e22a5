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
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.runs.rundir import MetricsLog, RunDirectory, read_metrics_log
from ignite_trainer.runs.table import config_diff, read_run, read_runs


def read_config(run):
    return TrainConfig.from_yaml(RunDirectory(run).config_file)


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


# ---------------------------------------------------------------------------------------------- damaged runs
def _cut_last_line(path):
    """What a kill during an append leaves: the last record half written, without its line end."""
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    return [json.loads(line) for line in lines[:-1]]


def test_a_damaged_run_is_one_unreadable_row_and_the_others_are_listed(runs, tmp_path, capsys):
    folder = tmp_path / "runs"
    for name in ("finished", "utf16_config", "broken_yaml", "latin1_log"):
        shutil.copytree(runs / "finished", folder / name)
    (folder / "utf16_config" / "config.yaml").write_text("model: attention_cnn\n", encoding="utf-16")
    (folder / "broken_yaml" / "config.yaml").write_text("model: [attention_cnn\nepochs: 2\n")
    (folder / "latin1_log" / "metrics.jsonl").write_bytes('{"epoch": 1, "note": "café"}\n'.encode("latin-1"))

    rows = {r.name: r for r in read_runs(folder)}
    assert rows["finished"].state == "finished" and rows["finished"].note is None
    assert {name: r.state for name, r in rows.items() if name != "finished"} == dict.fromkeys(
        ("utf16_config", "broken_yaml", "latin1_log"), "unreadable")
    assert rows["utf16_config"].note == ("config.yaml: not UTF-8 text (byte 0xff at offset 0); "
                                         "save the config file as UTF-8")
    assert rows["broken_yaml"].note.startswith("config.yaml: line 2 not valid YAML")
    assert rows["latin1_log"].note.startswith("metrics.jsonl: not UTF-8 text (byte 0xe9 at offset 25)")
    assert rows["latin1_log"].model == "attention_cnn" and rows["latin1_log"].epochs_run is None  # config still read

    assert cli.main(["runs", str(folder)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    by_name = {line.split()[0]: line for line in captured.out.splitlines()[1:5]}
    assert sorted(by_name) == ["broken_yaml", "finished", "latin1_log", "utf16_config"]
    assert " unreadable " in by_name["utf16_config"] and "config.yaml: not UTF-8 text" in by_name["utf16_config"]
    assert " finished " in by_name["finished"] and "2/2" in by_name["finished"]

    assert cli.main(["runs", str(folder), "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["latin1_log"]["state"] == "unreadable" and "metrics.jsonl" in listed["latin1_log"]["note"]
    assert listed["finished"]["state"] == "finished" and listed["finished"]["note"] is None


def test_a_metrics_log_cut_by_a_kill_is_listed_from_its_whole_lines(runs, tmp_path, capsys):
    early, finished = tmp_path / "early", tmp_path / "finished"
    shutil.copytree(runs / "early", early)
    shutil.copytree(runs / "finished", finished)
    whole = _cut_last_line(early / "metrics.jsonl")
    _cut_last_line(finished / "metrics.jsonl")

    row = read_run(early)
    assert [r["epoch"] for r in whole] == [1]
    # the checkpoints still say it trained 2 of 6 epochs and stopped early; the best epoch's score is exact
    assert (row.state, row.epochs_run, row.max_epochs, row.best_epoch) == ("stopped early", 2, 6, 1)
    assert row.best_score == whole[0]["val_loss"]
    assert row.seconds == pytest.approx(whole[0]["seconds"] + whole[0]["val_seconds"], abs=1e-3)
    assert row.note == "metrics.jsonl: line 2 (the last) is cut short, as a kill during a write leaves it; " \
                       "1 whole epoch record(s) read"
    # a finished run whose last log line was cut is still finished, not stopped early
    assert (read_run(finished).state, read_run(finished).epochs_run) == ("finished", 2)

    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["early"]["note"].startswith("metrics.jsonl: line 2 (the last) is cut short")


def test_metrics_log_readers_skip_a_cut_last_line_and_name_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "val_loss": 0.5}\n{"epoch": 2, "val_lo')
    read = MetricsLog(path).read()
    assert [r["epoch"] for r in read.records] == [1] and read.cut_last and read.bad_lines == (2,)
    assert read_metrics_log(path) == [{"epoch": 1, "val_loss": 0.5}]  # the report, cv and sweeps read this

    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')  # damage inside the file: not what a kill leaves
    read = MetricsLog(path).read()
    assert [r["epoch"] for r in read.records] == [1, 3] and not read.cut_last
    assert read.damage == "1 of 3 line(s) are not epoch records (line 2); 2 whole epoch record(s) read"

    path.write_bytes(b'{"epoch": 1}\n\xff\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: not UTF-8 text \(byte 0xff at offset 13\)"):
        read_metrics_log(path)


def test_resume_after_a_kill_mid_line_drops_the_cut_line_and_trains_on(runs, tmp_path):
    run = tmp_path / "interrupted"
    shutil.copytree(runs / "interrupted", run)
    log = run / "metrics.jsonl"
    log.write_text(log.read_text() + '{"epoch": 2, "train_loss": 0.6')  # killed while epoch 2's line was written
    train(read_config(run), resume=run)
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert read_run(run).state == "finished" and read_run(run).note is None
