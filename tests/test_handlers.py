"""attach_* handlers: LR schedule, early stopping, checkpoints and their events, logs."""

import json

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from ignite_trainer.runs.checkpoint import Snapshot
from ignite_trainer.training.engine import create_trainer
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.runs.rundir import MetricsLog
from ignite_trainer.training.handlers import (
    attach_best_checkpoint,
    attach_early_stopping,
    attach_lr_scheduler,
    attach_metrics_log,
    attach_tensorboard,
)


def bce(logits, y, mask=None):
    return F.binary_cross_entropy_with_logits(logits, y)


def fake_validation(trainer, scores):
    """Fire VALIDATION_COMPLETED each epoch with the next dict of scores."""

    def validate(engine):
        engine.state.validation_metrics = dict(scores[engine.state.epoch - 1])
        engine.fire_event(TrainerEvents.VALIDATION_COMPLETED)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)


def test_lr_per_epoch_equals_torch_cosine_annealing(tiny_model, batches):
    epochs = 12
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    trainer = create_trainer(tiny_model, opt, bce)
    attach_lr_scheduler(trainer, opt, epochs)
    used = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda: used.append(opt.param_groups[0]["lr"]))
    trainer.run(batches[:1], max_epochs=epochs)

    ref_opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=1e-3)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=epochs)
    expected = []
    for _ in range(epochs):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_early_stopping_stops_on_a_flat_score_and_fires_its_event(tiny_model, batches):
    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.1), bce)
    fake_validation(trainer, [{"val_loss": 0.5}] * 10)
    es = attach_early_stopping(trainer, patience=1, monitor="val_loss")
    fired = []
    trainer.add_event_handler(TrainerEvents.EARLY_STOPPED, lambda e: fired.append(e.state.early_stopped_epoch))
    trainer.run(batches[:1], max_epochs=10)
    assert trainer.state.epoch == 2 and fired == [2] and es.counter == 1


def test_early_stopping_follows_a_maximised_monitor(tiny_model, batches):
    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.1), bce)
    f1 = [0.1, 0.2, 0.3, 0.3, 0.3, 0.9]
    fake_validation(trainer, [{"macro_f1": v} for v in f1])
    attach_early_stopping(trainer, patience=2, monitor="macro_f1")
    trainer.run(batches[:1], max_epochs=6)
    assert trainer.state.epoch == 5  # improving until 3, then two flat epochs


def test_best_checkpoint_keeps_the_best_and_announces_it(tmp_path, tiny_model, batches):
    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.1), bce)
    losses = [0.9, 0.5, 0.7, 0.4, 0.6]
    fake_validation(trainer, [{"val_loss": v} for v in losses])
    to_save = {"model_state_dict": tiny_model, "epoch": Snapshot(lambda: trainer.state.epoch)}
    best = attach_best_checkpoint(trainer, to_save, tmp_path, "val_loss", n_saved=1)
    announced = []
    trainer.add_event_handler(TrainerEvents.BEST_MODEL_SAVED,
                              lambda e: announced.append((e.state.epoch, e.state.best_score, e.state.best_model_path.name)))
    trainer.run(batches[:1], max_epochs=5)
    assert [a[:2] for a in announced] == [(1, 0.9), (2, 0.5), (4, 0.4)]
    assert [p.name for p in tmp_path.iterdir()] == [announced[-1][2]] == ["best_checkpoint_4_neg_val_loss=-0.4000.pt"]
    assert best.last_checkpoint.name == announced[-1][2]


def test_tensorboard_writer_is_tensorboardx(tmp_path, tiny_model, batches):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    trainer = create_trainer(tiny_model, opt, bce)
    tb = attach_tensorboard(trainer, opt, tmp_path / "tb")
    fake_validation(trainer, [{"val_loss": 0.5, "murmur.f1": 0.25}] * 2)
    trainer.run(batches, max_epochs=2)
    tb.close()
    assert type(tb.writer).__module__.startswith("tensorboardX")


def read_scalars(log_dir):
    """Scalars in tensorboardX event files, read with tensorboardX's own protobufs (no tensorboard needed)."""
    from tensorboardX.proto import event_pb2
    import struct

    out = {}
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_logs_loss_lr_grad_norm_per_iteration_only(tmp_path, tiny_model, batches):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    trainer = create_trainer(tiny_model, opt, bce)
    fake_validation(trainer, [{"val_loss": 0.5, "murmur.f1": 0.25}] * 2)
    tb = attach_tensorboard(trainer, opt, tmp_path / "tb")
    trainer.run(batches, max_epochs=2)
    tb.close()
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))
    assert len(scalars["train/grad_norm"]) == 8 and len(scalars["lr/group_0"]) == 8
    assert not any(tag.startswith("val/") for tag in scalars)  # validation is per epoch, in tb/epoch


def test_metrics_log_writes_one_line_per_epoch_and_truncates_on_resume(tmp_path, tiny_model, batches):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    trainer = create_trainer(tiny_model, opt, bce)
    scores = {"val_loss": 0.5, "macro_f1": 0.4}
    for label in ("heart", "murmur"):
        for m in ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1"):
            scores[f"{label}.{m}"] = 0.5
    fake_validation(trainer, [scores] * 3)
    path = tmp_path / "metrics.jsonl"
    attach_metrics_log(trainer, opt, path)
    trainer.run(batches, max_epochs=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert set(lines[0]) >= {"epoch", "train_loss", "val_loss", "lr", "seconds", "heart", "murmur"}
    assert set(lines[0]["murmur"]) == {"accuracy", "precision", "recall", "sensitivity", "specificity", "f1"}
    assert lines[0]["lr"] == 0.1 and lines[0]["seconds"] > 0

    with open(path, "a") as f:
        f.write('{"epoch": 4, "train_lo')  # a line cut by a kill
    MetricsLog(path).truncate(last_epoch=2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]


def test_custom_events_take_ignites_epoch_filters(tiny_model, batches):
    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.1), bce)
    fake_validation(trainer, [{"val_loss": 0.5}] * 6)
    seen = []
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED(every=2), lambda e: seen.append(e.state.epoch))
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED(once=5), lambda e: seen.append(-e.state.epoch))
    trainer.run(batches[:1], max_epochs=6)
    assert seen == [2, 4, -5, 6]


# ---------------------------------------------------------------------------------------------- the standard set
def _standard_run(tmp_path, model, epochs=3):
    """A trainer and evaluator on the tiny batches, with `attach_standard_handlers`' inputs."""
    from pathlib import Path
    from types import SimpleNamespace

    from conftest import make_batches
    from ignite_trainer.core.config import TrainConfig
    from ignite_trainer.data.records import Recording
    from ignite_trainer.training.engine import create_evaluator
    from ignite_trainer.training.losses import WeightedBCELoss
    from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics
    from ignite_trainer.training.metrics import PredictionCollector

    train_batches, val_batches = make_batches(seed=1), make_batches(n_batches=2, seed=2)
    labels = torch.cat([b[1] for b in val_batches])
    recordings = [Recording(f"r{i}", f"p{i // 2}", Path(f"r{i}.wav"), tuple(labels[2 * i].tolist()), (True, True))
                  for i in range(len(labels) // 2)]
    val_dataset = SimpleNamespace(window_recording=[i // 2 for i in range(len(labels))], recordings=recordings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = WeightedBCELoss()
    trainer = create_trainer(model, optimizer, loss_fn)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn), "labels": PerLabelMetrics(),
                                         "predictions": PredictionCollector()})
    config = TrainConfig(epochs=epochs, early_stopping_patience=5, progress=False, device="cpu")
    return trainer, evaluator, dict(model=model, optimizer=optimizer, train_loader=train_batches,
                                    val_loader=val_batches, val_dataset=val_dataset, config=config,
                                    run_dir=tmp_path, writes_logs=True)


def _position(trainer, event, handler):
    registered = [h for h, _, _ in trainer._event_handlers[event]]
    return next(i for i, h in enumerate(registered) if trainer._compare_handlers(handler, h))


def test_standard_handlers_attach_in_the_documented_order_and_each_can_be_removed(tmp_path, tiny_model):
    from ignite_trainer.training.standard import attach_standard_handlers

    trainer, evaluator, kwargs = _standard_run(tmp_path, tiny_model)
    h = attach_standard_handlers(trainer, evaluator, **kwargs)
    on_validation = [_position(trainer, TrainerEvents.VALIDATION_COMPLETED, x)
                     for x in (h.threshold_tuning, h.early_stopping, h.best_checkpoint, h.metrics_log, h.pr_curves)]
    assert on_validation == sorted(on_validation)
    on_epoch = [_position(trainer, Events.EPOCH_COMPLETED, x) for x in (h.validation, h.lr_scheduler, h.last_checkpoint)]
    assert on_epoch == sorted(on_epoch)
    assert trainer.has_event_handler(h.metrics_log.capture_lr, Events.EPOCH_STARTED)
    for handler in (h.nan_guard, h.validation, h.threshold_tuning, h.lr_scheduler, h.early_stopping,
                    h.best_checkpoint, h.last_checkpoint, h.metrics_log, h.pr_curves):
        assert trainer.has_event_handler(handler), handler
    trainer.remove_event_handler(h.early_stopping, TrainerEvents.VALIDATION_COMPLETED)
    assert not trainer.has_event_handler(h.early_stopping)
    h.close()


def test_the_best_checkpoint_holds_its_epochs_thresholds_and_the_log_its_epochs_lr(tmp_path, tiny_model):
    from ignite_trainer.runs.checkpoint import find_best_checkpoint, load_checkpoint
    from ignite_trainer.runs.rundir import MetricsLog
    from ignite_trainer.training.standard import attach_standard_handlers

    trainer, evaluator, kwargs = _standard_run(tmp_path, tiny_model)
    h = attach_standard_handlers(trainer, evaluator, **kwargs)
    used = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda: used.append(kwargs["optimizer"].param_groups[0]["lr"]))
    try:
        trainer.run(kwargs["train_loader"], max_epochs=3)
    finally:
        h.close()
    records = MetricsLog(tmp_path / "metrics.jsonl").records()
    assert [r["lr"] for r in records] == used and used[0] > used[1] > used[2]
    best = load_checkpoint(find_best_checkpoint(tmp_path))
    logged = records[best["epoch"] - 1]
    assert best["thresholds"] == {label: logged[label]["threshold"] for label in ("heart", "murmur")}
    assert not any(k.endswith(".threshold") for k in trainer.state.validation_metrics)


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_the_logged_lr_is_the_epochs_whatever_the_scheduler_order(tmp_path, tiny_model, batches, scheduler_first):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    trainer = create_trainer(tiny_model, opt, bce)
    if scheduler_first:
        attach_lr_scheduler(trainer, opt, 4)
    fake_validation(trainer, [{"val_loss": 0.5}] * 4)
    writer = attach_metrics_log(trainer, opt, tmp_path / "metrics.jsonl")
    if not scheduler_first:
        attach_lr_scheduler(trainer, opt, 4)
    used = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda: used.append(opt.param_groups[0]["lr"]))
    trainer.run(batches[:1], max_epochs=4)
    assert [r["lr"] for r in writer.log.records()] == used and len(set(used)) == 4
