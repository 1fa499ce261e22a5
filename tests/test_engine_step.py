"""The update step against a plain reference loop: bit-identical on CPU, accumulation windows inside an
epoch (resume at an epoch boundary is exact), the device-side non-finite check and the step statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from ignite_trainer.training.engine import (
    StepEvents,
    accumulation_window,
    check_accumulation,
    create_trainer,
)
from ignite_trainer.core.errors import ConfigError, TrainingAborted
from ignite_trainer.training.handlers import attach_nan_guard

from conftest import TinyModel, make_batches


def masked_bce(logits, y, mask=None):
    return F.binary_cross_entropy_with_logits(logits, y, weight=mask)


def fresh(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel()


def adamw(model, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01, fused=fused or None)


def reference_run(model, optimizer, batches, epochs: int, accumulation: int, clip: float) -> list[float]:
    """The plain loop: windows restart every epoch, the short last one divided by its real size."""
    losses = []
    for _ in range(epochs):
        starts = range(0, len(batches), accumulation)
        for start in starts:
            window = batches[start:start + accumulation]
            for x, y, mask, _ in window:
                loss = masked_bce(model(x)[0].float(), y, mask)
                losses.append(loss.item())
                (loss / len(window)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_accumulation_windows_restart_each_epoch_and_close_on_its_last_micro_batch() -> None:
    assert [accumulation_window(p, 3, 4) for p in range(1, 5)] == [(3, False), (3, False), (3, True), (1, True)]
    assert [accumulation_window(p, 2, 4) for p in range(1, 5)] == [(2, False), (2, True), (2, False), (2, True)]
    assert [accumulation_window(p, 4, 5)[1] for p in range(1, 6)] == [False, False, False, True, True]
    assert accumulation_window(7, 3, None) == (3, False) and accumulation_window(6, 3, None) == (3, True)


def test_check_accumulation_refuses_a_window_longer_than_an_epoch() -> None:
    check_accumulation(4, 4)
    with pytest.raises(ConfigError, match=r"accumulation_steps=1000 is more than the 4 iterations of an epoch"):
        check_accumulation(1000, 4)
    with pytest.raises(ConfigError, match="accumulation_steps=0"):
        check_accumulation(0, 4)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_cpu_step_is_bit_identical_to_a_plain_loop(accumulation: int) -> None:
    batches = make_batches(n_batches=4, mask_prob=0.2)
    ours, ref = fresh(), fresh()
    trainer = create_trainer(ours, adamw(ours), masked_bce, gradient_clip=0.5, accumulation_steps=accumulation)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.run(batches, max_epochs=2)
    expected = reference_run(ref, adamw(ref), batches, 2, accumulation, 0.5)
    assert losses == expected
    assert_same_parameters(ours, ref)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_resume_at_an_epoch_boundary_equals_the_uninterrupted_run(accumulation: int) -> None:
    batches = make_batches(n_batches=4)
    whole = fresh()
    whole_opt = adamw(whole)
    create_trainer(whole, whole_opt, masked_bce, accumulation_steps=accumulation).run(batches, max_epochs=3)

    first = fresh()
    opt = adamw(first)
    trainer = create_trainer(first, opt, masked_bce, accumulation_steps=accumulation)
    trainer.run(batches, max_epochs=1)
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict(), "trainer": trainer.state_dict()})

    resumed = fresh(seed=1)  # other weights: everything must come from the saved state
    resumed.load_state_dict(saved["model"])
    opt2 = adamw(resumed)
    opt2.load_state_dict(saved["opt"])
    trainer2 = create_trainer(resumed, opt2, masked_bce, accumulation_steps=accumulation)
    trainer2.load_state_dict(saved["trainer"])
    trainer2.run(batches, max_epochs=3)
    assert_same_parameters(resumed, whole)
    for a, b in zip(opt2.state.values(), whole_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_device_check_gives_the_host_check_s_results(accumulation: int) -> None:
    batches = make_batches(n_batches=4)
    host, dev = fresh(), fresh()
    host_opt, dev_opt = adamw(host, fused=True), adamw(dev, fused=True)
    create_trainer(host, host_opt, masked_bce, accumulation_steps=accumulation, check_on_device=False).run(batches, max_epochs=2)
    trainer = create_trainer(dev, dev_opt, masked_bce, accumulation_steps=accumulation, check_on_device=True)
    trainer.run(batches, max_epochs=2)
    assert torch.is_tensor(trainer.state.output["loss"])
    assert_same_parameters(dev, host)
    for a, b in zip(dev_opt.state.values(), host_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def poisoned_loss(bad_call: int):
    calls = []

    def loss(logits, y, mask=None):
        calls.append(1)
        value = masked_bce(logits, y, mask)
        return value * math.nan if len(calls) == bad_call else value

    return loss


def test_device_check_skips_the_bad_step_and_every_later_one_and_names_the_first() -> None:
    batches = make_batches(n_batches=6)
    model = fresh()
    opt = adamw(model, fused=True)
    trainer = create_trainer(model, opt, poisoned_loss(3), check_on_device=True, sync_every=50)
    snapshot = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda: snapshot.update(
        model={k: v.clone() for k, v in model.state_dict().items()},
        opt={k: {n: t.clone() for n, t in s.items()} for k, s in opt.state.items()}))
    reads = []
    trainer.add_event_handler(StepEvents.STATS_READ, lambda e: reads.append(e.state.iteration))
    trainer.run(batches, max_epochs=1)  # no guard: the run goes on, but nothing after the fault is applied
    stats = trainer.state.step_stats
    assert reads == [6]  # one read, at the epoch's end
    assert stats.first_bad_iteration == 3 and stats.first_bad_epoch == 1 and math.isnan(stats.first_bad_loss)
    assert stats.iterations == list(range(1, 7)) and math.isnan(stats.losses[2]) and math.isfinite(stats.losses[3])
    assert all(torch.equal(v, snapshot["model"][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(t, snapshot["opt"][k][n]) for k, s in opt.state.items() for n, t in s.items())


@pytest.mark.parametrize("on_device", [False, True])
def test_the_existing_guard_still_names_the_first_bad_iteration(on_device: bool) -> None:
    model = fresh()
    trainer = create_trainer(model, adamw(model, fused=True), poisoned_loss(3), check_on_device=on_device)
    attach_nan_guard(trainer)
    with pytest.raises(TrainingAborted, match=r"non-finite loss \(nan\) at epoch 1, iteration 3"):
        trainer.run(make_batches(n_batches=6), max_epochs=1)


def test_stats_are_read_every_n_iterations_and_at_epoch_end_with_every_value() -> None:
    model = fresh()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), masked_bce, sync_every=4,
                             accumulation_steps=2)
    seen, outputs = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.add_event_handler(StepEvents.STATS_READ, lambda e: seen.append(
        (e.state.iteration, list(e.state.step_stats.iterations), list(e.state.step_stats.losses),
         list(e.state.step_stats.grad_norms))))
    trainer.run(make_batches(n_batches=6), max_epochs=2)  # reads at 4, 6 (epoch end), 8, 12
    assert [s[0] for s in seen] == [4, 6, 8, 12]
    assert [i for s in seen for i in s[1]] == list(range(1, 13))
    assert [v for s in seen for v in s[2]] == [o["loss"] for o in outputs]
    norms = [v for s in seen for v in s[3]]
    assert all((math.isnan(a) and math.isnan(o["grad_norm"])) or a == o["grad_norm"] for a, o in zip(norms, outputs))
    assert trainer.state.step_stats.first_bad_iteration is None


def test_amp_float16_is_available_on_request() -> None:
    model = fresh()
    seen = []
    model.linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = create_trainer(model, adamw(model), masked_bce, amp=True, amp_dtype_name="float16")
    trainer.run(make_batches(n_batches=2), max_epochs=1)
    assert seen == [torch.float16, torch.float16]  # CPU fp16 autocast needs no scaler
    with pytest.raises(ConfigError, match="amp_dtype='int8'"):
        create_trainer(model, adamw(model), masked_bce, amp=True, amp_dtype_name="int8")


def test_device_check_reads_nothing_to_the_host_inside_an_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU stand-in for CUDA's sync check: no Python-level read of a tensor's value inside the step."""
    reads: list[str] = []
    counting = [False]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if counting[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    model = fresh()
    trainer = create_trainer(model, adamw(model, fused=True), masked_bce, accumulation_steps=3, check_on_device=True)
    step = trainer._process_function

    def watched(engine, batch):
        counting[0] = True
        try:
            return step(engine, batch)
        finally:
            counting[0] = False

    trainer._process_function = watched
    trainer.run(make_batches(n_batches=4), max_epochs=2)
    assert reads == []
    assert trainer.state.step_stats.iterations == [5, 6, 7, 8]  # and the reads happened outside the step
