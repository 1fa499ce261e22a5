"""Building blocks the built-in models share: folded conv+BatchNorm, the conv trunk, attention pooling."""

from __future__ import annotations

import torch
from torch import nn

from ignite_trainer.core.errors import ConfigError
from ignite_trainer.model import cpu_kernels
from ignite_trainer.model.fused_block import bn_gelu_pool, fusable


def use_cpu_kernel(model: nn.Module, on: bool) -> int:
    """Switch every `ConvTrunk` of ``model`` to the fused CPU kernel (``on``) or to the ordinary modules; returns
    how many trunks it switched. The blocks use the kernel only while it is loaded in the process.

    Example::

        model = build_model("attention_cnn", n_mels=64)
        use_cpu_kernel(model, cpu_kernels.prepare())   # 1 trunk, fused if the kernel could be had
    """
    trunks = [m for m in model.modules() if isinstance(m, ConvTrunk)]
    for trunk in trunks:
        trunk.fused = on
    return len(trunks)


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, fold: bool = True) -> torch.Tensor:
    """``bn(conv(x))``; in evaluation with ``fold`` the BatchNorm is folded into the convolution's weights.

    Evaluation BatchNorm is a per-channel affine map, so it can be applied to the (tiny) kernel instead of the
    (large) feature map: one pass over the output instead of two. The folded weights are recomputed on every
    call, so they can never go stale after training or loading a checkpoint; they cost a few thousand
    multiplies. The result equals the unfolded one up to float rounding (about 1e-6 relative).
    """
    if bn.training or not fold or bn.running_var is None or bn.running_mean is None:
        return bn(conv(x))
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return nn.functional.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class ConvTrunk(nn.Module):
    """Conv blocks over ``[B, 1, n_mels, T]``, then frequency folded into channels: ``[B, T', features]``.

    Each block is conv 3x3 -> BatchNorm -> GELU -> downsampling. Every block halves frequency (while more than
    one band is left); only the first two halve time, so T' = T / 4 keeps 40 ms steps at a 10 ms hop, fine
    enough to tell S1, systole, S2 and diastole apart.

    ``downsample="maxpool"`` (the original layout) convolves at full resolution and max-pools after the
    activation; ``"stride"`` lets the convolution itself step by the pooling factor, which skips three
    quarters of the first blocks' work and every pooling pass (different math, same output shape; measured
    in ``docs/benchmarks.md``). The state-dict keys are the same for both (the pooling slot is an
    `nn.Identity` under ``"stride"``), so neither layout breaks loading a checkpoint of the same layout.

    ``channels_last`` keeps the convolution weights, and so every feature map, in NHWC order, where oneDNN's
    convolutions and the pooling kernel run vectorised over channels: on CPU this is what makes the
    memory-bound normalisation, activation and pooling passes cheap. It changes only the order of float
    sums, not the function. ``fold_bn`` folds BatchNorm into the convolution in evaluation (`conv_bn`).

    ``fused`` computes each block's BatchNorm -> GELU -> max-pool as one kernel (`ignite_trainer.model.fused_block`)
    wherever it applies (float32 channels-last CPU maps) and the kernel is loaded in this process
    (`ignite_trainer.model.cpu_kernels`), forward and backward: the same function up to float rounding, with three
    passes over the full-resolution map instead of about ten. It is off by default (`use_cpu_kernel` switches a
    built model); elsewhere the blocks run on the ordinary modules. A forward pass never builds or loads it.
    """

    def __init__(self, n_mels: int, channels: tuple[int, ...] = (8, 16, 32, 64), time_pools: int = 2,
                 dropout: float = 0.1, downsample: str = "maxpool", channels_last: bool = True,
                 fold_bn: bool = True, fused: bool = False) -> None:
        super().__init__()
        if downsample not in DOWNSAMPLING:
            raise ConfigError(f"downsample={downsample!r}: choose one of {', '.join(DOWNSAMPLING)}")
        layers: list[nn.Module] = []
        c_in, freq = 1, n_mels
        for i, c_out in enumerate(channels):
            pool_f = 2 if freq >= 2 else 1
            pool_t = 2 if i < time_pools else 1
            if downsample == "maxpool":
                conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
                pool: nn.Module = nn.MaxPool2d((pool_f, pool_t), ceil_mode=True)
            else:  # a 3x3 kernel with padding 1 and stride s gives ceil(n / s) steps, as the ceil-mode pool does
                conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=(pool_f, pool_t), padding=1, bias=False)
                pool = nn.Identity()
            layers += [conv, nn.BatchNorm2d(c_out), nn.GELU(), pool]
            c_in, freq = c_out, -(-freq // pool_f)
        self.blocks = nn.Sequential(*layers)
        self.out_features = c_in * freq
        self.dropout = nn.Dropout(dropout)
        self.fold_bn = fold_bn
        self.fused = fused
        self.channels_last = channels_last
        if channels_last:
            self.blocks.to(memory_format=torch.channels_last)

    def _may_fuse(self, h: torch.Tensor, conv: nn.Conv2d, act: nn.Module, pool: nn.Module) -> bool:
        """Whether this block can go through the fused kernel, decided before the convolution so that the
        blocks that cannot keep the folded-BatchNorm path."""
        return (self.fused and isinstance(pool, nn.MaxPool2d) and isinstance(act, nn.GELU)
                and act.approximate == "none" and conv.out_channels % 8 == 0 and cpu_kernels.usable_here(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)  # [B, 1, F, T]: with one channel its layout follows the (NHWC) weights
        layers = list(self.blocks)
        for i in range(0, len(layers), 4):
            conv, bn, act, pool = layers[i:i + 4]
            if self._may_fuse(h, conv, act, pool):
                c = conv(h)
                h = bn_gelu_pool(c, bn, pool) if fusable(c, bn, pool) else pool(act(bn(c)))
            else:  # GPU, autocast, compile, no kernel: the modules, with BatchNorm folded in evaluation
                h = pool(act(conv_bn(h, conv, bn, self.fold_bn)))
        b, c, f, t = h.shape  # [B, C, F', T']
        # Back to NCHW order first (a small copy): dropout draws its mask in memory order, so the same seed
        # drops the same features whichever layout computed them.
        return self.dropout(h.contiguous().reshape(b, c * f, t).transpose(1, 2))  # [B, T', C*F']


DOWNSAMPLING = ("maxpool", "stride")


class AttentionPool(nn.Module):
    """Weighted mean over time with learned weights: a murmur or an abnormal beat may fill only part of a
    window, and attention lets those frames dominate instead of being averaged away."""

    def __init__(self, features: int, hidden: int = 64) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.score(h).squeeze(-1), dim=1)  # [B, T'], sums to 1
        return torch.bmm(weights.unsqueeze(1), h).squeeze(1), weights


# ---------------------------------------------------------------------------------------------- models
