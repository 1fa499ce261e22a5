"""What a researcher sees, through real tiny `cli.py train` runs: one line per epoch on the console and in
train.log, the early stop in our words, the summary of the best checkpoint, the split line, no progress-bar
fragments in a file, messages that never split a bar, the per-epoch TensorBoard and MLflow store read back,
the re-run recipe, and the CLI's own errors as one ``error:`` line."""

import json
import re
import struct
import sys

import pytest

import cli
from conftest import CONSTANT_MODEL, tiny_config
from ignite_trainer.training.console import best_summary, split_fingerprint, summary_lines
from ignite_trainer.data.discovery import detect_format, discover_recordings
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.runs.logs import progress_bar_wanted, setup_logging

EPOCH_LINE = re.compile(r"^epoch +(\d+)/(\d+)  train_loss \d+\.\d{4}  val_loss \d+\.\d{4}  macro_f1 (\d\.\d{3}|n/a)  "
                        r"(murmur\.f1 (\d\.\d{4}|n/a)  )?tuned_f1 (\d\.\d{3}|n/a)  lr \d\.\d\de[-+]\d\d  "
                        r"\d+\.\ds\+\d+\.\ds(  \* best \S+)?$")


def tiny_args(base, data, name, *extra):
    c = tiny_config(data, base)
    return ["train", "--data", str(data), "--output-dir", str(base / "runs"), "--name", name,
            "--cache-dir", str(base / "cache"), "--batch-size", "4", "--device", "cpu",
            "--set", f"n_mels={c.n_mels}", "--set", f"sample_rate={c.sample_rate}", "--set", f"hop_ms={c.hop_ms}",
            "--set", f"n_fft={c.n_fft}", "--set", f"val_fraction={c.val_fraction}", *extra]


@pytest.fixture(scope="module")
def early_run(tmp_path_factory):
    """One CLI run that stops early (constant model, patience 1), tracked in MLflow; its captured stderr."""
    pytest.importorskip("mlflow")
    base = tmp_path_factory.mktemp("console")
    data = write_synthetic(base / "data", 12, 4)
    capture = pytest.MonkeyPatch()
    import io

    err = io.StringIO()
    capture.setattr(sys, "stderr", err)  # not a terminal: no progress bar by default
    try:
        code = cli.main(tiny_args(base, data, "early", "--epochs", "5", "--patience", "1", "--model",
                                  CONSTANT_MODEL, "--tracker", "mlflow"))
    finally:
        capture.undo()
    return base, data, code, err.getvalue()


def test_each_epoch_is_one_line_on_the_console_and_in_train_log(early_run):
    base, _, code, err = early_run
    assert code == 0, err
    assert "\r" not in err  # stderr is a file here: no progress-bar fragments
    console = [line for line in err.splitlines() if line.startswith("epoch ")]
    logged = [line.split(" INFO ", 1)[1] for line in (base / "runs" / "early" / "train.log").read_text().splitlines()
              if " INFO epoch " in line]
    assert console == logged and len(console) == 2
    for n, line in enumerate(console, start=1):
        m = EPOCH_LINE.match(line)
        assert m, line
        assert (int(m.group(1)), int(m.group(2))) == (n, 5)
    assert console[0].endswith("* best val_loss") and "* best" not in console[1]


def test_early_stop_is_said_in_our_words_after_its_epoch_line(early_run):
    base, _, _, err = early_run
    log = (base / "runs" / "early" / "train.log").read_text()
    said = "early stopping at epoch 2: val_loss has not improved for 1 epochs"
    assert said in err and said in log
    assert "EarlyStopping" not in err and "Stop training" not in err
    lines = err.splitlines()
    assert lines.index(said) == next(i for i, line in enumerate(lines) if line.startswith("epoch 2/5")) + 1


def test_the_summary_describes_the_best_checkpoint_not_the_last_epoch(early_run):
    base, _, _, err = early_run
    run_dir = base / "runs" / "early"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "best checkpoint: epoch 1, val_loss" in err and "(training ended at epoch 2, stopped early)" in err
    assert "best_checkpoint_1_" in err and "tuned thresholds: heart" in err
    assert "`evaluate` scores patients" in err  # says why evaluate's F1 differs
    heart = records[0]["heart"]["at_threshold"]
    row = next(line for line in err.splitlines() if line.startswith("  heart"))
    assert row.split()[1:] == [("n/a" if heart[k] is None else f"{heart[k]:.3f}")
                               for k in ("accuracy", "precision", "recall", "specificity", "f1")]


def test_the_split_is_printed_with_its_fingerprint(early_run):
    base, data, _, err = early_run
    from ignite_trainer.core.config import TrainConfig
    from ignite_trainer.data.prepare import prepare_data

    config = TrainConfig.from_yaml(base / "runs" / "early" / "config.yaml")
    prepared = prepare_data(config)
    train_ids = {r.patient_id for r in prepared.train}
    val_ids = {r.patient_id for r in prepared.val}
    expected = (f"split: {len(train_ids)} train / {len(val_ids)} validation patients, "
                f"fingerprint {split_fingerprint(train_ids, val_ids)}")
    assert expected in err and expected in (base / "runs" / "early" / "train.log").read_text()
    assert split_fingerprint(train_ids, val_ids) != split_fingerprint(val_ids, train_ids)


def _epoch_scalars(log_dir):
    from tensorboardX.proto import event_pb2

    out = {}
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append(event.step)
    return out


def test_training_writes_the_epoch_tensorboard_and_the_mlflow_run(early_run):
    base, _, _, _ = early_run
    run_dir = base / "runs" / "early"
    epoch_tags = _epoch_scalars(run_dir / "tb" / "epoch")
    assert epoch_tags["val/val_loss"] == [1, 2] and epoch_tags["epoch/best_epoch"] == [1, 2]
    assert not any(tag.startswith("val/") for tag in _epoch_scalars(run_dir / "tb"))  # iterations: train only

    from mlflow.tracking import MlflowClient

    client = MlflowClient((base / "runs" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("ignite_trainer").experiment_id])
    assert run.data.params["model"] == CONSTANT_MODEL and run.data.tags["state"] == "stopped early"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val val_loss")] == [1, 2]
    assert any(a.path == "checkpoints" for a in client.list_artifacts(run.info.run_id))


def test_the_runs_table_reads_the_cli_run(early_run, capsys):
    base, _, _, _ = early_run
    assert cli.main(["runs", str(base / "runs"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["name"], row["state"], row["best_epoch"]) == ("early", "stopped early", 1)


def test_re_running_a_runs_config_gets_a_new_run_and_stores_resolved_values(early_run, capsys):
    base, _, _, _ = early_run
    config_file = base / "runs" / "early" / "config.yaml"
    assert cli.main(["train", "--config", str(config_file), "--epochs", "1", "--tracker", "none",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    new_dir = next(p for p in (base / "runs").iterdir() if p.name not in ("early", "mlruns"))
    assert f"run directory: {new_dir}" in out
    import yaml

    resolved = yaml.safe_load((new_dir / "resolved.yaml").read_text())
    assert resolved["device"] == "cpu" and resolved["cache_dir"] == str((base / "cache").resolve())
    assert yaml.safe_load((new_dir / "config.yaml").read_text())["name"] is None  # requested: a fresh name
    assert cli.main(["train", "--config", str(config_file), "--name", "early", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------------------------------------- bar and messages
def test_a_message_while_the_bar_is_drawn_gets_its_own_line(tmp_path, capsys):
    from tqdm.auto import tqdm

    setup_logging(tmp_path / "train.log")
    import logging

    bar = tqdm(total=10, file=sys.stderr, desc="Epoch [1/2]", mininterval=0)
    bar.update(5)
    logging.getLogger("ignite_trainer").warning("murmur: no positive examples among 8 evaluated")
    bar.update(5)
    bar.close()
    err = capsys.readouterr().err
    segments = re.split(r"[\r\n]", err)
    assert "murmur: no positive examples among 8 evaluated" in segments  # whole, not spliced into the bar
    assert "murmur: no positive examples among 8 evaluated" in (tmp_path / "train.log").read_text()


def test_progress_bar_by_default_only_on_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_bar_wanted(None) is True and progress_bar_wanted(False) is False
    monkeypatch.undo()
    assert progress_bar_wanted(None) is False  # pytest's capture is no terminal
    assert progress_bar_wanted(True) is True


def test_summary_without_a_best_checkpoint_or_defined_scores_says_so():
    assert "never defined" in summary_lines(None)[0]
    best = {"epoch": 3, "monitor": "murmur.f1", "score": None, "file": "f.pt", "thresholds": {"heart": 0.4},
            "labels": {"heart": {"accuracy": 0.5, "precision": None, "recall": None, "specificity": 0.5, "f1": None}}}
    text = "\n".join(summary_lines(best, last_epoch=4))
    assert "murmur.f1 n/a" in text and "heart          0.500         n/a" in text and "murmur" not in text.split("f.pt")[1]


def test_best_summary_of_an_empty_folder_is_none(tmp_path):
    assert best_summary(tmp_path, "val_loss") is None


def test_filling_the_feature_cache_shows_counts_on_a_terminal_only(early_run, tmp_path, capsys):
    from ignite_trainer.core.config import TrainConfig
    from ignite_trainer.data.features import FeatureCache, FeatureSettings
    from ignite_trainer.data.readers import read_recordings

    base, data, _, _ = early_run
    recordings = read_recordings(data, "circor2022")[:3]
    settings = FeatureSettings.from_config(TrainConfig.from_yaml(base / "runs" / "early" / "config.yaml"))
    FeatureCache(tmp_path / "quiet", settings).prepare(recordings)  # stderr is no terminal: nothing drawn
    assert capsys.readouterr().err == ""
    FeatureCache(tmp_path / "shown", settings).prepare(recordings, progress=True)
    err = capsys.readouterr().err
    assert "feature cache" in err and "0/3 [" in err  # counts of the total, then the rate and time left
    FeatureCache(tmp_path / "shown", settings).prepare(recordings, progress=True)  # warm: nothing to say
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- CLI
def test_click_usage_errors_are_one_error_line_with_exit_2(capsys):
    for args in (["train", "--epochs", "many"], ["train", "--no-such-flag"], ["evaluate"], ["nonsense"]):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Usage" not in err, (args, err)


def test_version_and_help_texts(capsys):
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"ignite_trainer \d+\.\d+\.\d+\n", capsys.readouterr().out)
    assert cli.main(["predict", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "predict [OPTIONS] MODEL PATH..." in text and "MODEL is a run directory, checkpoint or export" in text
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--monitor", "--window-seconds", "--n-folds", "--fold", "--cache-dir", "--tracker"):
        assert flag in text


def test_train_flags_reach_the_config_and_bad_values_are_one_line(tmp_path, capsys):
    assert cli.main(["train", "--monitor", "heart.nothing", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "monitor" in err and err.count("\n") == 1
    assert cli.main(["train", "--n-folds", "3", "--fold", "3", "--output-dir", str(tmp_path)]) == 2
    assert "fold=3 must be below n_folds=3" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_wav_folder_with_a_readme_is_not_a_circor_layout(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    (tmp_path / "README.txt").write_text("Recordings from the clinic, 2024.\nSee notes.\n")
    assert detect_format(tmp_path) is None
    assert sorted(r.recording_id for r in discover_recordings([tmp_path])) == ["a", "b"]
    (tmp_path / "9001.txt").write_text("9001 1 4000\nAV 9001_AV.hea 9001_AV.wav\n")
    assert detect_format(tmp_path) == "circor2022"


def _sleep_until_told(started, event):
    started.set()
    event.wait(30)


def test_a_forked_worker_alive_after_training_does_not_keep_the_run_locked(tmp_path):
    import multiprocessing

    from ignite_trainer.runs.lock import hold_run_lock, is_running

    context = multiprocessing.get_context("fork")
    started, done = context.Event(), context.Event()
    with hold_run_lock(tmp_path):
        worker = context.Process(target=_sleep_until_told, args=(started, done))  # like a DataLoader worker
        worker.start()
        assert started.wait(30) and is_running(tmp_path)
    try:
        assert worker.is_alive() and is_running(tmp_path) is False
    finally:
        done.set()
        worker.join()


def test_evaluate_prints_na_and_no_row_for_a_label_present_nowhere(tmp_path, capsys):
    import numpy as np

    from ignite_trainer.use.evaluation import level_scores
    from ignite_trainer.scoring.predictions import LevelPredictions
    from ignite_trainer.use.writers import write_json

    # PhysioNet 2016: murmur masked everywhere; every heart label positive, so specificity does not exist
    level = LevelPredictions(level="patient", ids=["a", "b"], probs=np.array([[0.9, 0.5], [0.2, 0.5]]),
                             targets=np.array([[1.0, 0.0], [1.0, 0.0]]), mask=np.array([[True, False], [True, False]]),
                             patient_ids=["a", "b"], murmur_classes=[None, None], n_windows=np.array([1, 1]))
    scores = level_scores(level, {"heart": 0.5, "murmur": 0.5})
    write_json(tmp_path / "m.json", {"patient": scores})
    raw = (tmp_path / "m.json").read_text()
    assert '"specificity": null' in raw and '"auroc": null' in raw and "murmur" not in raw
    result = {"data": "d", "split": "all", "counts": {"patient": 2, "recording": 2, "window": 2},
              "thresholds": {"heart": 0.5, "murmur": 0.5}, "thresholds_tuned": False,
              "levels": {"patient": scores}, "files": {"report": "r.md"},
              "challenge": {"heart_macc": None, "murmur_weighted_accuracy": None, "outcome_cost": 1.0}}
    cli.print_evaluation(result)
    out = capsys.readouterr().out
    assert "\nheart" in out and "\nmurmur" not in out
    heart = next(line for line in out.splitlines() if line.startswith("heart")).split()
    assert heart[4] == "n/a" and heart[6] == "n/a"  # specificity and AUROC
    assert "2016 MAcc (heart, recordings): n/a" in out
