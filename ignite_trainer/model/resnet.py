"""`resnet_attention`: a residual CNN over log-mel frames, dilated temporal convolutions, attention pooling.

The stronger option beside ``attention_cnn``. Residual 2-D blocks see more of the spectrogram than four plain
convolutions (deeper, with shortcuts so that depth stays trainable), and two dilated 1-D blocks over the 40 ms
steps then span about a second and a half, one or two heart cycles, which is what timing cues such as a wide
split, an S3 or an irregular rhythm need. Downsampling is by strided convolutions and BatchNorm is folded at
evaluation (`ignite_trainer.model.blocks.conv_bn`), so it stays cheap on 2 CPU cores. Registered on import of
the `ignite_trainer.model` wing.
"""

from __future__ import annotations

import torch
from torch import nn

from ignite_trainer.model.blocks import AttentionPool, conv_bn
from ignite_trainer.model.registry import register_model


class ResidualBlock(nn.Module):
    """conv 3x3 (strided) -> BN -> GELU -> conv 3x3 -> BN, plus a shortcut, then GELU.

    The shortcut is the identity when the shape is kept and a strided 1x1 conv + BN when it changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int], fold_bn: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.GELU()
        self.fold_bn = fold_bn
        if c_in != c_out or stride != (1, 1):
            self.shortcut_conv: nn.Conv2d | None = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.shortcut_bn: nn.BatchNorm2d | None = nn.BatchNorm2d(c_out)
        else:
            self.shortcut_conv = self.shortcut_bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(conv_bn(x, self.conv1, self.bn1, self.fold_bn))
        h = conv_bn(h, self.conv2, self.bn2, self.fold_bn)
        if self.shortcut_conv is not None and self.shortcut_bn is not None:
            x = conv_bn(x, self.shortcut_conv, self.shortcut_bn, self.fold_bn)
        return self.act(h + x)


class TemporalBlock(nn.Module):
    """Residual dilated 1-D convolution over the time steps of ``[B, T', features]``."""

    def __init__(self, features: int, dilation: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(features, features, 3, padding=dilation, dilation=dilation)
        self.norm = nn.LayerNorm(features)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        step = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return h + self.dropout(self.act(self.norm(step)))


@register_model("resnet_attention")
class ResNetAttention(nn.Module):
    """Stem -> residual 2-D stages -> frequency folded into features -> projection -> dilated temporal blocks ->
    `AttentionPool` -> two logits.

    With the defaults (64 mels, 4 s at a 10 ms hop): stem and first stage halve frequency and time, the later
    stages only frequency, so attention is over T' = T / 4 steps of 40 ms, as in ``attention_cnn``. About
    0.26 M parameters. ``embed(x)`` gives the pooled embedding ``[B, hidden]`` for late fusion
    (`ignite_trainer.model.fusion`).

    Example::

        model = build_model("resnet_attention", n_mels=64)
        logits, attention = model(torch.randn(8, 64, 400))     # [8, 2], [8, 100]
    """

    def __init__(self, n_mels: int, n_labels: int = 2, channels: tuple[int, ...] = (16, 32, 48, 64),
                 hidden: int = 128, dilations: tuple[int, ...] = (2, 4), dropout: float = 0.1,
                 channels_last: bool = True, fold_bn: bool = True) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels={channels!r}: need a stem width and at least one stage")
        freq = n_mels
        stem_f = 2 if freq >= 2 else 1
        self.stem_conv = nn.Conv2d(1, channels[0], 3, stride=(stem_f, 2), padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels[0])
        freq = -(-freq // stem_f)
        stages = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            stride_f = 2 if freq >= 2 else 1
            stages.append(ResidualBlock(c_in, c_out, (stride_f, 2 if i == 0 else 1), fold_bn))
            freq = -(-freq // stride_f)
        self.stages = nn.Sequential(*stages)
        self.act = nn.GELU()
        self.fold_bn = fold_bn
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels[-1] * freq, hidden), nn.GELU())
        self.temporal = nn.Sequential(*(TemporalBlock(hidden, d, dropout) for d in dilations))
        self.pool = AttentionPool(hidden)
        self.head = nn.Linear(hidden, n_labels)
        self.embedding_size = hidden
        if channels_last:
            self.stem_conv.to(memory_format=torch.channels_last)
            self.stages.to(memory_format=torch.channels_last)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention, _ = self.embed_frames(x)
        return pooled, attention

    def embed_frames(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pooled [B, hidden], attention [B, T'], per-step features [B, T', hidden])``, for frame-level heads."""
        h = self.act(conv_bn(x.unsqueeze(1), self.stem_conv, self.stem_bn, self.fold_bn))
        h = self.stages(h)  # [B, C, F', T']
        b, c, f, t = h.shape
        h = self.temporal(self.project(h.contiguous().reshape(b, c * f, t).transpose(1, 2)))  # [B, T', hidden]
        pooled, attention = self.pool(h)
        return pooled, attention, h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.embed(x)
        return self.head(pooled), attention
