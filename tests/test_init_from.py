"""Fine-tuning from pretrained weights: ``--init-from`` (a run directory, a .pt, a .safetensors, a published
CNN14 .pth), ``--freeze-trunk``, ``--trunk-lr-scale``, ``--warmup-epochs``, the run identity of the init file,
and every bad init input as one ``error:`` line with nothing written.

Every run is a tiny one (`conftest.tiny_config`); CNN14 is trained at ``width=4`` under a test name with its own
small front-end (the published width, about 80 M parameters, is only built on the meta device).
"""

import functools
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

import cli
import ignite_trainer.training.run as run_module
from conftest import CONSTANT_MODEL, tiny_config
from test_bad_inputs import fresh_log_stream  # noqa: F401  (autouse: stderr handlers per test)
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.data.features import FeatureSettings
from ignite_trainer.model.cnn14 import CNN14_FOREIGN_KEYS, CNN14_FRONT_END, Cnn14
from ignite_trainer.model.registry import build_model, register_model
from ignite_trainer.model.trunk import trunk_keys, trunk_state
from ignite_trainer.runs.checkpoint import find_best_checkpoint, last_checkpoint_files, load_checkpoint
from ignite_trainer.training.finetune import apply_init, with_model_front_end
from ignite_trainer.training.run import train
from ignite_trainer.training.runtime import seed_everything
from ignite_trainer.use.export import export_safetensors

#: A CNN14 of width 4 whose declared front-end suits the tiny synthetic set (1 kHz, 32 mel bands, 200 frames).
SMALL_CNN14 = "cnn14_for_tests"
SMALL_FRONT_END = {"sample_rate": 1000, "n_mels": 32, "n_fft": 256, "hop_ms": 20.0}
register_model(SMALL_CNN14, front_end=SMALL_FRONT_END, foreign_keys=CNN14_FOREIGN_KEYS)(
    functools.partial(Cnn14, width=4))



def config_for(trained_run, out: Path, **changes) -> TrainConfig:
    """A tiny run on the shared run's data and feature cache, written under ``out``."""
    return tiny_config(trained_run.data, out, cache_dir=str(trained_run.base / "cache"), **changes)


def source_state(trained_run) -> dict:
    return load_checkpoint(find_best_checkpoint(trained_run.run_dir))["model_state_dict"]


def final_state(run_dir) -> dict:
    return load_checkpoint(last_checkpoint_files(Path(run_dir) / "checkpoints")[0])["model_state_dict"]


def assert_trunk_equal(state: dict, reference: dict, keys) -> None:
    assert keys and all(torch.equal(state[k], reference[k]) for k in keys)


# ---------------------------------------------------------------------------------------------- init sources
@pytest.mark.parametrize("kind", ["run_dir", "pt", "safetensors"])
def test_init_loads_the_trunk_and_leaves_the_head_fresh(trained_run, tmp_path, kind):
    path = {"run_dir": lambda: trained_run.run_dir, "pt": lambda: trained_run.checkpoint,
            "safetensors": lambda: export_safetensors(trained_run.run_dir, tmp_path / "w.safetensors")}[kind]()
    config = config_for(trained_run, tmp_path, init_from=str(path), seed=7)
    seed_everything(config.seed)
    fresh = build_model(config.model, n_mels=config.n_mels)
    seed_everything(config.seed)
    model = build_model(config.model, n_mels=config.n_mels)
    apply_init(model, config, new_run=True)

    source = source_state(trained_run)
    keys = trunk_keys(model)
    assert keys and all(k.startswith("trunk.") for k in keys)
    assert_trunk_equal(model.state_dict(), source, keys)
    own = model.state_dict()
    rest = [k for k in own if k not in keys]
    assert rest and all(torch.equal(own[k], fresh.state_dict()[k]) for k in rest)  # head etc.: fresh init
    assert not torch.equal(own["head.weight"], source["head.weight"])


def test_frozen_trunk_stays_equal_after_training_and_the_head_learns(trained_run, tmp_path):
    assert cli.main(["train", "--data", str(trained_run.data), "--init-from", str(trained_run.run_dir),
                     "--freeze-trunk", "--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu",
                     "--output-dir", str(tmp_path / "runs"), "--name", "frozen", "--patience", "0",
                     "--set", f"cache_dir={trained_run.base / 'cache'}", "--set", "n_mels=8",
                     "--set", "sample_rate=1000", "--set", "hop_ms=20.0", "--set", "n_fft=64",
                     "--set", "val_fraction=0.34"]) == 0
    source, after = source_state(trained_run), final_state(tmp_path / "runs" / "frozen")
    keys = [k for k in after if k.startswith("trunk.")]
    assert any("running_mean" in k for k in keys)  # BatchNorm statistics did not drift either
    assert_trunk_equal(after, source, keys)
    assert not torch.equal(after["project.0.weight"], source["project.0.weight"])


# ---------------------------------------------------------------------------------------------- lr groups
def test_trunk_lr_scale_and_warm_up_per_epoch(trained_run, tmp_path, monkeypatch):
    seen, optimizers = [], []

    def capture(model, config, fused):
        optimizers.append(build_optimizer(model, config, fused))
        return optimizers[-1]

    build_optimizer = run_module.build_optimizer
    monkeypatch.setattr(run_module, "build_optimizer", capture)

    def record(trainer, evaluator):
        trainer.add_event_handler(Events.EPOCH_STARTED,
                                  lambda _: seen.append([g["lr"] for g in optimizers[0].param_groups]))

    config = config_for(trained_run, tmp_path, init_from=str(trained_run.run_dir), trunk_lr_scale=0.1,
                        warmup_epochs=2, epochs=4, name="lr")
    train(config, setup=record)
    factors = [0.5, 1.0, 1.0, 0.5]  # warm-up 1/2, 2/2, then cosine over the two epochs left
    assert seen == [pytest.approx([1e-4 * f, 1e-3 * f]) for f in factors]


# ---------------------------------------------------------------------------------------------- resume
def _stop_after_epoch_2(trainer, evaluator):
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: engine.terminate())


def test_resume_with_init_and_warm_up_is_exact_and_refuses_a_changed_init_file(trained_run, tmp_path):
    init = tmp_path / "init.pt"
    init.write_bytes(trained_run.checkpoint.read_bytes())
    changes = dict(init_from=str(init), warmup_epochs=2, trunk_lr_scale=0.5, epochs=3)
    full = train(config_for(trained_run, tmp_path, name="full", **changes))["run_dir"]
    run_dir = Path(train(config_for(trained_run, tmp_path, name="cut", **changes), setup=_stop_after_epoch_2)["run_dir"])

    ckpt = load_checkpoint(init)
    ckpt["model_state_dict"]["trunk.blocks.0.weight"] += 1.0
    torch.save(ckpt, init)
    with pytest.raises(CheckpointError, match="init_from file's content"):
        train(TrainConfig(), resume=run_dir)

    init.write_bytes(trained_run.checkpoint.read_bytes())
    train(TrainConfig(), resume=run_dir)
    resumed, straight = final_state(run_dir), final_state(full)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


# ---------------------------------------------------------------------------------------------- CNN14
def published_cnn14(n_mels: int, width: int, seed: int = 3) -> dict:
    """A CNN14 state dict as the published checkpoint holds it: AudioSet head and feature extractor included."""
    torch.manual_seed(seed)
    state = {k: v for k, v in Cnn14(n_mels=n_mels, width=width).state_dict().items() if not k.startswith("head.")}
    c = 32 * width
    state.update({"fc_audioset.weight": torch.randn(527, c), "fc_audioset.bias": torch.randn(527),
                  "spectrogram_extractor.stft.conv_real.weight": torch.randn(513, 1, 1024),
                  "spectrogram_extractor.stft.conv_imag.weight": torch.randn(513, 1, 1024),
                  "logmel_extractor.melW": torch.randn(513, n_mels)})
    return state


def test_cnn14_has_the_published_names_and_size():
    with torch.device("meta"):
        model = build_model("cnn14", n_mels=64)
    keys = set(model.state_dict())
    for name in ("bn0.weight", "conv_block1.conv1.weight", "conv_block6.bn2.running_var", "fc1.weight", "head.weight"):
        assert name in keys
    assert {f"conv_block{i}.{m}.weight" for i in range(1, 7) for m in ("conv1", "conv2", "bn1", "bn2")} <= keys
    published = sum(p.numel() for p in model.parameters()) - 2 * 2049 + 527 * 2049
    assert published == 80_753_615  # the paper's CNN14 with its 527-class head
    assert tuple(model.state_dict()["conv_block6.conv2.weight"].shape) == (2048, 2048, 3, 3)


def test_cnn14_front_end_is_the_published_one_and_contradictions_are_refused():
    config = with_model_front_end(TrainConfig(model="cnn14"))
    assert {k: getattr(config, k) for k in CNN14_FRONT_END} == CNN14_FRONT_END
    assert FeatureSettings.from_config(config).key != FeatureSettings.from_config(TrainConfig()).key  # side by side
    with pytest.raises(ConfigError, match="n_mels=128"):
        with_model_front_end(TrainConfig(model="cnn14", n_mels=128))


def test_published_cnn14_checkpoint_initialises_the_trunk(trained_run, tmp_path):
    pth = tmp_path / "cnn14.pth"
    published = published_cnn14(n_mels=32, width=4)
    torch.save({"model": published}, pth)
    config = config_for(trained_run, tmp_path, model=SMALL_CNN14, init_from=str(pth), freeze_trunk=True, epochs=1,
                        name="cnn14", n_mels=32, n_fft=256)
    run_dir = train(config)["run_dir"]
    after = final_state(run_dir)
    keys = [k for k in after if not k.startswith("head.")]
    assert "bn0.running_mean" in keys and "fc1.weight" in keys
    assert_trunk_equal(after, published, keys)


# ---------------------------------------------------------------------------------------------- bad inputs
def expect_refusal(capsys, trained_run, tmp_path, init, *needles, extra=()):
    args = ["train", "--data", str(trained_run.data), "--init-from", str(init), "--epochs", "1", "--batch-size", "4",
            "--no-progress", "--device", "cpu", "--output-dir", str(tmp_path / "runs"), "--name", "bad",
            "--set", f"cache_dir={trained_run.base / 'cache'}", "--set", "sample_rate=1000", "--set", "hop_ms=20.0",
            "--set", "val_fraction=0.34", *extra]
    if "n_mels=" not in " ".join(extra):
        args += ["--set", "n_mels=8", "--set", "n_fft=64"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not (tmp_path / "runs").exists()


def test_init_of_another_architecture_is_refused(trained_run, tmp_path, capsys):
    other = tmp_path / "resnet.pt"
    torch.save({"model_state_dict": build_model("resnet_attention", n_mels=8).state_dict(),
                "config": trained_run.config.to_dict() | {"model": "resnet_attention"}}, other)
    expect_refusal(capsys, trained_run, tmp_path, other, str(other), "trunk key(s) missing",
                   "the file's model is 'resnet_attention'")


def test_init_of_another_front_end_is_refused(trained_run, tmp_path, capsys):
    expect_refusal(capsys, trained_run, tmp_path, trained_run.run_dir, "hop_ms: file 20.0, run 25.0",
                   extra=["--set", "hop_ms=25.0"])


def test_init_of_other_mel_bands_is_refused(trained_run, tmp_path, capsys):
    expect_refusal(capsys, trained_run, tmp_path, trained_run.checkpoint, "n_mels: file 8, run 16",
                   extra=["--set", "n_mels=16", "--set", "n_fft=128"])


def test_init_from_a_file_that_is_not_a_model_is_refused(trained_run, tmp_path, capsys):
    notes = tmp_path / "notes.pt"
    torch.save({"epoch": 3}, notes)
    expect_refusal(capsys, trained_run, tmp_path, notes, str(notes), "not a model file")


def test_init_from_a_missing_path_is_refused(trained_run, tmp_path, capsys):
    expect_refusal(capsys, trained_run, tmp_path, tmp_path / "nowhere.pt", "nowhere.pt", "no such")


def test_published_checkpoint_without_config_needs_a_model_that_declares_its_front_end(trained_run, tmp_path, capsys):
    pth = tmp_path / "cnn14.pth"
    torch.save({"model": published_cnn14(n_mels=32, width=4)}, pth)
    expect_refusal(capsys, trained_run, tmp_path, pth, str(pth), "holds no config")


def test_cnn14_init_of_another_width_is_refused(trained_run, tmp_path, capsys):
    pth = tmp_path / "cnn14.pth"
    torch.save({"model": published_cnn14(n_mels=32, width=2)}, pth)
    expect_refusal(capsys, trained_run, tmp_path, pth, str(pth), "shape mismatch",
                   "conv_block1.conv1.weight (2, 1, 3, 3) in the file, (4, 1, 3, 3) in model Cnn14",
                   extra=["--model", SMALL_CNN14, "--set", "n_mels=32", "--set", "n_fft=256"])


def test_init_keys_of_the_trunk_are_its_parameters_and_buffers():
    model = build_model("attention_cnn", n_mels=8)
    state = trunk_state(model)
    assert set(state) == {k for k in model.state_dict() if k.startswith("trunk.")}


def test_fine_tuning_options_need_a_model_with_a_trunk(trained_run, tmp_path, capsys):
    expect_refusal(capsys, trained_run, tmp_path, trained_run.checkpoint, "init_from, freeze_trunk",
                   "neither a 'trunk' nor a 'head'", extra=["--model", CONSTANT_MODEL, "--freeze-trunk"])


@pytest.mark.parametrize("values, needle", [({"warmup_epochs": 3, "epochs": 3}, "warmup_epochs=3 must be below"),
                                            ({"trunk_lr_scale": 0.0}, "trunk_lr_scale=0.0 is out of range"),
                                            ({"init_from": " "}, "init_from is empty")])
def test_fine_tuning_values_out_of_range_are_refused(values, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_mapping(values)
