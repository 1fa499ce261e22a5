"""Checkpoint files: write-then-delete saving, safe loading, resume discovery."""

import random

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from ignite_trainer.runs.checkpoint import (
    CheckpointName,
    RNGStates,
    SafeDiskSaver,
    Snapshot,
    clean_partial_files,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_weights,
    restore,
)
from ignite_trainer.core.errors import CheckpointError


def _run_checkpointing(tmp_path, saver, epochs=3, n_saved=1):
    model = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    handler = Checkpoint({"model": model, "epoch": Snapshot(lambda: engine.state.epoch)}, saver,
                         filename_prefix="last", n_saved=n_saved, global_step_transform=lambda e, _: e.state.epoch)
    engine.add_event_handler(Events.EPOCH_COMPLETED, handler)
    engine.run([0], max_epochs=epochs)
    return handler


def test_snapshot_puts_plain_values_at_the_top_level(tmp_path):
    _run_checkpointing(tmp_path, SafeDiskSaver(tmp_path), epochs=2)
    ckpt = torch.load(tmp_path / "last_checkpoint_2.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt["model"]) == {"weight", "bias"}


def test_safe_saver_keeps_the_old_file_when_the_new_write_fails(tmp_path):
    saver = SafeDiskSaver(tmp_path)
    _run_checkpointing(tmp_path, saver, epochs=1)
    assert [p.name for p in tmp_path.iterdir()] == ["last_checkpoint_1.pt"]

    def disk_full(obj, f, **kw):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    saver.remove("last_checkpoint_1.pt")  # what Checkpoint does before writing the next file
    with pytest.raises(CheckpointError, match="last_checkpoint_2.pt: cannot write checkpoint .No space left"):
        saver._save_func({"x": 1}, tmp_path / "last_checkpoint_2.pt", disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint_1.pt"]  # old intact, no partial left
    assert load_checkpoint(tmp_path / "last_checkpoint_1.pt")["epoch"] == 1


def test_safe_saver_keeps_the_end_state_of_n_saved(tmp_path):
    handler = _run_checkpointing(tmp_path, SafeDiskSaver(tmp_path), epochs=4, n_saved=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint_3.pt", "last_checkpoint_4.pt"]
    assert handler.last_checkpoint.name == "last_checkpoint_4.pt"


def test_safe_saver_deletes_the_outgoing_file_only_after_the_new_one_exists(tmp_path, monkeypatch):
    """While each new file is being written, the file it replaces is still on disk (Ignite's stock
    `DiskSaver` has already deleted it by then: this test fails with it)."""
    seen_while_writing = []
    real_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        seen_while_writing.append(sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt"))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", recording_save)
    _run_checkpointing(tmp_path, SafeDiskSaver(tmp_path), epochs=3, n_saved=1)
    assert seen_while_writing == [[], ["last_checkpoint_1.pt"], ["last_checkpoint_2.pt"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint_3.pt"]


def test_checkpoint_names_are_made_and_parsed_in_one_place(tmp_path):
    from ignite_trainer.runs.checkpoint import find_best_checkpoint, parse_checkpoint_name

    assert parse_checkpoint_name("last_checkpoint_12.pt") == CheckpointName("last", 12)
    assert parse_checkpoint_name("best_checkpoint_3_neg_val_loss=-0.5000.pt") == CheckpointName(
        "best", 3, "neg_val_loss", -0.5)
    for other in ("best_checkpoint_3.pt", "last_checkpoint_x.pt", "model.pt", "last_checkpoint_2_f1=0.1.pt"):
        assert parse_checkpoint_name(other) is None
    (tmp_path / "checkpoints").mkdir()
    for name in ("best_checkpoint_2_macro_f1=0.5000.pt", "best_checkpoint_5_macro_f1=0.7000.pt",
                 "best_checkpoint_7_macro_f1=0.7000.pt", "last_checkpoint_9.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    # ties: the earlier epoch, as Ignite keeps its one best file and as every report counts the best epoch
    assert find_best_checkpoint(tmp_path).name == "best_checkpoint_5_macro_f1=0.7000.pt"


def _resume_set(model, engine):
    return {"model_state_dict": model, "trainer": engine, "rng": RNGStates(),
            "epoch": Snapshot(lambda: engine.state.epoch), "thresholds": Snapshot(lambda: None)}


def test_restore_loads_every_object_and_skips_a_snapshot_the_file_lacks(tmp_path):
    model, engine = torch.nn.Linear(2, 2), Engine(lambda e, b: None)
    engine.run([0, 0], max_epochs=2)
    objects = _resume_set(model, engine)
    ckpt = {k: v.state_dict() for k, v in objects.items() if k != "thresholds"}  # written before thresholds existed
    torch.save(ckpt, tmp_path / "c.pt")
    expected = torch.rand(1).item()

    other, fresh = torch.nn.Linear(2, 2), Engine(lambda e, b: None)
    iteration = restore(tmp_path / "c.pt", _resume_set(other, fresh))
    assert iteration == 4 and fresh.state.epoch == 2
    assert torch.equal(other.weight, model.weight)
    assert torch.rand(1).item() == expected  # the RNG states were restored (last)


def test_restore_refuses_a_checkpoint_that_lacks_a_key(tmp_path):
    model, engine = torch.nn.Linear(2, 2), Engine(lambda e, b: None)
    engine.run([0], max_epochs=1)
    objects = _resume_set(model, engine)
    torch.save({k: v.state_dict() for k, v in objects.items() if k != "trainer"}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c.pt: checkpoint lacks 'trainer'; it cannot resume this run exactly"):
        restore(tmp_path / "c.pt", _resume_set(torch.nn.Linear(2, 2), Engine(lambda e, b: None)))


def test_clean_partial_files_removes_ours_and_ignites(tmp_path):
    for name in [".last_checkpoint_2.pt.partial", "tmpab12cd_x", "last_checkpoint_1.pt", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    removed = {p.name for p in clean_partial_files(tmp_path)}
    assert removed == {".last_checkpoint_2.pt.partial", "tmpab12cd_x"}
    assert {p.name for p in tmp_path.iterdir()} == {"last_checkpoint_1.pt", "notes.txt"}


def test_rng_states_round_trip_through_weights_only(tmp_path):
    rng = RNGStates()
    torch.save({"rng": rng.state_dict()}, tmp_path / "r.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    rng.load_state_dict(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model_state_dict": {}, "evil": _Payload(str(marker))}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 10, 200])
def test_truncated_checkpoint_is_reported(tmp_path, cut):
    torch.save({"w": torch.zeros(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="cut.pt: (truncated or corrupt|checkpoint is empty)"):
        load_checkpoint(tmp_path / "cut.pt")


def test_missing_checkpoint_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    for epoch in (1, 2):
        torch.save({"epoch": epoch, "model_state_dict": {}, "trainer": {}}, d / f"last_checkpoint_{epoch}.pt")
    (d / "last_checkpoint_3.pt").write_bytes((d / "last_checkpoint_2.pt").read_bytes()[:40])  # killed mid-write
    (d / ".last_checkpoint_4.pt.partial").write_bytes(b"junk")
    path, ckpt = find_resume_checkpoint(tmp_path)
    assert path.name == "last_checkpoint_2.pt" and ckpt["epoch"] == 2
    assert not (d / ".last_checkpoint_4.pt.partial").exists()


def test_resume_without_checkpoints_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints folder"):
        find_resume_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_resume_checkpoint(tmp_path)


def test_weights_of_another_architecture_get_a_clear_message():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="shape mismatch e.g. 0.weight"):
        load_model_weights(model, torch.nn.Sequential(torch.nn.Linear(5, 3)).state_dict(), "x.pt")
    with pytest.raises(CheckpointError, match="missing key"):
        load_model_weights(model, {}, "x.pt")
