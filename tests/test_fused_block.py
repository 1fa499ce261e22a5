"""The fused BatchNorm -> GELU -> max-pool kernel computes what the three modules compute, forward and backward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ignite_trainer.model import cpu_kernels
from ignite_trainer.model import fused_block
from ignite_trainer.model.registry import build_model

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    """Build (once per machine and key) or load the kernel; where it cannot be had these tests would compare
    the modules with themselves, so they skip and say why."""
    if not cpu_kernels.prepare():
        pytest.skip(f"the fused CPU kernel is not built here: {cpu_kernels.kernel_status()}")


def modules(c: int, window: tuple[int, int], momentum: float | None = 0.1, seed: int = 0
            ) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d, nn.MaxPool2d]:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    twin = nn.BatchNorm2d(c, momentum=momentum)
    twin.load_state_dict(bn.state_dict())
    return bn, twin, nn.MaxPool2d(window, ceil_mode=True)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def both(x: torch.Tensor, c: int, window: tuple[int, int], momentum: float | None = 0.1, train: bool = True):
    """Run the unfused modules and the fused kernel on copies of ``x``; return both sides' results."""
    bn, twin, pool = modules(c, window, momentum)
    bn.train(train), twin.train(train)
    x_ref = channels_last(x.clone()).requires_grad_()
    x_fused = channels_last(x.clone()).requires_grad_()
    ref = pool(nn.functional.gelu(bn(x_ref)))
    assert fused_block.fusable(x_fused, twin, pool)
    fused = fused_block.bn_gelu_pool(x_fused, twin, pool)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    fused.backward(grad)
    return (ref, x_ref.grad, bn), (fused, x_fused.grad, twin)


SHAPES = [((4, 8, 16, 20), (2, 2)), ((3, 16, 7, 9), (2, 2)), ((2, 8, 5, 6), (2, 1)), ((2, 24, 9, 10), (3, 2)),
          ((1, 8, 1, 3), (2, 2))]


@pytest.mark.parametrize("shape,window", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_forward_gradients_and_running_statistics_match_the_modules(shape, window, momentum) -> None:
    x = torch.randn(*shape) * 2.0 + 0.5
    (ref, gx_ref, bn), (fused, gx, twin) = both(x, shape[1], window, momentum)
    assert fused.is_contiguous(memory_format=torch.channels_last) and fused.shape == ref.shape
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(twin.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(twin.num_batches_tracked) == int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("shape,window", SHAPES[:3])
def test_evaluation_uses_the_running_statistics_and_leaves_them_alone(shape, window) -> None:
    x = torch.randn(*shape)
    (ref, gx_ref, bn), (fused, gx, twin) = both(x, shape[1], window, train=False)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(twin.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin.running_mean, bn.running_mean, rtol=0, atol=0)
    assert int(twin.num_batches_tracked) == 0


def test_windows_of_only_negative_values_pick_the_largest_gelu() -> None:
    """GELU is not monotonic: below about -0.75 a smaller input gives a larger output. Windows made of such
    values must pool the largest GELU, as pooling after the activation does."""
    c, window = 8, (2, 2)
    bn, twin, pool = modules(c, window)
    for m in (bn, twin):
        m.eval()
        m.weight.data.fill_(1.0), m.bias.data.zero_(), m.running_mean.zero_(), m.running_var.fill_(1.0 - m.eps)
    x = channels_last(-torch.rand(3, c, 6, 8) * 4.0)  # all negative, on both sides of the minimum
    with torch.no_grad():
        torch.testing.assert_close(fused_block.bn_gelu_pool(x, twin, pool), pool(nn.functional.gelu(bn(x))),
                                   rtol=1e-5, atol=1e-7)


def test_a_nan_propagates_to_its_window_as_in_the_modules() -> None:
    x = torch.randn(2, 8, 4, 4)
    x[0, 3, 1, 1] = float("nan")
    bn, twin, pool = modules(8, (2, 2))
    bn.eval(), twin.eval()
    with torch.no_grad():
        ref = pool(nn.functional.gelu(bn(channels_last(x))))
        fused = fused_block.bn_gelu_pool(channels_last(x), twin, pool)
    assert torch.equal(fused.isnan(), ref.isnan()) and fused.isnan().sum() == 1
    torch.testing.assert_close(fused.nan_to_num(), ref.nan_to_num(), rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_the_thread_count_and_repeat_exactly() -> None:
    x = torch.randn(6, 16, 12, 10)
    runs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            _, (fused, gx, twin) = both(x, 16, (2, 2))
            runs.append((fused, gx, twin.weight.grad, twin.bias.grad, twin.running_mean, twin.running_var))
    finally:
        torch.set_num_threads(previous)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_only_maps_the_kernel_handles_are_fused() -> None:
    bn, _, pool = modules(8, (2, 2))
    x = channels_last(torch.randn(2, 8, 6, 6))
    assert fused_block.fusable(x, bn, pool)
    assert not fused_block.fusable(torch.randn(2, 8, 6, 6), bn, pool)  # NCHW layout
    assert not fused_block.fusable(x.double(), bn, pool)
    assert not fused_block.fusable(channels_last(torch.randn(2, 12, 6, 6)), nn.BatchNorm2d(12), pool)
    assert not fused_block.fusable(x, bn, nn.MaxPool2d(2, stride=1))
    assert not fused_block.fusable(x, bn, nn.MaxPool2d(2, padding=1))
    # floor mode drops the last row of an odd height; the kernel tiles the whole map
    assert not fused_block.fusable(channels_last(torch.randn(2, 8, 5, 6)), bn, nn.MaxPool2d(2))
    assert fused_block.fusable(channels_last(torch.randn(2, 8, 5, 6)), bn, nn.MaxPool2d(2, ceil_mode=True))
    assert not fused_block.fusable(x, nn.BatchNorm2d(8, affine=False), pool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_block.fusable(x, bn, pool)


def test_channel_counts_the_kernel_cannot_take_run_unfused() -> None:
    model = build_model("attention_cnn", n_mels=16, channels=(4, 12))
    logits, _ = model.train()(torch.randn(3, 16, 20))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_default_process_never_builds_loads_or_waits_on_the_kernel(tmp_path) -> None:
    """A model built and trained the default way runs the ordinary modules; the kernel's folder is not touched,
    and torch's extension builder is never imported."""
    code = ("import sys, torch; from ignite_trainer.model import cpu_kernels as f; "
            "from ignite_trainer.model.registry import build_model; "
            "m = build_model('attention_cnn', n_mels=16); m(torch.randn(2, 16, 20))[0].sum().backward(); "
            "print(f.loaded(), 'torch.utils.cpp_extension' in sys.modules, f.kernel_status())")
    env = dict(os.environ, **{cpu_kernels.DIR_ENV: str(tmp_path / "kernels")})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False not used in this process"
    assert not (tmp_path / "kernels").exists()


def test_a_switched_model_uses_the_kernel_only_while_it_is_loaded() -> None:
    from ignite_trainer.model.blocks import use_cpu_kernel
    model = build_model("attention_cnn", n_mels=16)
    assert use_cpu_kernel(model, True) == 1
    calls = []
    original = fused_block._BnGeluPool.apply
    fused_block._BnGeluPool.apply = lambda *a: calls.append(1) or original(*a)
    try:
        model.train()(torch.randn(2, 16, 20))
        assert calls, "a switched-on trunk should go through the kernel"
        calls.clear()
        use_cpu_kernel(model, False)
        model(torch.randn(2, 16, 20))
        assert not calls
    finally:
        fused_block._BnGeluPool.apply = original


@pytest.mark.parametrize("name", ["attention_cnn", "mean_pool_cnn"])
def test_a_whole_model_on_the_kernel_computes_what_it_computes_on_the_modules(name: str) -> None:
    """The trunk's BatchNorm -> GELU -> max-pool through the kernel, against the same model on the modules: a
    training step and evaluation (the kernel demonstrably called, so this never compares the modules with
    themselves)."""
    from test_models import assert_same_function

    from ignite_trainer.model.blocks import use_cpu_kernel
    fused, plain = build_model(name, n_mels=16), build_model(name, n_mels=16)
    plain.load_state_dict(fused.state_dict())
    use_cpu_kernel(fused, True)
    calls = []
    original = fused_block._BnGeluPool.apply
    fused_block._BnGeluPool.apply = lambda *a: calls.append(1) or original(*a)
    try:
        assert_same_function(fused, plain)
    finally:
        fused_block._BnGeluPool.apply = original
    assert calls
