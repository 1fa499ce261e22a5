"""Numerical faults in real runs (tests/test_engine.py covers the update step alone): a NaN loss stops the CLI
with the iteration named and exit 3 and leaves a resumable checkpoint; a validation split without positives
warns instead of crashing; clipping bounds an exploding gradient end to end."""

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

import cli
from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.model.registry import build_model, register_model
from ignite_trainer.training.run import train

from conftest import tiny_config

#: Global training-forward count at which `nan_after_switch` starts returning NaN; None = never.
FAULT = {"at": None, "forwards": 0}


@register_model("nan_after_switch")
class NanAfterSwitch(torch.nn.Module):
    """The default model, whose logits become NaN from the ``FAULT["at"]``-th training forward on."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.inner = build_model("attention_cnn", n_mels=n_mels)

    def forward(self, x):
        logits, attention = self.inner(x)
        if self.training:
            FAULT["forwards"] += 1
            if FAULT["at"] is not None and FAULT["forwards"] >= FAULT["at"]:
                logits = logits * math.nan
        return logits, attention


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("numerical") / "data", 12, 4)


def cli_args(config):
    args = ["train", "--data", config.data, "--epochs", str(config.epochs), "--batch-size", str(config.batch_size),
            "--no-progress", "--device", "cpu", "--output-dir", config.output_dir, "--name", config.name,
            "--patience", "0", "--model", config.model]
    for key in ("cache_dir", "n_mels", "sample_rate", "hop_ms", "n_fft", "window_seconds", "val_fraction"):
        args += ["--set", f"{key}={getattr(config, key)}"]
    return args


def test_nan_loss_stops_the_cli_with_the_iteration_named_and_the_last_good_checkpoint_resumes(data, tmp_path, capsys):
    config = tiny_config(data, tmp_path, epochs=3, model="nan_after_switch")
    FAULT.update(at=11, forwards=0)  # 8 iterations per epoch: the 11th is epoch 2, iteration 11
    try:
        code = cli.main(cli_args(config))
    finally:
        FAULT["at"] = None
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss (nan) at epoch 2, iteration 11" in errors[0], err

    run_dir = tmp_path / "runs" / "r"
    saved = sorted((run_dir / "checkpoints").glob("*.pt"))
    assert [p.name for p in saved if p.name.startswith("last")] == ["last_checkpoint_1.pt"]
    for path in saved:
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model_state_dict"].values()), path

    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "resumed from" in (run_dir / "train.log").read_text()
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    final = load_checkpoint(run_dir / "checkpoints" / "last_checkpoint_3.pt")
    assert final["finished"] and all(torch.isfinite(v).all() for v in final["model_state_dict"].values())


def test_a_validation_split_without_positives_gives_null_metrics_and_a_warning(data, tmp_path, caplog):
    negative = Path(shutil.copytree(data, tmp_path / "negative"))
    for path in [negative / "training_data.csv", *(negative / "training_data").glob("*.txt")]:
        path.write_text(path.read_text().replace("Present", "Absent").replace("Unknown", "Absent"))
    with caplog.at_level(logging.INFO, logger="ignite_trainer"):
        summary = train(tiny_config(negative, tmp_path, epochs=2, monitor="murmur.recall"))
    # metrics.jsonl holds null (not 0.0) where a score does not exist: recall without any positive
    raw = (summary["run_dir"] / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"recall": null' in raw
    murmur, heart = summary["metrics"]["murmur"], summary["metrics"]["heart"]
    assert murmur["recall"] is None and murmur["at_threshold"]["recall"] is None and murmur["specificity"] > 0
    defined = [f for f in (heart["f1"], murmur["f1"]) if f is not None]
    assert summary["metrics"]["macro_f1"] == pytest.approx(sum(defined) / len(defined))  # defined labels only
    # monitoring an undefined score neither crashes nor saves: both epochs are skipped, and the summary says so
    assert summary["best"] is None and not list((summary["run_dir"] / "checkpoints").glob("best_*"))
    said = [r.getMessage() for r in caplog.records]
    assert sum("murmur.recall is undefined on this validation split" in m for m in said) == 2
    assert any("never defined" in m for m in said) and any("murmur.recall n/a" in m for m in said)
    warnings = [r.getMessage() for r in caplog.records if "no positive examples" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("murmur:"), warnings  # once per run, not per epoch


class _StepNorms(torch.optim.AdamW):
    """AdamW that records the norm of the gradients it is asked to apply (after any clipping)."""

    seen: list[float] = []

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        _StepNorms.seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return super().step(closure)


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_clipping_bounds_an_exploding_gradient_in_a_real_run(data, tmp_path, monkeypatch, clip):
    import ignite_trainer.training.run as run

    base_loss = run.WeightedBCELoss

    class Exploding(base_loss):
        def forward(self, *args, **kwargs):
            return 1e6 * super().forward(*args, **kwargs)

    monkeypatch.setattr(run, "WeightedBCELoss", Exploding)
    monkeypatch.setattr(torch.optim, "AdamW", _StepNorms)
    _StepNorms.seen = []
    logged = []

    def record(trainer, evaluator):
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(e.state.output["grad_norm"]))

    train(tiny_config(data, tmp_path, epochs=1, gradient_clip=clip), setup=record)
    assert len(_StepNorms.seen) == len(logged) == 8
    assert min(logged) > 1e3  # the logged norm is the pre-clip one
    if clip:
        assert max(_StepNorms.seen) <= clip * (1 + 1e-5)
    else:
        assert max(_StepNorms.seen) > 1e3
