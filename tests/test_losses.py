"""WeightedBCELoss: equal to PyTorch's weighted BCE when nothing is masked, blind to masked entries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ignite_trainer.training.losses import WeightedBCELoss

POS_WEIGHT = torch.tensor([1.0, 2.5])


def _batch(seed: int = 0, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 2, generator=g) * 3
    targets = torch.randint(0, 2, (batch, 2), generator=g).float()
    mask = torch.rand(batch, 2, generator=g) > 0.3
    mask[0] = True  # at least one present entry per label
    return logits, targets, mask


@pytest.mark.parametrize("mask_kind", ["none", "all_ones_bool", "all_ones_float"])
def test_unmasked_equals_pytorch_weighted_bce_value_and_gradient(mask_kind: str) -> None:
    logits, targets, _ = _batch()
    mask = {"none": None, "all_ones_bool": torch.ones(16, 2, dtype=torch.bool), "all_ones_float": torch.ones(16, 2)}[
        mask_kind
    ]
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)

    loss = WeightedBCELoss(1.0, 2.5)(ours_in, targets, mask)
    ref = F.binary_cross_entropy_with_logits(ref_in, targets, pos_weight=POS_WEIGHT)
    loss.backward()
    ref.backward()

    assert loss.shape == ()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ours_in.grad, ref_in.grad)


def test_pos_weight_is_applied_per_label() -> None:
    # One positive murmur target with logit 0: unweighted BCE is ln 2, weighted 2.5·ln 2.
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[0.0, 1.0]])
    only_murmur = torch.tensor([[False, True]])
    only_heart = torch.tensor([[True, False]])
    crit = WeightedBCELoss(pos_weight_heart=1.0, pos_weight_murmur=2.5)
    ln2 = torch.log(torch.tensor(2.0))
    torch.testing.assert_close(crit(logits, targets, only_murmur), 2.5 * ln2)
    # the heart target is negative: pos_weight does not touch it
    torch.testing.assert_close(crit(logits, targets, only_heart), ln2)


def test_masked_loss_is_mean_over_present_entries_only() -> None:
    logits, targets, mask = _batch(seed=1)
    loss = WeightedBCELoss()(logits, targets, mask)
    per_entry = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=POS_WEIGHT, reduction="none")
    expected = per_entry[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    # and it is not the unmasked mean (the mask really matters in this batch)
    assert not torch.isclose(loss, per_entry.mean())


def test_masked_entries_neither_change_the_loss_nor_receive_gradient() -> None:
    logits, targets, mask = _batch(seed=2)
    crit = WeightedBCELoss()

    a = logits.clone().requires_grad_(True)
    loss_a = crit(a, targets, mask)
    loss_a.backward()

    # Scramble everything behind the mask, including NaN targets (a masked label "carries no meaning").
    b_logits = logits.clone()
    b_logits[~mask] = torch.randn(int((~mask).sum())) * 50
    b_targets = targets.clone()
    b_targets[~mask] = float("nan")
    b = b_logits.requires_grad_(True)
    loss_b = crit(b, b_targets, mask)
    loss_b.backward()

    torch.testing.assert_close(loss_a, loss_b)
    assert torch.isfinite(b.grad).all()
    assert torch.all(a.grad[~mask] == 0) and torch.all(b.grad[~mask] == 0)
    torch.testing.assert_close(a.grad[mask], b.grad[mask])
    assert torch.all(a.grad[mask] != 0)


def test_all_masked_batch_gives_zero_loss_that_still_backpropagates() -> None:
    logits = torch.randn(4, 2, requires_grad=True)
    targets = torch.full((4, 2), float("nan"))
    loss = WeightedBCELoss()(logits, targets, torch.zeros(4, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_pos_weight_is_a_buffer_that_follows_the_module_and_not_the_state_dict() -> None:
    crit = WeightedBCELoss(0.5, 3.0)
    assert dict(crit.named_buffers())["pos_weight"].tolist() == [0.5, 3.0]
    assert "pos_weight" not in crit.state_dict()  # comes from the config, never restored over it
    moved = crit.to(torch.float64)
    assert moved.pos_weight.dtype == torch.float64
    logits, targets, mask = _batch(seed=3)
    out = moved(logits.double(), targets.double(), mask)
    assert out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_after_to_device() -> None:
    logits, targets, mask = _batch(seed=4)
    crit = WeightedBCELoss().to("cuda")
    assert crit.pos_weight.device.type == "cuda"
    out = crit(logits.cuda(), targets.cuda(), mask.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), WeightedBCELoss()(logits, targets, mask))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_float32(dtype: torch.dtype) -> None:
    logits, targets, mask = _batch(seed=5)
    low = logits.to(dtype)
    out = WeightedBCELoss()(low, targets, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, WeightedBCELoss()(low.float(), targets, mask))


def test_under_cpu_autocast_the_loss_stays_float32_and_backpropagates() -> None:
    g = torch.Generator().manual_seed(6)
    layer = torch.nn.Linear(8, 2)
    x = torch.randn(16, 8, generator=g)
    _, targets, mask = _batch(seed=6)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16  # autocast is really active
        loss = WeightedBCELoss()(logits, targets, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, WeightedBCELoss()(logits.detach().float(), targets, mask))
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize(
    "logits_shape,targets_shape,mask_shape",
    [((4, 3), (4, 3), None), ((4, 2), (4, 1), None), ((4, 2), (4, 2), (4, 1)), ((8,), (8,), None)],
)
def test_shape_mismatches_are_rejected(logits_shape, targets_shape, mask_shape) -> None:
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError):
        WeightedBCELoss()(torch.zeros(logits_shape), torch.zeros(targets_shape), mask)


@pytest.mark.parametrize("weights", [(0.0, 1.0), (1.0, -2.0), (float("nan"), 1.0), (1.0, float("inf"))])
def test_invalid_pos_weights_are_rejected(weights) -> None:
    with pytest.raises(ValueError):
        WeightedBCELoss(*weights)
