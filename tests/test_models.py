"""Model registry and the output contract ``(logits [B, 2], attention [B, T'])``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ignite_trainer import models
from ignite_trainer.errors import ConfigError
from ignite_trainer.models import available_models, build_model, register_model

BUILT_IN = ["attention_cnn", "mean_pool_cnn"]


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("n_mels,frames,steps", [(64, 400, 100), (32, 97, 25), (8, 50, 13)])
def test_output_shapes_and_attention_is_a_distribution(name: str, n_mels: int, frames: int, steps: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, n_mels=n_mels).eval()
    logits, attention = model(torch.randn(3, n_mels, frames))
    assert logits.shape == (3, 2) and attention.shape == (3, steps)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(3))


def test_attention_depends_on_the_input() -> None:
    torch.manual_seed(0)
    model = build_model("attention_cnn", n_mels=64).eval()
    _, attention = model(torch.randn(2, 64, 200))
    assert not torch.allclose(attention[0], attention[1])
    assert not torch.allclose(attention[0], torch.full_like(attention[0], 1 / attention.shape[1]))


@pytest.mark.parametrize("name", BUILT_IN)
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, n_mels=64).train()
    logits, _ = model(torch.randn(4, 64, 120))
    nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0]] * 4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.fixture
def one_thread():
    """Small CPU steps gain nothing from a second thread, and on a busy machine its spin-waiting can make
    them ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_default_model_learns_a_murmur_like_band_between_beats(one_thread: None) -> None:
    """Positive windows carry a faint stripe in a few mid bands in part of each 'beat'; negatives do not."""
    torch.manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 32, 100)
        y = (torch.rand(n) < 0.5).float()
        for i in torch.nonzero(y).flatten().tolist():
            for beat in range(0, 100, 25):
                offset = int(torch.randint(0, 10, ()).item())
                x[i, 12:18, beat + offset:beat + offset + 8] += 1.5
        return x, torch.stack([y, 1 - y], dim=1)

    model = build_model("attention_cnn", n_mels=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        x, y = batch(32)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x)[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, y = batch(200)
    with torch.no_grad():
        predicted = (model(x)[0] > 0).float()
    assert (predicted == y).float().mean() > 0.9


def test_registry_lists_builds_and_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(BUILT_IN) <= set(available_models())
    assert isinstance(build_model("attention_cnn", n_mels=64), models.AttentionCNN)
    assert isinstance(build_model("mean_pool_cnn", n_mels=64), models.MeanPoolCNN)

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # keep the real registry clean

    @register_model("tiny_linear")
    class TinyLinear(nn.Module):
        def __init__(self, n_mels: int, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale
            self.linear = nn.Linear(n_mels, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.linear(x.mean(dim=2)) * self.scale, torch.full(x.shape[::2], 1 / x.shape[2])

    assert "tiny_linear" in available_models()
    built = build_model("tiny_linear", n_mels=16, scale=2.0)
    assert isinstance(built, TinyLinear) and built.scale == 2.0

    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_linear")(nn.Identity)
    with pytest.raises(ConfigError, match="attention_cnn.*mean_pool_cnn") as info:
        build_model("resnet9000", n_mels=64)
    assert "resnet9000" in str(info.value)
    with pytest.raises(ConfigError, match="attention_cnn.*hidden_size"):
        build_model("attention_cnn", n_mels=64, hidden_size=3)
