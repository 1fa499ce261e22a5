"""Auxiliary heads on the shared trunk: CirCor's murmur descriptors per window, heart-cycle states per step.

`AuxiliaryHeads` wraps a model (a registered one, or `DemographicsFusion` around one) whose ``embed_frames(x)``
gives ``(pooled [B, H], attention [B, T'], per-step features [B, T', H])``, as every built-in model does. It adds

- one linear classifier per murmur descriptor (`MURMUR_ATTRIBUTES`: systolic timing, shape, grading, pitch,
  quality and the diastolic ones) on the pooled embedding, the one the murmur logit reads;
- a segmentation head (a small temporal convolution) giving, for every step ``T'`` of the trunk's output,
  logits of the four heart-cycle states (`HEART_STATES`).

The two labels' logits are the wrapped model's, unchanged: ``forward(x)`` returns ``(logits, attention)`` like
any model, so evaluation, prediction and export need nothing new. ``forward(x, auxiliary=True)`` also returns
the heads' outputs, ``{"<descriptor>": [B, classes], "segmentation": [B, 4, T']}``; the training step asks for
them through the module's own ``forward`` so that a DistributedDataParallel wrapper sees the call.

Example::

    model = AuxiliaryHeads(build_model("attention_cnn", n_mels=64), ("systolic_timing", "segmentation"))
    logits, attention, outputs = model(torch.randn(8, 64, 400), auxiliary=True)
    outputs["systolic_timing"].shape, outputs["segmentation"].shape      # [8, 4], [8, 4, 100]
"""

from __future__ import annotations

import torch
from torch import nn

from ignite_trainer.core.errors import ConfigError
from ignite_trainer.core.vocabulary import HEART_STATES, MURMUR_ATTRIBUTES, SEGMENTATION
from ignite_trainer.model.fusion import DemographicsFusion

#: Key prefix of every parameter the heads add (`ignite_trainer.model.trunk` leaves these out of a trunk).
AUX_PREFIX = "aux."


class AuxiliaryHeads(nn.Module):
    """The wrapped model's two logits, plus descriptor and segmentation heads on its embedding and steps."""

    def __init__(self, base: nn.Module, heads: tuple[str, ...], dropout: float = 0.1) -> None:
        super().__init__()
        inner = base.base if isinstance(base, DemographicsFusion) else base
        for needed in ("embed_frames", "head", "embedding_size"):
            if not hasattr(inner, needed):
                raise ConfigError(f"heads need a model with {needed!r} (per-step features for the heads); "
                                  f"{type(inner).__name__} has none")
        unknown = [h for h in heads if h not in MURMUR_ATTRIBUTES and h != SEGMENTATION]
        if unknown:
            raise ConfigError(f"heads: {', '.join(unknown)} not one of: {', '.join((*MURMUR_ATTRIBUTES, SEGMENTATION))}")
        self.base = base
        self.heads = tuple(heads)
        size = int(inner.embedding_size)
        aux: dict[str, nn.Module] = {}
        for name in heads:
            if name in MURMUR_ATTRIBUTES:
                aux[name] = nn.Sequential(nn.Dropout(dropout), nn.Linear(size, len(MURMUR_ATTRIBUTES[name][1])))
        if SEGMENTATION in heads:
            aux[SEGMENTATION] = nn.Sequential(nn.Conv1d(size, 32, kernel_size=5, padding=2), nn.GELU(),
                                              nn.Conv1d(32, len(HEART_STATES), kernel_size=1))
        self.aux = nn.ModuleDict(aux)

    def _features(self, x: torch.Tensor, demographics: torch.Tensor | None):
        if isinstance(self.base, DemographicsFusion):
            pooled, attention, frames = self.base.base.embed_frames(x)
            return self.base.fuse(pooled, demographics, x.shape[0]), attention, pooled, frames
        pooled, attention, frames = self.base.embed_frames(x)
        return self.base.head(pooled), attention, pooled, frames

    def forward(self, x: torch.Tensor, demographics: torch.Tensor | None = None, auxiliary: bool = False):
        logits, attention, pooled, frames = self._features(x, demographics)
        if not auxiliary:
            return logits, attention
        outputs = {}
        for name, head in self.aux.items():
            if name == SEGMENTATION:
                outputs[name] = head(frames.transpose(1, 2))  # [B, states, T']
            else:
                outputs[name] = head(pooled)
        return logits, attention, outputs
