"""predictions: collecting window probabilities, aggregating to recordings and patients, tuning thresholds."""

from pathlib import Path
from types import SimpleNamespace

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from conftest import TinyModel, make_batches
from ignite_trainer.data.records import Recording
from ignite_trainer.training.engine import create_evaluator
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.training.handlers import attach_validation
from ignite_trainer.training.metrics import PredictionCollector
from ignite_trainer.scoring.predictions import (aggregate, murmur_classes, patient_predictions, recording_predictions, tune_thresholds, unknown_band)
from ignite_trainer.training.tensorboard import attach_pr_curves
from ignite_trainer.training.decisions import attach_threshold_tuning
from ignite_trainer.data.splits import patient_labels
from ignite_trainer.scoring.scores import binary_stats


def rec(rid, pid, labels=(0.0, 0.0), mask=(True, True), murmur_class=None):
    return Recording(recording_id=rid, patient_id=pid, wav_path=Path(f"{rid}.wav"), labels=labels, mask=mask,
                     murmur_class=murmur_class)


# ---------------------------------------------------------------------------------------------- collector
def test_collector_gathers_sigmoid_targets_masks_sorted_by_index():
    torch.manual_seed(0)
    model = TinyModel()
    batches = make_batches(n_batches=3, batch_size=5, mask_prob=0.3)
    evaluator = create_evaluator(model, {"predictions": PredictionCollector()})
    windows = evaluator.run(list(reversed(batches))).metrics["predictions"]  # out of order on purpose

    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        expected = torch.sigmoid(model(x)[0]).double().numpy()
    assert windows.index.tolist() == list(range(15))
    np.testing.assert_allclose(windows.probs, expected, rtol=1e-6)
    np.testing.assert_array_equal(windows.targets, torch.cat([b[1] for b in batches]).numpy())
    np.testing.assert_array_equal(windows.mask, torch.cat([b[2] for b in batches]).numpy() > 0.5)
    assert windows.mask.sum() < windows.mask.size  # some entries were masked and stay masked


def test_collector_resets_between_runs():
    evaluator = create_evaluator(TinyModel(), {"predictions": PredictionCollector()})
    batches = make_batches(n_batches=2, batch_size=4)
    evaluator.run(batches)
    assert len(evaluator.run(batches[:1]).metrics["predictions"]) == 4


def _gather_in_process(local_rank, out_dir):
    rank = idist.get_rank()
    collector = PredictionCollector()
    collector.reset()
    n = 3 if rank == 0 else 2  # unequal shards, as ShardSampler gives
    index = torch.arange(rank, 2 * n, 2)[:n]
    logits = index.double().reshape(-1, 1).repeat(1, 2) / 10
    collector.update((logits, torch.ones(n, 2), torch.ones(n, 2), index))
    windows = collector.compute()
    np.save(Path(out_dir) / f"rank{rank}.npy", np.concatenate([windows.index[:, None], windows.probs], axis=1))


def test_collector_all_gathers_unequal_shards_across_processes(tmp_path):
    with idist.Parallel(backend="gloo", nproc_per_node=2, start_method="fork") as parallel:
        parallel.run(_gather_in_process, str(tmp_path))
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(r0, r1)  # every rank sees the same, complete set
    assert r0[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(r0[:, 1], 1 / (1 + np.exp(-np.arange(5) / 10)))


# ---------------------------------------------------------------------------------------------- aggregation
def test_aggregate_mean_and_any_by_hand():
    values = np.array([[0.2, 0.1], [0.6, 0.3], [0.9, 0.0], [0.4, 0.8]])
    keys, mean = aggregate(values, ["b", "a", "b", "b"], "mean")
    assert keys == ["b", "a"]
    np.testing.assert_allclose(mean, [[0.5, 0.3], [0.6, 0.3]])
    _, anyv = aggregate(values, ["b", "a", "b", "b"], "any")
    np.testing.assert_allclose(anyv, [[0.9, 0.8], [0.6, 0.3]])
    with pytest.raises(ValueError, match="mean' or 'any"):
        aggregate(values, ["a"] * 4, "median")


def _windows(probs, recording_of_window):
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    return SimpleNamespace(probs=probs, targets=np.zeros((n, 2)), mask=np.ones((n, 2), bool),
                           index=np.arange(n)), list(recording_of_window)


def test_recordings_take_their_labels_and_window_means():
    recordings = [rec("p1_AV", "p1", (1.0, 0.0), (True, True), "Present"),
                  rec("p1_MV", "p1", (1.0, 1.0), (True, True), "Present"),
                  rec("p2_AV", "p2", (0.0, 0.0), (True, False), "Unknown")]
    windows, window_rec = _windows([[0.2, 0.4], [0.4, 0.6], [0.9, 0.9], [0.1, 0.3]], [0, 0, 1, 2])
    recs = recording_predictions(windows, window_rec, recordings)
    assert recs.ids == ["p1_AV", "p1_MV", "p2_AV"]
    np.testing.assert_allclose(recs.probs, [[0.3, 0.5], [0.9, 0.9], [0.1, 0.3]])
    assert recs.n_windows.tolist() == [2, 1, 1]
    np.testing.assert_array_equal(recs.targets, [[1, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(recs.mask, [[True, True], [True, True], [True, False]])

    patients = patient_predictions(recs, recordings, "mean")
    assert patients.ids == ["p1", "p2"]
    np.testing.assert_allclose(patients.probs, [[0.6, 0.7], [0.1, 0.3]])
    # p1's murmur is Present as a patient although its AV recording is Absent; p2's Unknown stays masked.
    np.testing.assert_array_equal(patients.targets, [[1, 1], [0, 0]])
    np.testing.assert_array_equal(patients.mask, [[True, True], [True, False]])
    assert patients.murmur_classes == ["Present", "Unknown"] and patients.n_windows.tolist() == [3, 1]
    any_patients = patient_predictions(recs, recordings, "any")
    np.testing.assert_allclose(any_patients.probs, [[0.9, 0.9], [0.1, 0.3]])


def test_a_recording_without_windows_is_an_error():
    windows, window_rec = _windows([[0.5, 0.5]], [0])
    with pytest.raises(ValueError, match="no window, e.g. b"):
        recording_predictions(windows, window_rec, [rec("a", "p"), rec("b", "p")])


def test_patient_labels_rules():
    assert patient_labels([rec("a", "p", (0.0, 1.0), (True, True), "Unknown")]) == ((0.0, 1.0), (True, True), "Unknown")
    masked = [rec("a", "p", (1.0, 0.0), (True, False), "Unknown")]
    assert patient_labels(masked) == ((1.0, 0.0), (True, False), "Unknown")
    # Without a CirCor class (PhysioNet 2016): the maximum of present labels; all masked stays masked.
    assert patient_labels([rec("a", "p", (0.0, 0.0), (True, False)), rec("b", "p", (1.0, 0.0), (True, False))]) \
        == ((1.0, 0.0), (True, False), None)


# ---------------------------------------------------------------------------------------------- thresholds
def _f1(y, p, t):
    return binary_stats(y, p >= t)["f1"]


def test_tune_thresholds_beats_half_on_a_constructed_case():
    # Heart probabilities are shifted low (a model calibrated on a rarer class): every positive is below 0.5.
    heart_p = np.array([0.05, 0.1, 0.15, 0.2, 0.3, 0.35, 0.4, 0.45])
    heart_y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    murmur_p = np.array([0.55, 0.6, 0.65, 0.7, 0.8, 0.85, 0.9, 0.95])
    murmur_y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    probs, targets = np.stack([heart_p, murmur_p], 1), np.stack([heart_y, murmur_y], 1)
    mask = np.ones_like(targets, dtype=bool)
    t = tune_thresholds(probs, targets, mask, "f1")
    assert _f1(heart_y, heart_p, 0.5) == 0.0 and _f1(heart_y, heart_p, t["heart"]) == 1.0
    assert 0.2 < t["heart"] < 0.3
    assert _f1(murmur_y, murmur_p, t["murmur"]) > _f1(murmur_y, murmur_p, 0.5)
    assert tune_thresholds(probs, targets, mask, "fixed") == {"heart": 0.5, "murmur": 0.5}
    # The challenge objective weighs a missed positive 5:1, so it never cuts higher than F1 here.
    assert tune_thresholds(probs, targets, mask, "challenge")["murmur"] <= t["murmur"]
    masked = mask.copy()
    masked[:, 1] = False
    assert tune_thresholds(probs, targets, masked, "f1")["murmur"] == 0.5


def test_unknown_band_and_murmur_classes():
    assert unknown_band(0.3, 0.1) == pytest.approx((0.2, 0.4))
    assert unknown_band(0.05, 0.1) == (0.0, pytest.approx(0.15))
    assert murmur_classes([0.45, 0.35, 0.25, 0.1], 0.3, 0.1) == ["Present", "Unknown", "Unknown", "Absent"]
    assert murmur_classes([0.31, 0.29], 0.3, 0.0) == ["Present", "Absent"]
    with pytest.raises(ValueError):
        unknown_band(0.5, -0.1)


# ---------------------------------------------------------------------------------------------- trainer hooks
class ShiftedModel(torch.nn.Module):
    """Logits that put every heart positive below 0.5: tuning must move the threshold down."""

    def forward(self, x):
        score = x[:, 0, 0]
        return torch.stack([score - 3.0, score], dim=1), torch.ones(x.shape[0], x.shape[2])


def _validation_setup():
    recordings = [rec(f"r{i}", f"p{i // 2}", (float(i % 2), 0.0), (True, False)) for i in range(6)]
    window_recording = [i for i in range(6) for _ in range(2)]  # two windows per recording
    x = torch.zeros(12, 1, 3)
    for w, r in enumerate(window_recording):
        x[w, 0, 0] = 1.0 + r % 2 + 0.1 * r  # positives score higher, all below the 0.5 cut after -3
    y = torch.tensor([[float(r % 2), 0.0] for r in window_recording])
    mask = torch.tensor([[1.0, 0.0]] * 12)
    batches = [(x[i:i + 4], y[i:i + 4], mask[i:i + 4], torch.arange(i, i + 4)) for i in range(0, 12, 4)]
    dataset = SimpleNamespace(window_recording=window_recording, recordings=recordings)
    trainer = Engine(lambda e, b: None)
    trainer.register_events(*TrainerEvents)
    evaluator = create_evaluator(ShiftedModel(), {"predictions": PredictionCollector()})
    attach_validation(trainer, evaluator, batches)
    return trainer, dataset, batches


def test_attach_threshold_tuning_stores_recording_level_thresholds():
    trainer, dataset, _ = _validation_setup()
    attach_threshold_tuning(trainer, "predictions", "f1", dataset)
    seen = []
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, lambda e: seen.append(dict(e.state.thresholds)))
    trainer.run([0], max_epochs=2)

    windows = trainer.state.validation_output.metrics["predictions"]
    recs = recording_predictions(windows, dataset.window_recording, dataset.recordings)
    heart_y, heart_p = recs.label("heart")
    assert seen == [trainer.state.thresholds] * 2
    assert trainer.state.thresholds["murmur"] == 0.5  # every murmur is masked
    assert trainer.state.thresholds["heart"] < 0.5
    assert _f1(heart_y, heart_p, trainer.state.thresholds["heart"]) == 1.0 > _f1(heart_y, heart_p, 0.5)
    assert not any(k.endswith(".threshold") for k in trainer.state.validation_metrics)  # scores only


def test_attach_pr_curves_writes_one_curve_per_present_label_at_the_epoch():
    trainer, dataset, _ = _validation_setup()
    calls = []
    writer = SimpleNamespace(add_pr_curve=lambda tag, labels, preds, step: calls.append((tag, labels, preds, step)))
    attach_pr_curves(trainer, SimpleNamespace(writer=writer), "predictions", dataset)
    trainer.run([0, 0, 0], max_epochs=1)
    assert [(c[0], c[3]) for c in calls] == [("val_pr/heart", 1)]  # murmur fully masked: no curve
    assert calls[0][1].tolist() == [0, 1, 0, 1, 0, 1]  # one entry per recording, not per window
    assert len(calls[0][2]) == 6


def test_attach_pr_curves_writes_tensorboard_events(tmp_path):
    from ignite.handlers import TensorboardLogger

    trainer, _, _ = _validation_setup()
    tb = TensorboardLogger(log_dir=str(tmp_path))
    attach_pr_curves(trainer, tb, "predictions")  # window level
    trainer.run([0], max_epochs=1)
    tb.close()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"val_pr/heart" in data and b"val_pr/murmur" not in data
