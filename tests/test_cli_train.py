"""`cli.py train` end to end on tiny synthetic data: the run directory, resume rules, and refusals."""

import json

import pytest
import torch
from ignite.engine import Events

import cli
from ignite_trainer.runs.checkpoint import find_resume_checkpoint
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.training.run import train

# Small features (8 mels at 1 kHz) keep each run to a few seconds; the math is the default's.
TINY = ["--set", "n_mels=8", "--set", "sample_rate=1000", "--set", "hop_ms=20", "--set", "n_fft=64",
        "--batch-size", "4", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_train")


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_with_no_data_argument_uses_the_embedded_synthetic_set(workdir, capsys):
    args = ["train", "--epochs", "2", "--output-dir", str(workdir / "runs"), "--name", "embedded",
            "--set", f"cache_dir={workdir / 'cache'}", "--set", "synthetic_patients=10", *TINY]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run_dir = workdir / "runs" / "embedded"
    assert (workdir / "cache" / "synthetic" / "circor2022-p10-s2022" / "training_data.csv").exists()
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "checkpoints", "metrics.jsonl", "tb", "train.log"}
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("train_loss", "val_loss", "lr", "seconds"):
        assert isinstance(lines[-1][key], float)
    assert set(lines[-1]["heart"]) == {"accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "threshold",
                                      "at_threshold"}

    # The closing summary describes the best checkpoint, with its recording F1 at the tuned thresholds.
    best = next(r for r in lines if r["epoch"] == int(err.split("best checkpoint: epoch ")[1].split(",")[0]))
    heart_f1 = best["heart"]["at_threshold"]["f1"]
    assert f"{heart_f1:.3f}" in err.split("  heart")[-1].splitlines()[0]

    # The resolved config is enough to re-run: it loads and equals what ran.
    saved = TrainConfig.from_yaml(run_dir / "config.yaml")
    assert saved.epochs == 2 and saved.n_mels == 8 and saved.name == "embedded"

    for path in (run_dir / "checkpoints").glob("*.pt"):
        ckpt = torch.load(path, weights_only=True)  # plain torch.load: the checkpoint format promises it
        assert {"epoch", "model_state_dict", "optimizer_state_dict", "val_loss"} <= set(ckpt)
        assert {"trainer", "rng", "lr_scheduler", "early_stopping", "config", "thresholds"} <= set(ckpt)
        if path.name.startswith("last_"):  # the resume point also carries both checkpoint handlers' bookkeeping
            assert {"best_checkpointer", "checkpointer"} <= set(ckpt)


def test_resuming_a_finished_run_says_so_and_trains_nothing(workdir, capsys):
    run_dir = workdir / "runs" / "embedded"
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    code, out, err = run_cli(["train", "--resume", str(run_dir)], capsys)
    assert code == 0, err
    assert "already finished at epoch 2" in out
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before


def test_resume_with_a_conflicting_config_is_refused(workdir, capsys):
    run_dir = workdir / "runs" / "embedded"
    code, out, err = run_cli(["train", "--resume", str(run_dir), "--lr", "0.5"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "resume refused" in err and "learning_rate: checkpoint has 0.001, now 0.5" in err


def test_an_existing_run_is_never_replaced_without_overwrite(workdir, capsys):
    run_dir = workdir / "runs" / "embedded"
    before = (run_dir / "metrics.jsonl").read_bytes()
    args = ["train", "--epochs", "1", "--output-dir", str(workdir / "runs"), "--name", "embedded",
            "--set", f"cache_dir={workdir / 'cache'}", "--set", "synthetic_patients=10", *TINY]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "run directory already exists" in err and "--overwrite" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == before


class StopAfterEpoch(Exception):
    """Stands in for a kill right after an epoch's checkpoint was written."""


def stop_after_second_epoch(trainer, evaluator):
    @trainer.on(Events.EPOCH_COMPLETED(once=2))
    def stop(_):
        raise StopAfterEpoch()


def test_resume_ends_with_the_weights_of_a_run_never_stopped(workdir):
    data = workdir / "cache" / "synthetic" / "circor2022-p10-s2022"
    base = dict(data=str(data), epochs=4, batch_size=4, n_mels=8, sample_rate=1000, hop_ms=20.0, n_fft=64,
                progress=False, device="cpu", output_dir=str(workdir / "runs"), cache_dir=str(workdir / "cache"))
    train(TrainConfig(name="straight", **base))
    with pytest.raises(StopAfterEpoch):
        train(TrainConfig(name="stopped", **base), setup=stop_after_second_epoch)
    assert find_resume_checkpoint(workdir / "runs" / "stopped")[1]["epoch"] == 2

    summary = train(TrainConfig(), resume=workdir / "runs" / "stopped")
    assert summary["finished"] and not summary["already_finished"]

    straight = find_resume_checkpoint(workdir / "runs" / "straight")[1]
    resumed = find_resume_checkpoint(workdir / "runs" / "stopped")[1]
    assert straight["epoch"] == resumed["epoch"] == 4
    for key, value in straight["model_state_dict"].items():
        assert torch.equal(value, resumed["model_state_dict"][key]), key

    def numbers(run):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                for line in (workdir / "runs" / run / "metrics.jsonl").read_text().splitlines()]

    assert numbers("stopped") == numbers("straight")  # epochs 1-4 once each, same values
