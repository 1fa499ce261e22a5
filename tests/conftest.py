"""Shared fixtures: a tiny model and batches with the project's batch layout ``(x, y, mask, index)``."""

import pytest
import torch


class TinyModel(torch.nn.Module):
    """Mean over time, then a linear layer: ``(logits [B, 2], attention [B, T])`` like the real models."""

    def __init__(self, n_mels: int = 4):
        super().__init__()
        self.linear = torch.nn.Linear(n_mels, 2)

    def forward(self, x):
        attention = torch.full(x.shape[:1] + x.shape[2:], 1.0 / x.shape[-1])
        return self.linear(x.mean(dim=-1)), attention


def make_batches(n_batches=4, batch_size=8, n_mels=4, frames=6, seed=0, mask_prob=0.0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        x = torch.randn(batch_size, n_mels, frames, generator=g)
        y = (torch.rand(batch_size, 2, generator=g) > 0.5).float()
        mask = (torch.rand(batch_size, 2, generator=g) >= mask_prob).float()
        batches.append((x, y, mask, torch.arange(i * batch_size, (i + 1) * batch_size)))
    return batches


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyModel()


@pytest.fixture
def batches():
    return make_batches()
