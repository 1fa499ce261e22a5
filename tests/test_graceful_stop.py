"""SIGINT/SIGTERM stop a run after the current iteration with a mid-epoch checkpoint that resumes exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

import cli
from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.training.graceful import GracefulStop, TrainingStopped
from ignite_trainer.training.run import train
from ignite_trainer.runs.rundir import read_metrics_log

from conftest import tiny_config
from test_bad_inputs import SMALL, fresh_log_stream, pristine  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _weights(run_dir, epoch):
    return load_checkpoint(Path(run_dir) / "checkpoints" / f"last_checkpoint_{epoch}.pt")["model_state_dict"]


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _signal_at(iteration, signum=signal.SIGTERM):
    """A setup hook sending ``signum`` to this process once ``iteration`` completes (what a scheduler does)."""
    def setup(trainer, evaluator):
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda _: os.kill(os.getpid(), signum))
    return setup


# 34 training recordings in batches of 4: 8 iterations per epoch, which a window of 3 does not divide.
# Iteration 10 is the 2nd of epoch 2; the stop waits for its accumulation window to close at iteration 11.
# Iteration 7 is in epoch 1's last window, which closes on the epoch's last iteration: the stop waits for
# the epoch's validation and checkpoint and stops after them.
ACCUMULATION = 3


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory):
    base = tmp_path_factory.mktemp("graceful_reference")
    return train(tiny_config(pristine, base, accumulation_steps=ACCUMULATION))["run_dir"]


@pytest.mark.parametrize("stop_workers, resume_workers, signalled, stopped, epoch",
                         [(0, 0, 10, 11, 2), (2, 0, 10, 11, 2), (0, 0, 7, 8, 1)], ids=["mid", "mid-workers", "epoch-end"])
def test_a_signal_stops_mid_epoch_and_resuming_equals_the_uninterrupted_run(pristine, reference, tmp_path, stop_workers,
                                                                            resume_workers, signalled, stopped, epoch):
    config = tiny_config(pristine, tmp_path, num_workers=stop_workers, accumulation_steps=ACCUMULATION)
    with pytest.raises(TrainingStopped) as info:
        train(config, setup=_signal_at(signalled))
    assert info.value.exit_code == 128 + signal.SIGTERM and "--resume" in info.value.message
    assert info.value.checkpoint == f"last_checkpoint_{epoch}.pt"
    run_dir = Path(tmp_path / "runs" / config.name)
    mid = load_checkpoint(run_dir / "checkpoints" / f"last_checkpoint_{epoch}.pt")
    assert mid["trainer"]["iteration"] == stopped and not mid["finished"]
    assert [r["epoch"] for r in read_metrics_log(run_dir / "metrics.jsonl")] == [1]  # epoch 1 was validated
    assert "stopped by SIGTERM" in (run_dir / "train.log").read_text()

    assert train(TrainConfig(), resume=run_dir, overrides={"num_workers": resume_workers})["finished"]
    _assert_equal(_weights(run_dir, 2), _weights(reference, 2))


def test_ctrl_c_from_the_command_line_exits_130_with_the_resume_command(pristine, tmp_path):
    args = ["train", "--data", str(pristine), "--epochs", "3", "--batch-size", "4", "--no-progress", "--device", "cpu",
            "--output-dir", str(tmp_path / "runs"), "--patience", "0", "--set", f"cache_dir={tmp_path / 'cache'}"]
    for item in SMALL:
        args += ["--set", item]
    run_dir = tmp_path / "runs" / "stopped"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args, "--name", "stopped", "--num-workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:  # no clock: a run that hangs fails by the suite's per-test limit, and its processes die here
        # A run that ends before its first checkpoint fails here at once, with its stderr.
        while not (run_dir / "checkpoints" / "last_checkpoint_1.pt").exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stderr.read()}"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole group, DataLoader workers too
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGINT; checkpoint last_checkpoint_")
    assert f"--resume {run_dir}" in err.strip().splitlines()[-1]
    log = (run_dir / "train.log").read_text()
    assert log.count("SIGINT received") == 1 and "stopped by SIGINT" in log  # the workers said nothing
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0  # weights: the tests above
    assert load_checkpoint(run_dir / "checkpoints" / "last_checkpoint_3.pt")["finished"]


def test_a_second_signal_aborts_at_once(monkeypatch, tmp_path, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    stop = GracefulStop(None, tmp_path)
    stop._handle(signal.SIGINT, None)
    assert exits == [] and stop.requested == signal.SIGINT
    stop._handle(signal.SIGINT, None)
    assert exits == [130]
    assert "second SIGINT: aborted at once" in capsys.readouterr().err
