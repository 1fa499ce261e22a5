"""Nothing already written is lost: a start that fails on its input leaves every earlier file byte-identical,
and every command that replaces something (evaluate's report, synth, export) replaces it whole or not at all."""

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

import cli
from ignite_trainer.use import evaluation

from test_bad_inputs import expect_error, train_args, tree_digest  # noqa: F401  (fixtures below)
from test_bad_inputs import fresh_log_stream, pristine  # noqa: F401


@pytest.fixture
def earlier_run(tmp_path):
    """A run directory that an ``--overwrite`` start with bad input must leave exactly as it is."""
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "checkpoints" / "last_checkpoint_1.pt").write_bytes(b"precious weights")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return run


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the row is about a machine without CUDA")


@pytest.mark.parametrize("extra, needles", [
    (["--model", "bogus"], ["model 'bogus' is not registered"]),
    pytest.param(["--device", "cuda"], ["device=cuda", "no CUDA device"], marks=NO_CUDA),
    (["--batch-size", "500"], ["batch_size=500", "larger than the training set"]),
    pytest.param(["--nproc-per-node", "2", "--backend", "nccl"], ["backend=nccl", "CUDA"], marks=NO_CUDA),
    (["--set", "accumulation_steps=1000"], ["accumulation_steps=1000", "iterations of an epoch"]),
    (["--set", "n_mels=64", "--set", "n_fft=16", "--set", "win_ms=10"], ["n_mels=64", "n_fft=16", "mel bands"]),
    (["--set", "hop_ms=1000"], ["hop_ms=1000", "frame(s) per", "window"]),
    (["--seed", str(2**64)], [f"seed={2**64}", "out of range"]),
], ids=["model", "device", "batch", "nccl", "accumulation", "empty-mel-bands", "one-frame", "seed"])
def test_a_failing_overwrite_start_keeps_the_earlier_run(tmp_path, pristine, earlier_run, capsys, extra, needles):
    expect_error(capsys, train_args(tmp_path, pristine, "--overwrite", *extra), *needles, root=tmp_path)
    assert sorted(p.name for p in earlier_run.rglob("*")) == ["checkpoints", "config.yaml", "last_checkpoint_1.pt",
                                                              "metrics.jsonl"]


def test_a_failing_new_start_creates_no_run_directory(tmp_path, pristine, capsys):
    expect_error(capsys, train_args(tmp_path, pristine, "--model", "bogus"), "bogus", root=tmp_path)
    assert not (tmp_path / "runs" / "r").exists()


def test_default_feature_settings_with_256_mel_bands_are_refused(tmp_path, pristine, capsys):
    args = train_args(tmp_path, pristine)
    for item in ["n_mels=8", "sample_rate=1000", "hop_ms=20.0", "n_fft=64"]:
        del args[args.index(item) - 1:args.index(item) + 1]
    expect_error(capsys, args + ["--set", "n_mels=256"], "65 of 256 mel bands", root=tmp_path)


# ------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_on_a_full_disk_leaves_the_previous_report_whole(trained_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    evaluation.evaluate(trained_run.run_dir, out_dir=out, figures=False)
    before = tree_digest(out)
    assert "metrics.json" in before

    def full(levels, thresholds, path):
        Path(path).write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluation, "write_patients_csv", full)
    capsys.readouterr()
    expect_error(capsys, ["evaluate", str(trained_run.run_dir), "--output-dir", str(out)], str(out),
                 "No space left on device", "previous report")
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"], "a staging folder was left behind"


# ------------------------------------------------------------------------------------------------- synth, export
def test_synth_refuses_a_non_empty_folder_and_replaces_it_with_overwrite(tmp_path, capsys):
    target = tmp_path / "d"
    assert cli.main(["synth", str(target), "--patients", "2", "--seed", "1"]) == 0
    before = tree_digest(target)
    expect_error(capsys, ["synth", str(target), "--patients", "3", "--seed", "2"], str(target), "not empty",
                 "--overwrite")
    assert tree_digest(target) == before
    assert cli.main(["synth", str(target), "--patients", "3", "--seed", "2", "--overwrite"]) == 0
    assert tree_digest(target) != before


def test_export_refuses_an_existing_file_and_honours_the_umask(trained_run, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    old = os.umask(0o022)
    try:
        assert cli.main(["export", str(trained_run.run_dir), str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        out.write_bytes(b"an earlier export")
        expect_error(capsys, ["export", str(trained_run.run_dir), str(out)], str(out), "already exists", "--overwrite")
        assert out.read_bytes() == b"an earlier export"
        assert cli.main(["export", str(trained_run.run_dir), str(out), "--overwrite"]) == 0
        assert out.read_bytes() != b"an earlier export"
    finally:
        os.umask(old)


@pytest.mark.parametrize("where", ["new-folder", "overwrite"])
def test_export_on_a_full_disk_leaves_no_partial_file_or_folder(trained_run, tmp_path, capsys, monkeypatch, where):
    # safetensors does not raise OSError on a full disk but its own SafetensorError, the OS error in its text
    import safetensors
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "new" / "sub" / "m.safetensors" if where == "new-folder" else tmp_path / "m.safetensors"
    if where == "overwrite":
        out.write_bytes(b"an earlier export")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    expect_error(capsys, ["export", str(trained_run.run_dir), str(out), "--overwrite"], str(out),
                 "cannot write the export", "No space left on device")
    if where == "new-folder":
        assert not (tmp_path / "new").exists(), "the folders made for the export were left behind"
    else:
        assert out.read_bytes() == b"an earlier export"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"], "a partial file was left behind"
