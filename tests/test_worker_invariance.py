"""A whole training run gives the same numbers and weights with 0 or 2 DataLoader workers: crops and order
come from (seed, epoch, index), never from a worker's generator."""

import json
from pathlib import Path

import torch
from ignite.engine import Events

from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.training.run import train

from conftest import tiny_config

TIMING = {"seconds", "val_seconds"}


def _run(data, base, name, **changes):
    run_dir = Path(train(tiny_config(data, base, name=name, epochs=2, seed=3, **changes))["run_dir"])
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, load_checkpoint(run_dir / "checkpoints" / "last_checkpoint_2.pt")["model_state_dict"]


def _stop_after_epoch_1(trainer, evaluator):
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())


def test_zero_and_two_workers_give_the_same_run_and_a_resume_with_workers_is_exact(tmp_path):
    data = write_synthetic(tmp_path / "data", 12, 4)
    rows_0, weights_0 = _run(data, tmp_path, "w0", num_workers=0)
    rows_2, weights_2 = _run(data, tmp_path, "w2", num_workers=2)
    assert [r["epoch"] for r in rows_0] == [1, 2] and rows_0 == rows_2
    assert all(torch.equal(weights_0[k], weights_2[k]) for k in weights_0)

    interrupted = Path(train(tiny_config(data, tmp_path, name="cut", epochs=2, seed=3, num_workers=2),
                             setup=_stop_after_epoch_1)["run_dir"])
    assert not (interrupted / "checkpoints" / "last_checkpoint_2.pt").exists()
    train(TrainConfig(), resume=interrupted)
    resumed = load_checkpoint(interrupted / "checkpoints" / "last_checkpoint_2.pt")["model_state_dict"]
    assert all(torch.equal(resumed[k], weights_0[k]) for k in weights_0)
