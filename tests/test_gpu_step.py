"""On CUDA only (skipped elsewhere): the training step, the metrics' updates and the resident loader never
synchronise with the host, checked by CUDA's own sync debug mode, which raises on any synchronising call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ignite_trainer.training.engine import create_trainer
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.training.losses import WeightedBCELoss
from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics

from conftest import TinyModel, make_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class CudaTiny(TinyModel):
    def forward(self, x):
        return self.linear(x.mean(dim=-1)), x.mean(dim=1)


def pinned(batches):
    return [tuple(t.pin_memory() for t in b) for b in batches]


def test_the_step_never_synchronises_and_skips_a_bad_step() -> None:
    torch.manual_seed(0)
    model = CudaTiny().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    loss_fn = WeightedBCELoss().cuda()
    trainer = create_trainer(model, optimizer, loss_fn, "cuda", amp=True, accumulation_steps=2, sync_every=1000)
    step = trainer._process_function

    def strict(engine, batch):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(engine, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer._process_function = strict
    trainer.run(pinned(make_batches(n_batches=6)), max_epochs=2)
    stats = trainer.state.step_stats
    assert stats.first_bad_iteration is None and stats.iterations == list(range(7, 13))
    assert torch.isfinite(torch.tensor(stats.losses)).all()


def test_metric_updates_never_synchronise() -> None:
    per_label, loss = PerLabelMetrics(device="cuda"), MaskedLoss(WeightedBCELoss().cuda(), device="cuda")
    per_label.reset(), loss.reset()
    batches = [(torch.randn(16, 2, device="cuda"), torch.randint(0, 2, (16, 2), device="cuda").float(),
                torch.ones(16, 2, device="cuda")) for _ in range(3)]
    per_label.update(batches[0])  # builds its threshold tensor once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            per_label.update(b)
            loss.update(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert per_label.compute()["heart.support"] == 48
    bad = (torch.zeros(1, 2, device="cuda"), torch.tensor([[0.5, 1.0]], device="cuda"), torch.ones(1, 2, device="cuda"))
    per_label.update(bad)  # not 0/1: found on the device, reported by compute
    with pytest.raises(ValueError, match="0 or 1"):
        per_label.compute()


def test_fp16_on_cuda_needs_the_callers_scaler() -> None:
    model = CudaTiny().cuda()
    with pytest.raises(ConfigError, match="GradScaler"):
        create_trainer(model, torch.optim.AdamW(model.parameters(), fused=True), F.binary_cross_entropy_with_logits,
                       "cuda", amp=True, amp_dtype_name="float16")
    create_trainer(model, torch.optim.AdamW(model.parameters(), fused=True), F.binary_cross_entropy_with_logits,
                   "cuda", amp=True, amp_dtype_name="float16", scaler=torch.amp.GradScaler("cuda"))
