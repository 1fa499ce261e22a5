"""PerLabelMetrics and MaskedLoss: scikit-learn's numbers over present labels, on one process or two."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from ignite_trainer.data.records import LABELS
from ignite_trainer.training.losses import WeightedBCELoss
from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics
from ignite_trainer.scoring.scores import tune_threshold

STATS = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1")


def _make_batches(seed: int, sizes: list[int], mask_rate: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """Evaluator outputs as the engine produces them; masked targets hold NaN, which must never matter."""
    g = torch.Generator().manual_seed(seed)
    batches, start = [], 0
    for size in sizes:
        logits = torch.randn(size, 2, generator=g) * 2
        y = torch.randint(0, 2, (size, 2), generator=g).float()
        mask = torch.rand(size, 2, generator=g) >= mask_rate
        y = torch.where(mask, y, torch.full_like(y, float("nan")))
        batches.append({"logits": logits, "y": y, "mask": mask, "index": torch.arange(start, start + size)})
        start += size
    return batches


def _concat(batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.cat([b[k] for b in batches]) for k in ("logits", "y", "mask"))  # type: ignore[return-value]


def _sklearn_reference(batches, thresholds) -> dict[str, float]:
    """The expected numbers: scikit-learn on the present entries of the concatenated data."""
    logits, y, mask = _concat(batches)
    prob = torch.sigmoid(logits.float()).double().numpy()
    expected: dict[str, float] = {}
    f1s = []
    for j, label in enumerate(LABELS):
        keep = mask[:, j].numpy()
        t = y[keep, j].numpy().astype(int)
        p = (prob[keep, j] >= thresholds[j]).astype(int)
        if keep.any():
            prec, rec, f1, _ = precision_recall_fscore_support(t, p, average="binary", zero_division=0)
            tn, fp, fn, tp = confusion_matrix(t, p, labels=[0, 1]).ravel()
        else:  # scikit-learn refuses empty input; nothing present means every statistic is 0
            prec = rec = f1 = 0.0
            tn = fp = fn = tp = 0
        spec = tn / (tn + fp) if tn + fp else 0.0
        acc = (tp + tn) / keep.sum() if keep.any() else 0.0
        expected.update(
            {
                f"{label}.accuracy": acc,
                f"{label}.precision": prec,
                f"{label}.recall": rec,
                f"{label}.sensitivity": rec,
                f"{label}.specificity": spec,
                f"{label}.f1": f1,
                f"{label}.support": int(keep.sum()),
            }
        )
        if keep.any():
            f1s.append(f1)
    expected["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return expected


def _run_metric(metric: PerLabelMetrics | MaskedLoss, batches) -> object:
    metric.reset()
    for b in batches:
        metric.update(metric._output_transform(b))
    return metric.compute()


def _masked_mean_loss(batches, criterion) -> float:
    """Reference: the per-entry weighted BCE averaged over every present entry of the concatenation."""
    logits, y, mask = _concat(batches)
    y = torch.where(mask, y, torch.zeros_like(y))
    per_entry = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y, pos_weight=criterion.pos_weight, reduction="none"
    )
    return float(per_entry[mask].double().sum() / mask.sum())


def _assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert not math.isnan(actual[key]), key
        assert actual[key] == pytest.approx(value, abs=1e-12), key


# ---------------------------------------------------------------- PerLabelMetrics vs scikit-learn
@pytest.mark.parametrize("seed", range(6))
def test_per_label_metrics_match_sklearn_over_several_batches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    thresholds = tuple(float(x) for x in rng.uniform(0.05, 0.95, size=2))
    sizes = [int(s) for s in rng.integers(1, 20, size=int(rng.integers(2, 6)))]
    batches = _make_batches(seed, sizes, mask_rate=float(rng.uniform(0.0, 0.6)))

    result = _run_metric(PerLabelMetrics(thresholds=thresholds), batches)

    _assert_metrics_equal(result, _sklearn_reference(batches, thresholds))


def test_attached_to_an_engine_the_keys_are_flat_distinct_and_complete() -> None:
    batches = _make_batches(10, [7, 5, 9])
    evaluator = Engine(lambda engine, batch: batch)
    PerLabelMetrics().attach(evaluator, "per_label")
    criterion = WeightedBCELoss()
    MaskedLoss(criterion).attach(evaluator, "val_loss")
    evaluator.run(batches)

    metrics = evaluator.state.metrics
    expected_keys = {f"{label}.{s}" for label in LABELS for s in (*STATS, "support")} | {"macro_f1", "val_loss"}
    assert set(metrics) == expected_keys  # no nested copy under "per_label", nothing overwritten
    per_label = {k: v for k, v in metrics.items() if k != "val_loss"}
    _assert_metrics_equal(per_label, _sklearn_reference(batches, (0.5, 0.5)))
    assert metrics["val_loss"] == pytest.approx(_masked_mean_loss(batches, criterion), rel=1e-6)


def test_metrics_reset_between_runs() -> None:
    evaluator = Engine(lambda engine, batch: batch)
    PerLabelMetrics().attach(evaluator, "per_label")
    evaluator.run(_make_batches(11, [8, 8]))
    second = _make_batches(12, [6])
    evaluator.run(second)
    assert evaluator.state.metrics["heart.support"] == _sklearn_reference(second, (0.5, 0.5))["heart.support"]


# ---------------------------------------------------------------- edge cases
def _batch(logits, y, mask=None) -> dict[str, torch.Tensor]:
    logits, y = torch.tensor(logits, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    out = {"logits": logits, "y": y, "index": torch.arange(len(y))}
    if mask is not None:
        out["mask"] = torch.tensor(mask, dtype=torch.bool)
    return out


def test_no_positives_gives_none_where_a_ratio_does_not_exist() -> None:
    # truth all negative; heart predicts one positive (FP), murmur predicts none
    result = _run_metric(PerLabelMetrics(), [_batch([[2.0, -2.0], [-2.0, -2.0]], [[0, 0], [0, 0]])])
    assert result["heart.precision"] == result["heart.f1"] == 0.0 and result["heart.recall"] is None
    assert result["heart.specificity"] == 0.5 and result["heart.accuracy"] == 0.5
    assert result["murmur.precision"] is None and result["murmur.recall"] is None and result["murmur.f1"] is None
    assert result["murmur.specificity"] == 1.0 and result["murmur.accuracy"] == 1.0
    assert result["macro_f1"] == 0.0  # heart's F1 only: murmur's does not exist and does not halve it


def test_all_positives_gives_no_specificity() -> None:
    result = _run_metric(PerLabelMetrics(), [_batch([[2.0, 2.0], [-2.0, 2.0]], [[1, 1], [1, 1]])])
    assert result["heart.specificity"] is None and result["murmur.specificity"] is None
    assert result["heart.recall"] == 0.5 and result["heart.precision"] == 1.0
    assert result["heart.f1"] == pytest.approx(2 / 3)
    assert result["murmur.f1"] == 1.0
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_all_masked_gives_none_and_zero_support() -> None:
    nan = float("nan")
    result = _run_metric(PerLabelMetrics(), [_batch([[1.0, -1.0]] * 3, [[nan, nan]] * 3, [[False, False]] * 3)])
    assert all(result[f"{label}.{s}"] is None for label in LABELS for s in STATS)
    assert result["heart.support"] == result["murmur.support"] == 0
    assert result["macro_f1"] is None


def test_macro_f1_averages_only_labels_with_present_examples() -> None:
    # murmur is masked everywhere (PhysioNet 2016): macro F1 is the heart F1, not half of it
    batch = _batch([[2.0, 0.0], [2.0, 0.0], [-2.0, 0.0]], [[1, 0], [0, 0], [1, 0]], [[True, False]] * 3)
    result = _run_metric(PerLabelMetrics(), [batch])
    assert result["heart.f1"] == pytest.approx(0.5)  # TP 1, FP 1, FN 1
    assert result["murmur.support"] == 0
    assert result["macro_f1"] == pytest.approx(0.5)


def test_missing_mask_means_every_label_is_present() -> None:
    batch = _batch([[2.0, -2.0], [-2.0, 2.0]], [[1, 0], [1, 1]])
    result = _run_metric(PerLabelMetrics(), [batch])
    assert result["heart.support"] == result["murmur.support"] == 2
    assert result["heart.recall"] == 0.5 and result["murmur.recall"] == 1.0


def test_prediction_is_positive_at_exactly_the_threshold() -> None:
    # sigmoid(0) == 0.5 exactly: with threshold 0.5 it counts as positive
    result = _run_metric(PerLabelMetrics(), [_batch([[0.0, 0.0]], [[1, 0]])])
    assert result["heart.recall"] == 1.0 and result["murmur.specificity"] == 0.0


def test_compute_before_any_update_raises() -> None:
    with pytest.raises(NotComputableError):
        PerLabelMetrics().compute()
    with pytest.raises(NotComputableError):
        MaskedLoss(WeightedBCELoss()).compute()


def test_invalid_input_is_rejected() -> None:
    metric = PerLabelMetrics()
    with pytest.raises(ValueError):  # a present target that is not 0/1
        metric.update((torch.zeros(1, 2), torch.tensor([[0.5, 1.0]]), torch.ones(1, 2, dtype=torch.bool)))
    with pytest.raises(ValueError):  # wrong number of label columns
        metric.update((torch.zeros(1, 3), torch.zeros(1, 3), None))
    with pytest.raises(ValueError):  # mask shape
        metric.update((torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 1, dtype=torch.bool)))


# ---------------------------------------------------------------- thresholds
def test_thresholds_can_be_changed_after_construction() -> None:
    batches = _make_batches(20, [30, 30])
    metric = PerLabelMetrics(thresholds=(0.5, 0.5))
    default = _run_metric(metric, batches)
    metric.thresholds = (0.2, 0.8)
    assert metric.thresholds == (0.2, 0.8)
    changed = _run_metric(metric, batches)
    _assert_metrics_equal(changed, _sklearn_reference(batches, (0.2, 0.8)))
    assert changed["heart.recall"] > default["heart.recall"]  # lower threshold, more positives
    assert changed["murmur.recall"] < default["murmur.recall"]

    for bad in [(0.5,), (0.5, 1.5), (-0.1, 0.5)]:
        with pytest.raises(ValueError):
            metric.thresholds = bad
    assert metric.thresholds == (0.2, 0.8)  # a rejected value leaves the old one in place


def test_a_threshold_tuned_by_scores_reproduces_its_f1_in_the_metric() -> None:
    batches = _make_batches(21, [40, 40, 40], mask_rate=0.2)
    logits, y, mask = _concat(batches)
    prob = torch.sigmoid(logits).double().numpy()
    tuned = [tune_threshold(y[mask[:, j], j].numpy(), prob[mask[:, j].numpy(), j], "f1") for j in range(2)]

    result = _run_metric(PerLabelMetrics(thresholds=[t for t, _ in tuned]), batches)

    assert result["heart.f1"] == pytest.approx(tuned[0][1], abs=1e-12)
    assert result["murmur.f1"] == pytest.approx(tuned[1][1], abs=1e-12)


def test_a_tuned_midpoint_between_neighbouring_float32_probabilities_still_separates_them() -> None:
    # Find two logits whose float32 sigmoids are neighbours and whose float64 midpoint rounds, in
    # float32, onto the lower one: comparing in float32 would then call the negative positive.
    x = torch.tensor(0.3)
    for _ in range(10_000):
        nxt = torch.nextafter(x, torch.tensor(1.0))
        lo, hi = torch.sigmoid(x).item(), torch.sigmoid(nxt).item()
        if lo < hi and np.float32((lo + hi) / 2) == np.float32(lo):
            break
        x = nxt
    else:
        pytest.skip("no such pair of float32 sigmoids found")
    threshold, best = tune_threshold([0, 1], [lo, hi], "f1")
    assert best == 1.0 and lo < threshold < hi

    batch = {"logits": torch.stack([x, nxt]).repeat(2, 1).T.contiguous(), "y": torch.tensor([[0.0, 0.0], [1.0, 1.0]])}
    result = _run_metric(PerLabelMetrics(thresholds=(threshold, threshold)), [batch])

    assert result["heart.f1"] == 1.0 and result["heart.specificity"] == 1.0


# ---------------------------------------------------------------- MaskedLoss
def test_masked_loss_is_the_masked_mean_over_the_epoch_not_a_mean_of_batch_means() -> None:
    criterion = WeightedBCELoss(1.0, 2.5)
    # a big, fully labelled batch and a small one with a single present entry
    batches = _make_batches(30, [32], mask_rate=0.0) + _make_batches(31, [4], mask_rate=0.0)
    batches[1]["mask"][:] = False
    batches[1]["mask"][0, 1] = True
    batches[1]["logits"][0, 1] = 6.0
    batches[1]["y"][0, 1] = 0.0  # a confident mistake: a large loss on one entry

    value = _run_metric(MaskedLoss(criterion), batches)

    expected = _masked_mean_loss(batches, criterion)
    batch_means = float(np.mean([criterion(b["logits"], b["y"], b["mask"]).item() for b in batches]))
    assert value == pytest.approx(expected, rel=1e-6)
    assert abs(value - batch_means) > 0.5  # the two definitions really differ here


def test_masked_loss_ignores_all_masked_batches_and_fails_on_an_all_masked_epoch() -> None:
    criterion = WeightedBCELoss()
    batches = _make_batches(32, [10, 10])
    empty = _make_batches(33, [5], mask_rate=1.0)
    assert _run_metric(MaskedLoss(criterion), batches + empty) == pytest.approx(
        _run_metric(MaskedLoss(criterion), batches), rel=1e-12
    )
    with pytest.raises(NotComputableError):
        _run_metric(MaskedLoss(criterion), empty)


# ---------------------------------------------------------------- checkpointing
def test_state_dict_round_trip_restores_the_counts() -> None:
    first, second = _make_batches(40, [10, 10]), _make_batches(41, [10])
    metric = PerLabelMetrics(thresholds=(0.3, 0.6))
    _run_metric(metric, first)
    restored = PerLabelMetrics(thresholds=(0.3, 0.6))
    restored.load_state_dict(metric.state_dict())
    for b in second:
        restored.update(restored._output_transform(b))
    _assert_metrics_equal(restored.compute(), _sklearn_reference(first + second, (0.3, 0.6)))

    loss = MaskedLoss(WeightedBCELoss())
    _run_metric(loss, first)
    loss_restored = MaskedLoss(WeightedBCELoss())
    loss_restored.load_state_dict(loss.state_dict())
    assert loss_restored.compute() == loss.compute()



# ---------------------------------------------------------------- two processes (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_shard(local_rank: int, shards: list, thresholds: tuple[float, float], out_dir: str) -> None:
    """Runs in each spawned process: an evaluator over this rank's shard, results saved per rank."""
    rank = idist.get_rank()
    evaluator = Engine(lambda engine, batch: batch)
    PerLabelMetrics(thresholds=thresholds).attach(evaluator, "per_label")
    MaskedLoss(WeightedBCELoss()).attach(evaluator, "val_loss")
    evaluator.run(shards[rank])
    torch.save(dict(evaluator.state.metrics), Path(out_dir) / f"rank{rank}.pt")


def test_two_gloo_processes_give_the_numbers_of_one_process_on_all_data(tmp_path: Path) -> None:
    thresholds = (0.4, 0.6)
    # uneven shards: different numbers of batches, sizes and masking per rank
    shards = [_make_batches(60, [9, 4, 13], mask_rate=0.2), _make_batches(61, [6], mask_rate=0.5)]
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_addr="127.0.0.1", master_port=_free_port()) as par:
        par.run(_evaluate_shard, shards, thresholds, str(tmp_path))

    everything = shards[0] + shards[1]
    expected = _sklearn_reference(everything, thresholds)
    expected_loss = _masked_mean_loss(everything, WeightedBCELoss())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
        _assert_metrics_equal({k: v for k, v in got.items() if k != "val_loss"}, expected)
        # the reduction really happened: this rank's shard alone has fewer present labels
        local = _sklearn_reference(shards[rank], thresholds)
        assert local["heart.support"] + local["murmur.support"] < got["heart.support"] + got["murmur.support"]
