"""Self-supervised pretraining (BYOL-A, `cli.py pretrain`): it learns (two views of a window end up closer than
two windows), resumes bit for bit (the EMA target too), does not depend on the worker count, refuses bad
input with one line and nothing written, and keeps the checkpoint contract the fine-tuning side loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import cli
from conftest import tiny_config
from ignite_trainer.core.vocabulary import SAFETENSORS_FORMAT
from ignite_trainer.data.datasets import TrainWindows
from ignite_trainer.data.prepare import prepare_unlabelled
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.model.byol import encode
from ignite_trainer.model.registry import build_model
from ignite_trainer.runs.checkpoint import last_checkpoint_files, load_checkpoint
from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.training.pretrain import pretrain
from ignite_trainer.training.runtime import seed_everything
from ignite_trainer.training.views import ViewMaker
from ignite_trainer.use.model_files import read_safetensors

EPOCHS = 4


def pretrain_config(base: Path, data: list[Path], **changes):
    values = dict(pretrain_data=[str(d) for d in data], epochs=EPOCHS, name="p")
    values.update(changes)
    return tiny_config(None, base, **values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A labelled CirCor-layout folder and a plain folder of WAV files (other patients)."""
    base = tmp_path_factory.mktemp("pretrain-data")
    labelled = write_synthetic(base / "circor", 8, 4, progress=False)
    other = write_synthetic(base / "other", 4, 5, progress=False)
    wavs = base / "wavs"
    wavs.mkdir()
    for wav in sorted(Path(other).rglob("*.wav")):
        shutil.copy(wav, wavs / f"w{wav.name}")
    return Path(labelled), wavs


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("pretrain-run")
    config = pretrain_config(base, list(dataset))
    summary = pretrain(config)
    return config, Path(summary["run_dir"]), base


def _checkpoint(run_dir: Path, epoch: int) -> dict:
    path = next(p for p in last_checkpoint_files(RunDirectory(run_dir).checkpoints) if p.name == f"last_checkpoint_{epoch}.pt")
    return load_checkpoint(path)


def _view_agreement(model: torch.nn.Module, config) -> float:
    """Mean cosine similarity of two views of the same window minus that of two different windows."""
    data = prepare_unlabelled(config)
    windows = TrainWindows(data.train, data.feature_cache(), config.window_seconds, seed=config.seed)
    batch = [windows[(0, i)] for i in range(len(windows))]
    x = torch.stack([b[0] for b in batch])
    index = torch.stack([b[3] for b in batch])
    v1, v2 = ViewMaker.from_config(config)(x, index, 99)
    model.eval()
    with torch.no_grad():
        e1, e2 = F.normalize(encode(model, v1), dim=1), F.normalize(encode(model, v2), dim=1)
    sim = e1 @ e2.T
    n = sim.shape[0]
    same = sim.diagonal().mean()
    different = (sim.sum() - sim.diagonal().sum()) / (n * n - n)
    return float(same - different)


def test_the_loss_falls_and_two_views_of_a_window_end_up_closer_than_two_windows(run):
    config, run_dir, _ = run
    records = RunDirectory(run_dir).metrics_log.records()
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    assert records[-1]["byol_loss"] < records[0]["byol_loss"]
    seed_everything(config.seed)
    initial = build_model(config.model, n_mels=config.n_mels)  # the weights pretraining started from
    learned = build_model(config.model, n_mels=config.n_mels)
    learned.load_state_dict(_checkpoint(run_dir, EPOCHS)["model_state_dict"])
    # measured: about 0.04 after 4 tiny epochs, 0.00001 at the initial weights
    assert _view_agreement(learned, config) > _view_agreement(initial, config) + 0.02


def test_the_checkpoint_holds_the_plain_model_with_the_learned_trunk_and_the_config(run):
    config, run_dir, _ = run
    ckpt = _checkpoint(run_dir, EPOCHS)
    saved = ckpt["config"]
    assert {saved["model"], saved["n_mels"], saved["sample_rate"], saved["hop_ms"]} >= {config.model, config.n_mels}
    model = build_model(saved["model"], n_mels=saved["n_mels"])
    model.load_state_dict(ckpt["model_state_dict"], strict=True)
    seed_everything(config.seed)
    initial = build_model(config.model, n_mels=config.n_mels).state_dict()
    trunk = [k for k in initial if k.startswith("trunk.") and k.endswith("weight")]
    assert trunk and all(not torch.equal(initial[k], ckpt["model_state_dict"][k]) for k in trunk)
    assert torch.equal(initial["head.weight"], ckpt["model_state_dict"]["head.weight"])  # the head untouched
    metadata, tensors = read_safetensors(RunDirectory(run_dir).trunk_file)
    assert metadata["format"] == SAFETENSORS_FORMAT and yaml.safe_load(metadata["config"])["model"] == config.model
    assert set(tensors) == set(ckpt["model_state_dict"])
    assert all(torch.equal(tensors[k], ckpt["model_state_dict"][k]) for k in tensors)


def test_a_resume_from_an_epochs_checkpoint_equals_the_run_never_stopped(run):
    config, run_dir, base = run
    copy = base / "runs" / "resumed"
    shutil.copytree(run_dir, copy)
    (RunDirectory(copy).checkpoints / f"last_checkpoint_{EPOCHS}.pt").unlink()  # as if stopped after EPOCHS - 1
    pretrain(config, resume=copy)
    a, b = _checkpoint(run_dir, EPOCHS), _checkpoint(copy, EPOCHS)
    for key in ("model_state_dict", "byol_heads"):  # byol_heads holds the EMA target network
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["optimizer_state_dict"]["state"].keys() == b["optimizer_state_dict"]["state"].keys()
    assert all(torch.equal(a["optimizer_state_dict"]["state"][i]["exp_avg"], b["optimizer_state_dict"]["state"][i]["exp_avg"])
               for i in a["optimizer_state_dict"]["state"])
    def losses(folder: Path) -> list:
        return [(r["epoch"], r["byol_loss"], r["lr"]) for r in RunDirectory(folder).metrics_log.records()]
    assert losses(copy) == losses(run_dir)


def test_the_worker_count_changes_nothing(dataset, tmp_path):
    states = []
    for workers in (0, 2):
        config = pretrain_config(tmp_path, [dataset[1]], epochs=1, num_workers=workers, name=f"w{workers}")
        run_dir = Path(pretrain(config)["run_dir"])
        states.append(_checkpoint(run_dir, 1))
    for key in ("model_state_dict", "byol_heads"):
        assert all(torch.equal(states[0][key][k], states[1][key][k]) for k in states[0][key]), key


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    code = cli.main(["pretrain", *args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "unreadable-skipped"])
def test_bad_data_is_one_line_and_nothing_written(case, tmp_path, capsys, caplog):
    target = tmp_path / "data"
    if case != "missing":
        target.mkdir()
    if case.startswith("unreadable"):
        for i in range(3):
            (target / f"bad{i}.wav").write_bytes(b"not a wav file at all")
    out = tmp_path / "runs"
    args = [str(target), "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--name", "x",
            "--no-progress"] + (["--skip-bad"] if case == "unreadable-skipped" else [])
    with caplog.at_level("WARNING", logger="ignite_trainer"):
        code, lines = _cli(args, capsys)
    assert code == 2
    if case == "unreadable-skipped":  # --skip-bad warns once per skipped file, as training does
        # (on stderr when a run has set up logging in this process; pytest's own handler catches them otherwise)
        warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
        assert len(warned) == 3, caplog.text
        lines = [line for line in lines if not line.startswith("skipped ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], lines
    assert not out.exists()


def test_no_data_and_a_bad_setting_are_one_line(tmp_path, capsys):
    code, lines = _cli(["--output-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(lines) == 1 and "DATA" in lines[0]
    code, lines = _cli([str(tmp_path), "--output-dir", str(tmp_path / "runs"), "--set", "pretrain_ema=2"], capsys)
    assert code == 2 and len(lines) == 1 and "pretrain_ema" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("source", ["run", "trunk"])
def test_a_training_run_starts_from_the_pretrained_trunk(run, dataset, tmp_path, source):
    """The whole path a user takes: pretrain, then `train --init-from` the pretrain run or its trunk file."""
    from ignite_trainer.training.run import train

    config, run_dir, _ = run
    init = run_dir if source == "run" else RunDirectory(run_dir).trunk_file
    learned = {k: v for k, v in load_checkpoint(last_checkpoint_files(RunDirectory(run_dir).checkpoints)[0])["model_state_dict"].items()
               if k.startswith("trunk.")}
    fine = tiny_config(dataset[0], tmp_path, epochs=1, init_from=str(init), freeze_trunk=True)
    summary = train(fine)
    trained = load_checkpoint(last_checkpoint_files(RunDirectory(summary["run_dir"]).checkpoints)[0])["model_state_dict"]
    assert learned and all(torch.equal(trained[k], v) for k, v in learned.items())  # frozen: still the pretrained trunk
