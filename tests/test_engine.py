"""The update step: pre-clip norm, clipping, non-finite steps never applied, accumulation, AMP on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from ignite_trainer.training.engine import create_evaluator, create_trainer
from ignite_trainer.core.errors import TrainingAborted
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.training.handlers import attach_nan_guard

from conftest import TinyModel


def bce(logits, y, mask=None):
    return F.binary_cross_entropy_with_logits(logits, y)


class ScaledLoss(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, logits, y, mask=None):
        return self.scale * F.binary_cross_entropy_with_logits(logits, y)


def test_reported_grad_norm_is_the_pre_clip_norm(tiny_model, batches):
    reference = TinyModel()
    reference.load_state_dict(tiny_model.state_dict())
    x, y, mask, _ = batches[0]
    bce(reference(x)[0], y).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()

    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    trainer = create_trainer(tiny_model, opt, bce, gradient_clip=1e-6)
    trainer.run(batches[:1], max_epochs=1)
    assert trainer.state.output["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert trainer.state.output["grad_norm"] > 1e-6  # far above the clip: reported before clipping


def test_clipping_bounds_an_exploding_gradient(tiny_model, batches):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    opt = torch.optim.SGD(tiny_model.parameters(), lr=1.0)
    trainer = create_trainer(tiny_model, opt, ScaledLoss(1e6), gradient_clip=1.0)
    trainer.run(batches[:1], max_epochs=1)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(tiny_model.parameters(), before)])
    assert trainer.state.output["grad_norm"] > 1e4
    assert step.norm().item() == pytest.approx(1.0, rel=1e-4)  # lr 1: the applied step is the clipped gradient


def test_without_clipping_the_step_is_not_bounded(tiny_model, batches):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=1.0), ScaledLoss(1e6), gradient_clip=0)
    trainer.run(batches[:1], max_epochs=1)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(tiny_model.parameters(), before)])
    assert step.norm().item() > 1e4


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_is_never_applied_and_the_guard_names_the_iteration(tiny_model, batches, bad):
    calls = []

    def loss(logits, y, mask=None):
        calls.append(1)
        value = bce(logits, y)
        return value * bad if len(calls) == 3 else value

    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.1), loss)
    attach_nan_guard(trainer)
    snapshot = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2),
                              lambda: snapshot.update({k: v.clone() for k, v in tiny_model.state_dict().items()}))
    with pytest.raises(TrainingAborted, match=r"non-finite loss \((nan|inf)\) at epoch 1, iteration 3"):
        trainer.run(batches, max_epochs=1)
    for k, v in tiny_model.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, snapshot[k])


def test_non_finite_gradient_is_caught(tiny_model, batches):
    def inf_grad_loss(logits, y, mask=None):
        return bce(logits, y) + (logits.sum() * 0.0).abs().sqrt()  # finite value, d/dx sqrt(|0|) = inf

    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.1), inf_grad_loss)
    attach_nan_guard(trainer)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(TrainingAborted, match="non-finite gradient norm .* iteration 1"):
        trainer.run(batches, max_epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def test_accumulation_equals_one_step_over_the_combined_batch(batches):
    torch.manual_seed(0)
    a, b = TinyModel(), TinyModel()
    b.load_state_dict(a.state_dict())
    trainer = create_trainer(a, torch.optim.SGD(a.parameters(), lr=0.5), bce, accumulation_steps=2, gradient_clip=0)
    trainer.run(batches[:2], max_epochs=1)
    combined = tuple(torch.cat([batches[0][i], batches[1][i]]) for i in range(4))
    create_trainer(b, torch.optim.SGD(b.parameters(), lr=0.5), bce, gradient_clip=0).run([combined], max_epochs=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_accumulation_micro_steps_do_not_update_and_the_epoch_s_last_micro_batch_steps(tiny_model, batches):
    snapshots = [{k: v.clone() for k, v in tiny_model.state_dict().items()}]
    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.5), bce, accumulation_steps=3)
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda: snapshots.append({k: v.clone() for k, v in tiny_model.state_dict().items()}))
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output["grad_norm"]))
    trainer.run(batches, max_epochs=1)  # 4 iterations: a window of 3, then a short one of 1
    changed = [not all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [False, False, True, True]
    assert [math.isnan(g) for g in outputs] == [True, True, False, False]


def test_amp_on_cpu_runs_in_bfloat16(tiny_model, batches):
    seen = []
    tiny_model.linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = create_trainer(tiny_model, torch.optim.AdamW(tiny_model.parameters()), bce, amp=True)
    trainer.run(batches, max_epochs=2)
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert math.isfinite(trainer.state.output["loss"])  # bf16 needs no loss scaling: no scaler was passed or made


def test_train_loss_is_the_epoch_mean(tiny_model, batches):
    losses = []
    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.0 + 1e-9), bce)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.run(batches, max_epochs=1)
    assert trainer.state.metrics["train_loss"] == pytest.approx(sum(losses) / len(losses))


def test_custom_events_are_registered(tiny_model):
    trainer = create_trainer(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=0.1), bce)
    for event in TrainerEvents:
        assert trainer.has_registered_events(event)


def test_evaluator_outputs_float32_logits_and_keeps_the_model_unchanged(tiny_model, batches):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    evaluator = create_evaluator(tiny_model, {}, amp=True)
    out = evaluator.run(batches[:1]).output
    assert set(out) == {"logits", "y", "mask", "index"}
    assert out["logits"].dtype == torch.float32 and out["logits"].shape == (8, 2)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
