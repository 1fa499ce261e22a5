"""Model registry, the output contract ``(logits [B, 2], attention [B, T'])``, the ways a model is computed
(channels-last, BatchNorm folded at evaluation) and demographics fusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ignite_trainer.model import cnn, registry
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.data.demographics import DEMOGRAPHIC_FEATURES, Demographics, encode_demographics
from ignite_trainer.model.fusion import N_DEMOGRAPHIC, DemographicsFusion
from ignite_trainer.model.registry import available_models, build_model, register_model

#: The attention score's output bias adds the same number to every step before the softmax, so its gradient is
#: zero up to rounding: it is the one parameter no loss can move.
SHIFT_INVARIANT = "pool.score.2.bias"
BUILT_IN = ["attention_cnn", "mean_pool_cnn", "strided_attention_cnn", "resnet_attention"]


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
        if not pname.endswith(SHIFT_INVARIANT):
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
    assert isinstance(build_model("attention_cnn", n_mels=64), cnn.AttentionCNN)
    assert isinstance(build_model("mean_pool_cnn", n_mels=64), cnn.MeanPoolCNN)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the real registry clean

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


# ---------------------------------------------------------------------------------------------- how it is computed
def trained_a_little(name: str, n_mels: int = 16, **options: object) -> nn.Module:
    """A model after three optimiser steps, so that BatchNorm's running statistics and affine are not trivial."""
    torch.manual_seed(0)
    model = build_model(name, n_mels=n_mels, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        logits, _ = model(torch.randn(6, n_mels, 40) * 2 + 0.5)
        logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("name", BUILT_IN)
def test_folded_batchnorm_in_evaluation_equals_the_unfolded_output(name: str) -> None:
    folded = trained_a_little(name)
    unfolded = build_model(name, n_mels=16, fold_bn=False).eval()
    unfolded.load_state_dict(folded.state_dict())
    x = torch.randn(5, 16, 40)
    with torch.no_grad():
        (a, att_a), (b, att_b) = folded(x), unfolded(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att_a, att_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BUILT_IN)
def test_channels_last_computes_the_same_function(name: str) -> None:
    """Training mode (batch statistics, same dropout draws) and evaluation, forward and gradients."""
    nhwc = build_model(name, n_mels=16)
    nchw = build_model(name, n_mels=16, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    convs = [m for m in nhwc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert_same_function(nhwc, nchw)


def assert_same_function(model: nn.Module, other: nn.Module) -> None:
    """A training step (batch statistics, the same dropout draws) and evaluation give the same outputs,
    gradients and running statistics, up to float rounding."""
    x = torch.randn(4, 16, 40)
    outputs = []
    for m in (model, other):
        torch.manual_seed(1)
        logits, attention = m.train()(x)
        logits.sum().backward()
        with torch.no_grad():
            outputs.append((logits, attention, m.eval()(x)[0]))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for (pname, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=pname)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_attention_cnn_keeps_its_original_function() -> None:
    """conv 3x3 -> BN -> GELU -> max-pool per block, written out by hand: checkpoints of the original model
    must keep meaning what they meant."""
    model = trained_a_little("attention_cnn")
    layers: list[nn.Module] = []
    for i in range(4):
        conv, bn = model.trunk.blocks[4 * i], model.trunk.blocks[4 * i + 1]
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False)
        plain.weight.data.copy_(conv.weight.contiguous())
        layers += [plain, bn, nn.GELU(), nn.MaxPool2d((2, 2 if i < 2 else 1), ceil_mode=True)]
    reference = nn.Sequential(*layers).eval()
    x = torch.randn(3, 16, 40)
    with torch.no_grad():
        h = reference(x.unsqueeze(1))
        b, c, f, t = h.shape
        pooled, _ = model.pool(model.project(h.reshape(b, c * f, t).transpose(1, 2)))
        torch.testing.assert_close(model(x)[0], model.head(pooled), rtol=1e-5, atol=1e-5)


def test_strided_layout_is_its_own_name_with_the_same_shapes() -> None:
    torch.manual_seed(0)
    pooled, strided = build_model("attention_cnn", n_mels=64), build_model("strided_attention_cnn", n_mels=64)
    assert isinstance(strided, cnn.StridedAttentionCNN)
    assert {k: v.shape for k, v in pooled.state_dict().items()} == {k: v.shape for k, v in strided.state_dict().items()}
    assert not any(isinstance(m, nn.MaxPool2d) for m in strided.modules())
    assert build_model("attention_cnn", n_mels=64, downsample="stride").trunk.blocks[0].stride == (2, 2)
    with pytest.raises(ConfigError, match="downsample='avg'"):
        build_model("attention_cnn", n_mels=64, downsample="avg")
    with pytest.raises(ConfigError, match="downsample"):
        build_model("strided_attention_cnn", n_mels=64, downsample="maxpool")


@pytest.mark.parametrize("name", BUILT_IN)
def test_same_seed_same_model_same_outputs(name: str) -> None:
    x = torch.randn(3, 16, 40)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = build_model(name, n_mels=16)
        train_logits, _ = model.train()(x)
        with torch.no_grad():
            runs.append((train_logits.detach(), *model.eval()(x)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- demographics
def demographics_batch() -> torch.Tensor:
    """Rows as the datasets build them: the data layer's values, then its known-flags."""
    patients = [Demographics(age_group="Child", sex="Male", height_cm=120.0, weight_kg=24.0, pregnant=False),
                Demographics(sex="Female", height_cm=160.0, pregnant=True),
                None]
    return torch.stack([torch.cat(encode_demographics(d)) for d in patients])


def test_fusion_reads_the_data_layers_layout() -> None:
    assert N_DEMOGRAPHIC == len(DEMOGRAPHIC_FEATURES)
    row = demographics_batch()[1]
    values, known = row[:N_DEMOGRAPHIC], row[N_DEMOGRAPHIC:]
    assert known.tolist() == [0.0] * 5 + [1.0, 1.0, 0.0, 1.0]  # age and weight missing
    assert values[DEMOGRAPHIC_FEATURES.index("sex_female")] == 1.0


@pytest.mark.parametrize("name", BUILT_IN)
def test_fusion_shapes_and_only_the_heart_logit_sees_demographics(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, n_mels=16, demographics=True).eval()
    assert isinstance(model, DemographicsFusion)
    x, demo = torch.randn(3, 16, 40), demographics_batch()
    with torch.no_grad():
        logits, attention = model(x, demo)
        alone, _ = model(x)
        nothing_known, _ = model(x, torch.zeros_like(demo))
        base_logits, _ = model.base(x)
    assert logits.shape == (3, 2) and attention.shape == (3, 10)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(3))
    assert torch.equal(logits[:, 1], base_logits[:, 1])  # murmur: audio only
    assert torch.equal(alone, nothing_known)  # no tensor is "nothing known"
    assert torch.equal(logits[2], alone[2])  # the all-missing patient
    assert not torch.allclose(logits[:2, 0], alone[:2, 0])  # known fields move the heart logit


def test_a_missing_value_contributes_nothing_beyond_its_mask() -> None:
    torch.manual_seed(0)
    model = build_model("attention_cnn", n_mels=16, demographics=True).eval()
    x, demo = torch.randn(3, 16, 40), demographics_batch()
    garbage = demo.clone()
    missing = garbage[:, N_DEMOGRAPHIC:] == 0
    garbage[:, :N_DEMOGRAPHIC][missing] = torch.tensor([float("nan"), 1e6, -5.0]).repeat(int(missing.sum()))[
        :int(missing.sum())]
    with torch.no_grad():
        assert torch.equal(model(x, demo)[0], model(x, garbage)[0])
        flagged_missing = demo.clone()
        height = DEMOGRAPHIC_FEATURES.index("height")
        flagged_missing[0, N_DEMOGRAPHIC + height] = 0.0  # same value, now flagged missing: the mask itself counts
        assert not torch.equal(model(x, demo)[0][0], model(x, flagged_missing)[0][0])
        taller = demo.clone()
        taller[0, height] = 1.5
        assert not torch.equal(model(x, demo)[0][0, 0], model(x, taller)[0][0, 0])
    with pytest.raises(ValueError, match=r"\(3, 18\)"):
        model(x, demo[:, :N_DEMOGRAPHIC])


def test_fusion_gradients_reach_every_parameter_and_runs_are_deterministic() -> None:
    x, demo = torch.randn(4, 16, 40), torch.cat([demographics_batch(), demographics_batch()[:1]])
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build_model("resnet_attention", n_mels=16, demographics=True).train()
        logits, _ = model(x, demo)
        nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0]] * 4)).backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert pname.endswith(SHIFT_INVARIANT) or p.grad.abs().sum() > 0, pname
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_fusion_needs_an_embedding() -> None:
    with pytest.raises(ConfigError, match="embed"):
        DemographicsFusion(nn.Linear(3, 2))
