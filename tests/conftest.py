"""Shared fixtures: a tiny model and batches with the project's batch layout ``(x, y, mask, index)``, and one
tiny trained run (`trained_run`) that evaluation, prediction, export and CLI tests share.

The suite runs torch on one thread: these models are tiny, and two OpenMP threads on a 2-core machine busy
with anything else spin against each other (measured: one evaluation 0.4 s with one thread, 18 s with two).

No test bounds its work by the clock: a hang fails by the suite's per-test limit (``timeout`` in setup.cfg),
which also ends the child of a `subprocess.run` it interrupts.
"""

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ignite_trainer.runs.checkpoint import find_best_checkpoint, load_checkpoint
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.model.registry import register_model
from ignite_trainer.scoring.predictions import LevelPredictions
from ignite_trainer.training.run import train

torch.set_num_threads(1)


class TinyModel(torch.nn.Module):
    """Mean over time, then a linear layer: ``(logits [B, 2], attention [B, T])`` like the real models."""

    def __init__(self, n_mels: int = 4):
        super().__init__()
        self.linear = torch.nn.Linear(n_mels, 2)

    def forward(self, x):
        attention = torch.full(x.shape[:1] + x.shape[2:], 1.0 / x.shape[-1])
        return self.linear(x.mean(dim=-1)), attention


#: A registered model whose output never changes: tests that need an early stop (patience 1 ends after epoch 2).
CONSTANT_MODEL = "constant_for_tests"


@register_model(CONSTANT_MODEL)
class ConstantModel(torch.nn.Module):
    """Always p = 0.5: the validation loss never improves, so patience 1 stops training after epoch 2."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = x.new_zeros(x.shape[0], 2) + 0.0 * self.unused  # a gradient of zero: nothing ever changes
        return logits, x.new_full((x.shape[0], x.shape[-1]), 1.0 / x.shape[-1])


def make_batches(n_batches=4, batch_size=8, n_mels=4, frames=6, seed=0, mask_prob=0.0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        x = torch.randn(batch_size, n_mels, frames, generator=g)
        y = (torch.rand(batch_size, 2, generator=g) > 0.5).float()
        mask = (torch.rand(batch_size, 2, generator=g) >= mask_prob).float()
        batches.append((x, y, mask, torch.arange(i * batch_size, (i + 1) * batch_size)))
    return batches


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyModel()


@pytest.fixture
def batches():
    return make_batches()


# ---------------------------------------------------------------------------------------------- shared run
@dataclass(frozen=True)
class TrainedRun:
    data: Path
    run_dir: Path
    checkpoint: Path
    config: TrainConfig
    thresholds: dict
    base: Path


def tiny_config(data: Path, base: Path, **changes) -> TrainConfig:
    """Small features (8 mels, 50 frames/s at 1 kHz) keep a whole train + evaluate cycle to seconds."""
    values = dict(data=str(data), epochs=2, batch_size=4, progress=False, cache_dir=str(base / "cache"),
                  output_dir=str(base / "runs"), name="r", n_mels=8, sample_rate=1000, hop_ms=20.0, n_fft=64,
                  window_seconds=4.0, val_fraction=0.34, device="cpu", early_stopping_patience=0)
    values.update(changes)
    return TrainConfig(**values)


#: One trained run per session, shared by every module that imports `trained_run` (a module global survives
#: the second, imported copy of the session fixture that pytest registers per module).
_RUNS: dict[str, TrainedRun] = {}


def _train_once(base: Path) -> TrainedRun:
    # Seed 4's first 12 synthetic patients hold Present, Unknown and Absent murmurs and both outcomes.
    data = write_synthetic(base / "data", 12, 4)
    config = tiny_config(data, base)
    run_dir = Path(train(config)["run_dir"])
    path = find_best_checkpoint(run_dir)
    ckpt = load_checkpoint(path)
    assert set(ckpt["thresholds"]) == {"heart", "murmur"}, "training must store tuned thresholds in the best checkpoint"
    return TrainedRun(data, run_dir, path, config, dict(ckpt["thresholds"]), base)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    if "run" not in _RUNS:
        _RUNS["run"] = _train_once(tmp_path_factory.mktemp("trained"))
    return _RUNS["run"]


@pytest.fixture(scope="session")
def trained_2016_run(tmp_path_factory) -> TrainedRun:
    """A tiny run on PhysioNet 2016 data (heart labels only): its murmur output was never trained."""
    if "2016" not in _RUNS:
        base = tmp_path_factory.mktemp("trained2016")
        data = write_synthetic(base / "data", 12, 4, fmt="physionet2016", progress=False)
        config = tiny_config(data, base, format="physionet2016", name="p2016")
        run_dir = Path(train(config)["run_dir"])
        path = find_best_checkpoint(run_dir)
        _RUNS["2016"] = TrainedRun(data, run_dir, path, config, dict(load_checkpoint(path)["thresholds"]), base)
    return _RUNS["2016"]


def circor_subset(src: Path, dst: Path, n_patients: int, strip_labels: bool = False) -> Path:
    """Copy the first ``n_patients`` of a CirCor folder; ``strip_labels`` removes every label (a hidden test set)."""
    out = dst / "training_data"
    out.mkdir(parents=True)
    for txt in sorted((src / "training_data").glob("*.txt"))[:n_patients]:
        lines = txt.read_text().splitlines()
        if strip_labels:
            lines = [ln for ln in lines if not ln.startswith(("#Murmur", "#Outcome"))]
        (out / txt.name).write_text("\n".join(lines) + "\n")
        for line in lines[1:]:
            if not line.startswith("#"):
                for name in line.split()[1:]:
                    shutil.copy(src / "training_data" / name, out / name)
    return dst


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_id(recordings) -> dict:
    """Recordings keyed by their id."""
    return {r.recording_id: r for r in recordings}


def level_predictions(probs, targets, mask=None, classes=None, level="patient", id_prefix="p") -> LevelPredictions:
    """A `LevelPredictions` from plain lists: items ``<id_prefix><i>`` of patients ``p<i>``, one window each."""
    probs, targets = np.asarray(probs, float), np.asarray(targets, float)
    n = len(probs)
    return LevelPredictions(level, [f"{id_prefix}{i}" for i in range(n)], probs, targets,
                            np.ones((n, 2), bool) if mask is None else np.asarray(mask, bool),
                            [f"p{i}" for i in range(n)], classes or [None] * n, np.ones(n, dtype=np.int64))


# ---------------------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server (`pg_server.ThrowawayPostgres`) for the whole session, started by the first
    test that asks for it and stopped (its folder removed) at the end, also when tests failed; the test skips
    with the reason where no server can run here."""
    from pg_server import ThrowawayPostgres, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(f"no PostgreSQL for this test: {reason}")
    server = ThrowawayPostgres().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A plain ``postgresql://`` URL to a new, empty database of its own for this test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    return postgres_server.create_database(name)
