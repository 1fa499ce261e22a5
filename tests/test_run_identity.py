"""A resume continues the run it names and nothing else; the run directory records its split and environment."""

import json
import shutil

import pytest
import torch

from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.use.evaluation import evaluate

from conftest import circor_subset
from test_bad_inputs import expect_error, fresh_log_stream  # noqa: F401


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the shared run whose newest last checkpoint is marked unfinished, so that it resumes."""
    run = shutil.copytree(trained_run.run_dir, tmp_path / "run")
    last = run / "checkpoints" / "last_checkpoint_2.pt"
    ckpt = load_checkpoint(last)
    ckpt["finished"] = False
    torch.save(ckpt, last)
    return run


def _plant(run, changes):
    """A foreign ``last_checkpoint_5.pt``: the run's own checkpoint with ``changes`` applied."""
    ckpt = load_checkpoint(run / "checkpoints" / "last_checkpoint_2.pt")
    for key, value in changes.items():
        if isinstance(value, dict):
            ckpt[key] = {**ckpt[key], **value}
        else:
            ckpt[key] = value
    path = run / "checkpoints" / "last_checkpoint_5.pt"
    torch.save(ckpt, path)
    return path


def test_every_checkpoint_holds_the_run_identity(trained_run):
    for path in (trained_run.run_dir / "checkpoints").glob("*.pt"):
        identity = load_checkpoint(path)["run_identity"]
        assert set(identity) >= {"config", "data", "recordings", "patients"}


def test_a_checkpoint_of_another_model_is_refused_naming_the_file(run_copy, tmp_path, capsys):
    foreign = _plant(run_copy, {"config": {"model": "mean_pool_cnn"}})
    expect_error(capsys, ["train", "--resume", str(run_copy)], str(foreign), "model", "config.yaml", root=tmp_path)


def test_a_checkpoint_of_other_data_is_refused_naming_the_file(run_copy, tmp_path, capsys):
    foreign = _plant(run_copy, {"run_identity": {"data": "0" * 24, "recordings": 99}})
    expect_error(capsys, ["train", "--resume", str(run_copy)], str(foreign), "other data", "99 recordings",
                 root=tmp_path)


def test_resume_with_other_data_is_refused(run_copy, trained_run, tmp_path, capsys):
    other = circor_subset(trained_run.data, tmp_path / "other", 9)
    expect_error(capsys, ["train", "--resume", str(run_copy), "--data", str(other)], "other data", str(other),
                 root=tmp_path)


def test_a_checkpoint_with_a_damaged_thread_count_is_refused_naming_the_file(run_copy, tmp_path, capsys):
    foreign = _plant(run_copy, {"torch_threads": "many"})
    expect_error(capsys, ["train", "--resume", str(run_copy)], str(foreign), "torch_threads", root=tmp_path)


def test_a_hand_edited_config_yaml_is_refused_on_resume(run_copy, tmp_path, capsys):
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("learning_rate: 0.001", "learning_rate: 0.01"))
    expect_error(capsys, ["train", "--resume", str(run_copy)], "learning_rate", "config.yaml", root=tmp_path)


def test_the_split_and_environment_are_recorded(trained_run):
    split = json.loads((trained_run.run_dir / "split.json").read_text())
    assert split["train"] and split["val"] and not set(split["train"]) & set(split["val"])
    sessions = json.loads((trained_run.run_dir / "environment.json").read_text())["sessions"]
    assert len(sessions) == 1 and sessions[0]["outcome"] == "finished"
    assert sessions[0]["ended"] >= sessions[0]["started"]
    assert sessions[0]["device"] == "cpu"
    assert sessions[0]["torch_threads"] == torch.get_num_threads()  # the suite's one thread (conftest)
    assert torch.__version__.startswith(sessions[0]["packages"]["torch"].split("+")[0])
    assert {"command", "host", "git_commit"} <= set(sessions[0])


def test_evaluate_scores_the_saved_validation_patients_and_reports_new_ones(trained_run, tmp_path):
    """A patient in neither side of split.json (here: taken out of it, as if added to the folder after
    training) is reported as new and never scored as validation."""
    run = shutil.copytree(trained_run.run_dir, tmp_path / "run")
    split = json.loads((run / "split.json").read_text())
    newcomer = split["val"].pop(0)
    (run / "split.json").write_text(json.dumps(split))
    result = evaluate(run, out_dir=tmp_path / "report", figures=False)
    assert result["new_patients"] == [newcomer]
    assert result["counts"]["patient"] == len(split["val"])
    assert any(newcomer in w for w in result["warnings"])
