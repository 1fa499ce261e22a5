"""The built-in CNNs over log-mel windows: `attention_cnn` (the default), `mean_pool_cnn`, `strided_attention_cnn`."""

from __future__ import annotations

import torch
from torch import nn

from ignite_trainer.model.blocks import AttentionPool, ConvTrunk
from ignite_trainer.model.registry import register_model


@register_model("attention_cnn")
class AttentionCNN(nn.Module):
    """The default: `ConvTrunk` -> per-step projection -> `AttentionPool` -> linear head with two logits.

    About 66 k parameters: small enough that an epoch over a few hundred 4 s windows takes seconds on
    two CPU cores, large enough to pick up murmur energy between heart sounds and abnormal timing.
    ``downsample``, ``channels_last`` and ``fold_bn`` are the trunk's (`ConvTrunk`); the defaults keep the
    original function and only change how it is computed.

    ``embed(x)`` gives the pooled embedding ``[B, hidden]`` before the head, for late fusion with other
    inputs (`ignite_trainer.model.fusion`).
    """

    def __init__(self, n_mels: int, n_labels: int = 2, channels: tuple[int, ...] = (8, 16, 32, 64),
                 hidden: int = 128, dropout: float = 0.1, downsample: str = "maxpool", channels_last: bool = True,
                 fold_bn: bool = True, fused: bool = False) -> None:
        super().__init__()
        self.trunk = ConvTrunk(n_mels, tuple(channels), dropout=dropout, downsample=downsample,
                               channels_last=channels_last, fold_bn=fold_bn, fused=fused)
        self.project = nn.Sequential(nn.Linear(self.trunk.out_features, hidden), nn.GELU(), nn.Dropout(dropout))
        self.pool = AttentionPool(hidden)
        self.head = nn.Linear(hidden, n_labels)
        self.embedding_size = hidden

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention, _ = self.embed_frames(x)
        return pooled, attention

    def embed_frames(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pooled [B, hidden], attention [B, T'], per-step features [B, T', hidden])``, for frame-level heads."""
        h = self.project(self.trunk(x))
        pooled, attention = self.pool(h)
        return pooled, attention, h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.embed(x)
        return self.head(pooled), attention


@register_model("mean_pool_cnn")
class MeanPoolCNN(nn.Module):
    """The same trunk with a plain mean over time: the baseline that shows what attention adds.

    Its "attention" is uniform (1/T' per step), so it fits the same output contract.
    """

    def __init__(self, n_mels: int, n_labels: int = 2, channels: tuple[int, ...] = (8, 16, 32, 64),
                 hidden: int = 128, dropout: float = 0.1, downsample: str = "maxpool", channels_last: bool = True,
                 fold_bn: bool = True, fused: bool = False) -> None:
        super().__init__()
        self.trunk = ConvTrunk(n_mels, tuple(channels), dropout=dropout, downsample=downsample,
                               channels_last=channels_last, fold_bn=fold_bn, fused=fused)
        self.project = nn.Sequential(nn.Linear(self.trunk.out_features, hidden), nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, n_labels)
        self.embedding_size = hidden

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention, _ = self.embed_frames(x)
        return pooled, attention

    def embed_frames(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pooled [B, hidden], attention [B, T'], per-step features [B, T', hidden])``, for frame-level heads."""
        h = self.project(self.trunk(x))
        b, t, _ = h.shape
        return h.mean(dim=1), torch.full((b, t), 1.0 / t, dtype=h.dtype, device=h.device), h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.embed(x)
        return self.head(pooled), attention


@register_model("strided_attention_cnn")
class StridedAttentionCNN(AttentionCNN):
    """`AttentionCNN` whose convolutions stride instead of max-pooling (``downsample="stride"``).

    Same shapes, parameter count and output contract, half the FLOPs and none of the full-resolution
    normalisation, activation and pooling passes: on one CPU core a training step runs about 3.8x and an
    evaluation pass about 6.5x faster than ``attention_cnn`` computed the original way. It learns more
    slowly per epoch, though (validation scores over several seeds in ``docs/benchmarks.md``).
    ``attention_cnn`` keeps its function under its own name, so its checkpoints still load as what they
    were trained as.

    Example::

        model = build_model("strided_attention_cnn", n_mels=64)
        logits, attention = model(torch.randn(8, 64, 400))     # [8, 2], [8, 100]
    """

    def __init__(self, n_mels: int, n_labels: int = 2, channels: tuple[int, ...] = (8, 16, 32, 64),
                 hidden: int = 128, dropout: float = 0.1, channels_last: bool = True, fold_bn: bool = True) -> None:
        super().__init__(n_mels, n_labels, channels, hidden, dropout, downsample="stride",
                         channels_last=channels_last, fold_bn=fold_bn)
