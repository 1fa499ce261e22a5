"""Per-epoch TensorBoard scalars, read back from the event files: steps are epochs, AUROC/AUPRC and the best
epoch are right, a single-class label gets no AUROC, and a resume hides what a killed run logged past its
checkpoint."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from sklearn.metrics import average_precision_score, roc_auc_score
from tensorboardX.proto.event_pb2 import Event, SessionLog

from conftest import TinyModel, make_batches
from ignite_trainer.training.engine import create_evaluator, create_trainer
from ignite_trainer.training.epoch_scalars import ranking_scores
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.training.handlers import attach_best_checkpoint, attach_validation
from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics
from ignite_trainer.training.metrics import PredictionCollector
from ignite_trainer.training.tensorboard import attach_epoch_tensorboard


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from every event file in ``log_dir``, read as TensorBoard does.

    The files are TFRecords (length, its CRC, the serialized `Event`, its CRC). A ``SessionLog.START``
    event at step s (tensorboardX's ``purge_step``) hides every event read before it at a step >= s.
    """
    events: list[tuple[str, int, float]] = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                events = [e for e in events if e[1] < event.step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    events.append((value.tag, event.step, value.simple_value))
    out: dict[str, list[tuple[int, float]]] = {}
    for tag, step, value in events:
        out.setdefault(tag, []).append((step, value))
    return out


def bce(logits, y, mask=None):
    return F.binary_cross_entropy_with_logits(logits, y)


def build(tmp_path, lr=0.5, seed=0):
    """A real trainer and evaluator on tiny batches, validated every epoch, with a best checkpoint by val_loss."""
    torch.manual_seed(seed)
    model = TinyModel()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=lr), bce)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(bce), "labels": PerLabelMetrics(),
                                         "predictions": PredictionCollector()})
    attach_validation(trainer, evaluator, make_batches(n_batches=3, seed=1))
    best = attach_best_checkpoint(trainer, {"model": model}, tmp_path / "ckpt", "val_loss")
    seen = {}

    def remember(engine):  # what validation produced, to compare with what was logged
        seen[engine.state.epoch] = (dict(engine.state.validation_metrics),
                                    engine.state.validation_output.metrics["predictions"])

    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, remember)
    return trainer, best, seen


def test_validation_is_logged_per_epoch_with_auroc_auprc_and_the_best_epoch(tmp_path):
    trainer, best, seen = build(tmp_path)
    tb = attach_epoch_tensorboard(trainer, tmp_path / "tb", best_checkpoint=best)
    trainer.run(make_batches(n_batches=2), max_epochs=4)
    tb.close()
    scalars = read_scalars(tmp_path / "tb")

    for tag in ("val/val_loss", "val/macro_f1", "val/heart.f1", "val/murmur.auroc", "val/heart.auprc",
                "epoch/train_loss", "epoch/seconds", "epoch/val_seconds", "epoch/best_epoch", "epoch/best_score"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
    for epoch, (metrics, windows) in seen.items():
        logged = dict(scalars["val/val_loss"])[epoch]
        assert logged == pytest.approx(metrics["val_loss"], rel=1e-6)
        y, p = windows.targets[:, 0], windows.probs[:, 0]
        assert dict(scalars["val/heart.auroc"])[epoch] == pytest.approx(roc_auc_score(y, p), rel=1e-6)
        assert dict(scalars["val/heart.auprc"])[epoch] == pytest.approx(average_precision_score(y, p), rel=1e-6)

    losses = [seen[e][0]["val_loss"] for e in range(1, 5)]
    expected_best = [int(np.argmin(losses[:e])) + 1 for e in range(1, 5)]  # first of equal losses stays best
    assert [int(v) for _, v in scalars["epoch/best_epoch"]] == expected_best
    assert [v for _, v in scalars["epoch/best_score"]] == pytest.approx([losses[b - 1] for b in expected_best],
                                                                        rel=1e-6)
    assert all(v > 0 for _, v in scalars["epoch/seconds"])


def test_ranking_scores_leave_out_a_label_with_one_class():
    probs = np.array([[0.9, 0.8], [0.2, 0.3], [0.6, 0.1]])
    targets = np.array([[1, 0], [0, 0], [1, 1]])
    mask = np.array([[True, True], [True, True], [True, False]])  # murmur: the one positive is masked
    scores = ranking_scores(probs, targets, mask)
    assert set(scores) == {"heart.auroc", "heart.auprc"}
    assert scores["heart.auroc"] == 1.0
    assert ranking_scores(probs, targets, np.zeros((3, 2), bool)) == {}


def test_a_resume_hides_epochs_logged_after_the_checkpoint(tmp_path):
    """The first run logs epochs 1-3 but 'dies' with its checkpoint at epoch 2; the resumed run rewrites 3-4."""
    trainer, best, _ = build(tmp_path / "a")
    at_checkpoint = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2),
                              lambda e: at_checkpoint.update(trainer=e.state_dict(), best=best.state_dict()))
    tb = attach_epoch_tensorboard(trainer, tmp_path / "tb", best_checkpoint=best)
    trainer.run(make_batches(n_batches=2), max_epochs=3)
    tb.close()

    resumed, best2, seen = build(tmp_path / "b", lr=0.05, seed=1)  # other weights: other epoch-3 scores
    resumed.load_state_dict({**at_checkpoint["trainer"], "max_epochs": 4})
    best2.load_state_dict(at_checkpoint["best"])
    tb = attach_epoch_tensorboard(resumed, tmp_path / "tb", best_checkpoint=best2)
    resumed.run(make_batches(n_batches=2), max_epochs=4)
    tb.close()

    scalars = read_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["val/val_loss"]] == [1, 2, 3, 4]
    assert dict(scalars["val/val_loss"])[3] == pytest.approx(seen[3][0]["val_loss"], rel=1e-6)
    # the best epoch before the resume is carried over until a better one is saved
    first_best = int(dict(scalars["epoch/best_epoch"])[2])
    losses = {e: v for e, v in scalars["val/val_loss"]}
    expected = first_best
    for epoch in (3, 4):
        if losses[epoch] < losses[expected]:
            expected = epoch
        assert int(dict(scalars["epoch/best_epoch"])[epoch]) == expected


def test_the_tensorboard_viewer_reads_epoch_steps(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    trainer, best, _ = build(tmp_path)
    tb = attach_epoch_tensorboard(trainer, tmp_path / "tb", best_checkpoint=best)
    trainer.run(make_batches(n_batches=2), max_epochs=3)
    tb.close()
    acc = accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/murmur.f1")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("epoch/best_epoch")] == [1, 2, 3]


def test_auroc_is_over_recordings_when_the_validation_dataset_is_given(tmp_path):
    """Windows 0-1 belong to recording A, 2-3 to B, 4-5 to C: the score is over the recordings' mean probability."""
    from types import SimpleNamespace

    from ignite_trainer.data.records import Recording
    from ignite_trainer.training.epoch_scalars import EpochScalars
    from ignite_trainer.scoring.predictions import WindowPredictions

    recordings = [Recording(rid, "p" + rid, Path(f"{rid}.wav"), labels, (True, True))
                  for rid, labels in (("A", (1.0, 0.0)), ("B", (0.0, 1.0)), ("C", (1.0, 1.0)))]
    windows = WindowPredictions(
        probs=np.array([[0.9, 0.1], [0.1, 0.3], [0.6, 0.8], [0.6, 0.6], [0.2, 0.2], [0.4, 0.9]]),
        targets=np.repeat([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], 2, axis=0), mask=np.ones((6, 2), bool),
        index=np.arange(6))
    dataset = SimpleNamespace(window_recording=[0, 0, 1, 1, 2, 2], recordings=recordings)
    trainer, _, _ = build(tmp_path)
    trainer.state.validation_metrics = {"val_loss": 0.5}
    trainer.state.validation_output = SimpleNamespace(metrics={"predictions": windows})

    by_recording = EpochScalars(trainer, val_dataset=dataset).validation(trainer)
    rec_probs = np.array([[0.5, 0.2], [0.6, 0.7], [0.3, 0.55]])
    assert by_recording["heart.auroc"] == pytest.approx(roc_auc_score([1, 0, 1], rec_probs[:, 0]))
    assert by_recording["murmur.auprc"] == pytest.approx(average_precision_score([0, 1, 1], rec_probs[:, 1]))
    by_window = EpochScalars(trainer).validation(trainer)
    assert by_window["heart.auroc"] == pytest.approx(roc_auc_score(windows.targets[:, 0], windows.probs[:, 0]))
    assert by_window["heart.auroc"] != by_recording["heart.auroc"]
