"""Kill and resume: three SIGKILL trials of `benchmarks/kill_resume.py` in the suite, and the control showing
why checkpoints carry the RNG states (without them a resumed run is not the run that was never killed)."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from ignite_trainer.runs.checkpoint import RNGStates, load_checkpoint
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.training.run import train

import cli
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "benchmarks" / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kr = _load_benchmark()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill_resume")
    data = kr.make_data(base)
    out = base / "runs"
    # The never-killed run in-process (same flags through cli.main): one subprocess start saved.
    assert cli.main(kr.train_command(data, out, "reference", EPOCHS)[2:]) == 0
    return data, out, out / "reference"


@pytest.mark.parametrize("index, mode, inject", [(0, "random", False), (1, "write", False), (2, "random", True)])
def test_a_killed_run_resumes_to_the_never_killed_weights(bench, index, mode, inject):
    data, out, reference = bench
    rng = random.Random(index)
    for attempt in range(4):  # a draw that finishes before the kill or kills before epoch 1 is drawn again
        trial = kr.run_trial(index + 10 * attempt, mode, data, out, reference, EPOCHS, rng, inject)
        if trial.killed_at_epoch >= 1 and not trial.finished_unkilled:
            break
    else:
        pytest.fail("no kill landed between the first checkpoint and the end of training in 4 attempts")
    assert trial.polls > 0 and trial.unloadable_polls == 0, "a moment without a loadable checkpoint"
    assert trial.resume_rc == 0
    assert trial.resumed_from == trial.killed_at_epoch, "resume did not pick the newest complete checkpoint"
    assert trial.injected_truncated == inject
    assert trial.temp_left == []
    assert trial.metrics_ok and trial.tb_ok
    assert trial.weights_equal


# ------------------------------------------------------------------------------------------------- control
@pytest.fixture(scope="module")
def control_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("rng_control")
    return write_synthetic(base / "data", 12, 4), base


def _stop_after_epoch_2(trainer, evaluator):
    """Like a kill right after the epoch-2 checkpoint, but in-process (the checkpoint handler runs first)."""
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: engine.terminate())


def _weights(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoints" / f"last_checkpoint_{EPOCHS}.pt")["model_state_dict"]


def _interrupted_then_resumed(data, base, name):
    run_dir = Path(train(tiny_config(data, base, name=name, epochs=EPOCHS), setup=_stop_after_epoch_2)["run_dir"])
    assert not (run_dir / "checkpoints" / f"last_checkpoint_{EPOCHS}.pt").exists()
    train(TrainConfig(), resume=run_dir)
    return _weights(run_dir)


def test_without_the_rng_states_the_resumed_run_differs(control_data, monkeypatch):
    data, base = control_data
    full = _weights(train(tiny_config(data, base, name="full", epochs=EPOCHS))["run_dir"])
    with_rng = _interrupted_then_resumed(data, base, "with_rng")
    assert all(torch.equal(with_rng[k], full[k]) for k in full)

    monkeypatch.setattr(RNGStates, "load_state_dict", lambda self, state: None)
    without_rng = _interrupted_then_resumed(data, base, "without_rng")
    assert not all(torch.equal(without_rng[k], full[k]) for k in full)
