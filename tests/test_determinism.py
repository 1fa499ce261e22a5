"""Determinism on CPU: the same config and seed give the same numbers and weights, so a changed result always
means a changed input or code, never luck (and kill/resume equality is meaningful)."""

import json
from pathlib import Path

import torch

from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.training.run import train

from conftest import tiny_config

TIMING = {"seconds", "val_seconds"}


def _run(data, base, name, seed):
    run_dir = Path(train(tiny_config(data, base, name=name, epochs=2, seed=seed))["run_dir"])
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, load_checkpoint(run_dir / "checkpoints" / "last_checkpoint_2.pt")["model_state_dict"]


def test_two_runs_with_the_same_seed_give_the_same_numbers_and_weights(tmp_path):
    data = write_synthetic(tmp_path / "data", 12, 4)
    rows_a, weights_a = _run(data, tmp_path, "a", seed=3)
    rows_b, weights_b = _run(data, tmp_path, "b", seed=3)
    assert [r["epoch"] for r in rows_a] == [1, 2] and rows_a == rows_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    rows_c, weights_c = _run(data, tmp_path, "c", seed=4)  # control: the comparison can tell runs apart
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
