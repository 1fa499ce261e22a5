"""The precision, speed, model and augmentation settings reach a run started by `train` / ``cli.py train``:
each new config field is checked, an augmented run is the same for any worker count and after a resume,
evaluation never sees augmentation, and fusion, the new models and a float16 cache train end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events

import cli
from ignite_trainer.training import run as run_module
from ignite_trainer.training.augment import Augmenter
from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.core.config import TrainConfig, config_conflicts
from ignite_trainer.data.loaders import epoch_order
from ignite_trainer.data.prepare import prepare_data
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.training.engine import StepEvents, create_evaluator, create_trainer
from ignite_trainer.core.errors import ConfigError, TrainingAborted
from ignite_trainer.model.fusion import DemographicsFusion
from ignite_trainer.training.handlers import attach_nan_guard
from ignite_trainer.training.losses import WeightedBCELoss
from ignite_trainer.training.metrics import MaskedLoss
from ignite_trainer.use.model_files import load_trained_model
from ignite_trainer.model.registry import build_model
from ignite_trainer.training.run import train

from conftest import TinyModel, make_batches, tiny_config

TIMING = {"seconds", "val_seconds"}
#: Every transform on, each for half the samples.
AUGMENT = {f"augment_{name}_prob": 0.5 for name in ("gain", "noise", "shift", "stretch", "time_mask", "freq_mask",
                                                      "mixup")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("wiring") / "data", 12, 4)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value", [
    ("feature_dtype", "float64"), ("amp_dtype", "fp8"), ("sync_every", 0), ("resident_features", "yes"),
    ("compile", 1), ("eval_batch_size", 0), ("demographics", "true"), ("synthetic_difficulty", "extreme"),
    ("augment_gain_prob", 1.5), ("augment_gain_low_db", 9.0), ("augment_noise_prob", -0.1),
    ("augment_noise_snr_low_db", 40.0), ("augment_noise_beta_low", 3.0), ("augment_shift_prob", 2),
    ("augment_shift_max_fraction", 1.5), ("augment_shift_mode", "reflect"), ("augment_stretch_prob", "half"),
    ("augment_stretch_max", 0.6), ("augment_time_mask_prob", 1.1), ("augment_time_masks", -1),
    ("augment_time_mask_width", 2.5), ("augment_freq_mask_prob", 7), ("augment_freq_masks", -2),
    ("augment_freq_mask_width", -1), ("augment_mixup_prob", 1.01), ("augment_mixup_alpha", 0),
    ("augment_log_power_scale", -3.0),
])
def test_each_new_field_is_checked_and_the_error_names_it(field, value) -> None:
    with pytest.raises(ConfigError) as caught:
        TrainConfig().updated({field: value}, source="config.yaml")
    message = str(caught.value)
    assert message.startswith(f"config.yaml: {field}=") and "\n" not in message


def test_new_fields_default_to_the_old_behaviour_and_only_speed_settings_may_change_on_resume() -> None:
    config = TrainConfig()
    assert not Augmenter(run_module.AugmentSettings.from_config(config), seed=0).enabled
    assert (config.feature_dtype, config.amp_dtype, config.demographics, config.compile) == \
        ("float32", "bfloat16", False, False)
    saved = config.to_dict()
    speed = config.updated({"sync_every": 5, "resident_features": True, "compile": True, "eval_batch_size": 64})
    assert config_conflicts(saved, speed) == []
    for field, value in [("feature_dtype", "float16"), ("amp_dtype", "float16"), ("demographics", True),
                         ("synthetic_difficulty", "hard"), ("augment_noise_prob", 0.5)]:
        assert [c.split(":")[0] for c in config_conflicts(saved, config.updated({field: value}))] == [field]


def test_a_bad_field_on_the_command_line_is_one_error_line_and_nothing_is_written(tmp_path, capsys) -> None:
    code = cli.main(["train", "--output-dir", str(tmp_path / "runs"), "--set", "augment_mixup_alpha=-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "augment_mixup_alpha" in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- augmentation
class SpyAugmenter(Augmenter):
    """Records every batch it augments, and fails if it is ever called while the evaluator runs."""

    calls: list[tuple[int, list[int]]] = []
    evaluating = [False]

    def __call__(self, x, y, mask, index, epoch):
        assert not self.evaluating[0], "augmentation reached the evaluator"
        self.calls.append((epoch, [int(i) for i in index]))
        return super().__call__(x, y, mask, index, epoch)


def _watch_evaluator(trainer, evaluator) -> None:
    evaluator.add_event_handler(Events.STARTED, lambda _: SpyAugmenter.evaluating.__setitem__(0, True))
    evaluator.add_event_handler(Events.COMPLETED, lambda _: SpyAugmenter.evaluating.__setitem__(0, False))


def _stop_after_epoch_1(trainer, evaluator) -> None:
    _watch_evaluator(trainer, evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())


def _augmented(data, base, name, setup=_watch_evaluator, **changes):
    config = tiny_config(data, base, name=name, epochs=2, seed=3, **AUGMENT, **changes)
    run_dir = Path(train(config, setup=setup)["run_dir"])
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, run_dir, rows


def test_an_augmented_run_is_the_same_for_any_worker_count_and_after_a_resume(data, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(run_module, "Augmenter", SpyAugmenter)
    SpyAugmenter.calls.clear()
    config, run_0, rows_0 = _augmented(data, tmp_path, "w0", num_workers=0)
    calls = list(SpyAugmenter.calls)
    _, run_2, rows_2 = _augmented(data, tmp_path, "w2", num_workers=2)
    assert [r["epoch"] for r in rows_0] == [1, 2] and rows_0 == rows_2
    last_0 = load_checkpoint(run_0 / "checkpoints" / "last_checkpoint_2.pt")["model_state_dict"]
    last_2 = load_checkpoint(run_2 / "checkpoints" / "last_checkpoint_2.pt")["model_state_dict"]
    assert all(torch.equal(last_0[k], last_2[k]) for k in last_0)

    # The index the augmenter draws with is the recording's: batch j of epoch e is positions [jB, (j+1)B)
    # of that epoch's order.
    n_train, batch = len(prepare_data(config).train), config.batch_size
    steps = n_train // batch
    assert len(calls) == 2 * steps
    for k, (epoch, indices) in enumerate(calls):
        j = k % steps
        assert epoch == k // steps + 1
        assert indices == epoch_order(n_train, config.seed, epoch - 1)[j * batch:(j + 1) * batch]

    _, cut, _ = _augmented(data, tmp_path, "cut", setup=_stop_after_epoch_1, num_workers=0)
    assert not (cut / "checkpoints" / "last_checkpoint_2.pt").exists()
    train(TrainConfig(), resume=cut, setup=_watch_evaluator)
    resumed = load_checkpoint(cut / "checkpoints" / "last_checkpoint_2.pt")["model_state_dict"]
    assert all(torch.equal(resumed[k], last_0[k]) for k in last_0)

    # Validation saw the plain windows: a plain evaluator over the saved weights gives the logged loss.
    model = build_model(config.model, n_mels=config.n_mels)
    model.load_state_dict(last_0)
    _, _, _, val_loader = run_module._loaders(config, prepare_data(config), torch.device("cpu"))
    loss_fn = WeightedBCELoss(*config.pos_weight)
    state = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn)}, "cpu").run(val_loader)
    assert state.metrics["val_loss"] == pytest.approx(rows_0[-1]["val_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- models, data
def test_demographics_fusion_trains_and_its_model_reloads(data, tmp_path) -> None:
    config = tiny_config(data, tmp_path, name="demo", epochs=1, demographics=True, resident_features=True,
                         eval_batch_size=5)
    summary = train(config)
    assert math.isfinite(summary["metrics"]["val_loss"])
    trained = load_trained_model(summary["run_dir"])
    assert isinstance(trained.model, DemographicsFusion)


def test_demographics_on_physionet2016_is_refused_with_one_line(tmp_path, capsys) -> None:
    data = write_synthetic(tmp_path / "p2016", 6, 1, fmt="physionet2016", progress=False)
    code = cli.main(["train", "--data", str(data), "--format", "physionet2016", "--demographics", "--no-progress",
                     "--output-dir", str(tmp_path / "runs"), "--set", f"cache_dir={tmp_path / 'cache'}",
                     "--set", "n_mels=8", "--set", "sample_rate=1000", "--set", "hop_ms=20", "--set", "n_fft=64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "demographics" in err and "physionet2016" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("model", ["strided_attention_cnn", "resnet_attention"])
def test_each_new_model_trains_from_the_config(data, tmp_path, model) -> None:
    summary = train(tiny_config(data, tmp_path, name=model, epochs=1, model=model))
    assert math.isfinite(summary["metrics"]["val_loss"])
    assert load_trained_model(summary["run_dir"]).config.model == model


def test_a_float16_cache_trains(data, tmp_path) -> None:
    summary = train(tiny_config(data, tmp_path, name="half", epochs=1, feature_dtype="float16", sync_every=3))
    assert math.isfinite(summary["metrics"]["val_loss"])
    files = list((tmp_path / "cache" / "features").rglob("*.npy"))
    assert files and all(np.load(f, mmap_mode="r").dtype == np.float16 for f in files)


def test_synth_command_difficulty_and_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "hard"
    assert cli.main(["synth", str(out), "--patients", "4", "--difficulty", "hard", "--no-progress"]) == 0
    assert "hard" in capsys.readouterr().out
    assert cli.main(["synth", str(out), "--patients", "4", "--no-progress"]) == 2  # not empty: refused
    assert capsys.readouterr().err.startswith("error: ")
    assert cli.main(["synth", str(out), "--patients", "4", "--overwrite", "--no-progress"]) == 0


# ---------------------------------------------------------------------------------------------- NaN guard
def _poisoned(bad_call: int):
    calls = []

    def loss(logits, y, mask=None):
        calls.append(1)
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        return value * math.nan if len(calls) == bad_call else value

    return loss


@pytest.mark.parametrize("on_device", [False, True])
def test_the_guard_names_the_first_bad_iteration_when_stats_are_read_late(on_device) -> None:
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    trainer = create_trainer(model, optimizer, _poisoned(3), check_on_device=on_device, sync_every=5)
    reads = []
    trainer.add_event_handler(StepEvents.STATS_READ, lambda e: reads.append(e.state.iteration))
    attach_nan_guard(trainer)
    with pytest.raises(TrainingAborted, match=r"non-finite loss \(nan\) at epoch 1, iteration 3;"):
        trainer.run(make_batches(n_batches=8), max_epochs=1)
    # The host check knows at once; the device check learns it at the next scheduled read.
    assert reads == ([3] if not on_device else [5])
