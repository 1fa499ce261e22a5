"""BatchNorm → GELU → max-pool as one fused CPU operation, with its own backward; the unfused modules otherwise.

Why: in the default trunk the convolutions are not the cost. BatchNorm, GELU and max-pooling each read and
write the full-resolution feature map, forward and backward (and max-pool's backward zero-fills it first), so on
two CPU cores they take more than half of a training step while doing a few percent of its arithmetic. The
fused kernel (``kernels/bn_gelu_pool.cpp``) makes three passes instead of about ten and keeps only the
convolution output and a one-byte argmax per pooled value for the backward pass.

It is the same function: batch statistics, the running-statistics update (momentum, or the cumulative mean
when momentum is None), exact GELU, first-maximum pooling with NaN propagation, and the gradients of all of
them, equal to the unfused modules up to float rounding (tested against them). It is used only where it
applies: float32 CPU maps in channels-last layout with a multiple of 8 channels and pooling windows that tile
the map (stride = window, no padding). Everywhere else, and where the kernels cannot be built
(`ignite_trainer.model.cpu_kernels`), the ordinary modules run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ignite_trainer.model import cpu_kernels

__all__ = ["bn_gelu_pool", "fusable"]


def fusable(x: torch.Tensor, bn: nn.BatchNorm2d, pool: nn.Module) -> bool:
    """Whether the fused kernel computes ``pool(gelu(bn(x)))`` for this input and these modules."""
    if not isinstance(pool, nn.MaxPool2d) or x.dim() != 4:
        return False
    if x.shape[1] % 8 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    if kernel != stride or _pair(pool.padding) != (0, 0) or _pair(pool.dilation) != (1, 1) or pool.return_indices:
        return False
    if not pool.ceil_mode and (x.shape[2] % kernel[0] or x.shape[3] % kernel[1]):
        return False  # floor mode drops a partial edge window; the kernel tiles the whole map
    if bn.weight is None or bn.bias is None or kernel[0] * kernel[1] > 255:
        return False
    if not bn.training and (bn.running_mean is None or bn.running_var is None):
        return False
    return cpu_kernels.usable_here(x)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def bn_gelu_pool(x: torch.Tensor, bn: nn.BatchNorm2d, pool: nn.MaxPool2d) -> torch.Tensor:
    """``pool(gelu(bn(x)))`` through the fused kernel; call only where `fusable` says so.

    In training (with running statistics tracked) it updates ``bn``'s running mean, variance and
    ``num_batches_tracked`` as `nn.BatchNorm2d` does; in evaluation it normalises by the running statistics.
    """
    use_batch = bn.training or bn.running_mean is None
    factor = 0.0
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    kernel = _pair(pool.kernel_size)
    return _BnGeluPool.apply(x, bn.weight, bn.bias, bn.running_mean if bn.track_running_stats else None,
                             bn.running_var if bn.track_running_stats else None, use_batch, factor, bn.eps,
                             kernel[0], kernel[1], torch.is_grad_enabled())


class _BnGeluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, use_batch: bool,
                factor: float, eps: float, ph: int, pw: int, with_index: bool) -> torch.Tensor:
        k = cpu_kernels.kernel()
        if use_batch:
            mean, var = k.batch_stats(x).unbind(0)
            if running_mean is not None and running_var is not None:
                count = x.numel() // x.shape[1]
                unbiased = var * (count / max(count - 1, 1))
                running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
                running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        else:
            assert running_mean is not None and running_var is not None
            mean, var = running_mean.double(), running_var.double()
        invstd = torch.rsqrt(var + eps)
        scale = weight.detach().double() * invstd
        shift = bias.detach().double() - mean * scale
        out, index = k.forward(x, scale, shift, ph, pw, with_index)  # per-channel values go in as float64
        ctx.save_for_backward(x, index, weight)
        ctx.stats = (mean, invstd, scale, shift)
        ctx.use_batch, ctx.window = use_batch, (ph, pw)
        return out

    @staticmethod
    @once_differentiable  # the kernel's backward is not itself differentiable (no double backward)
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, index, weight = ctx.saved_tensors
        mean, invstd, scale, shift = ctx.stats
        ph, pw = ctx.window
        k = cpu_kernels.kernel()
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        dz, sums = k.backward_pooled(grad_out, x, index, scale, shift, ph, pw)
        sum_dz, sum_dz_x = sums.unbind(0)
        grad_bias = sum_dz
        grad_weight = invstd * (sum_dz_x - mean * sum_dz)  # sum of dz * x_hat
        a = weight.detach().double() * invstd
        if ctx.use_batch:  # the batch statistics depend on x too
            count = x.numel() // x.shape[1]
            b = -a * invstd * grad_weight / count
            d = -a * sum_dz / count - b * mean
        else:
            b = torch.zeros_like(a)
            d = torch.zeros_like(a)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = k.backward_input(x, dz, index, a, b, d, ph, pw)
        return (grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype),
                None, None, None, None, None, None, None, None)
