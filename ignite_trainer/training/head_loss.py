"""The auxiliary heads' loss: cross-entropy per murmur descriptor and per heart-cycle frame, blind to missing targets.

A descriptor's target is missing (-1) on every recording it does not describe, a frame's where the ``.tsv``
does not annotate it or the recording has no ``.tsv`` (`ignite_trainer.data.annotations`). Each head's loss is
the mean over its *present* targets only, weighted by the config (``attribute_loss_weight`` per descriptor
head, ``segmentation_loss_weight``), and added to the two labels' loss. A batch without a present target gives a
zero that is still part of the graph, with no data-dependent branch (no device sync), as `WeightedBCELoss` does.

The segmentation head predicts one state per step of the trunk's output (``T'`` steps for a window of ``W``
feature frames); step ``j`` is scored against the frame at its centre, ``floor((j + 0.5) * W / T')``.

Example::

    loss_fn = HeadLoss(("systolic_timing", "segmentation"), attribute_weight=0.5, segmentation_weight=0.5)
    loss = loss_fn(outputs, targets.lookup(index, epoch))
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ignite_trainer.core.vocabulary import SEGMENTATION
from ignite_trainer.data.annotations import MISSING, attribute_heads
from ignite_trainer.data.head_targets import ATTRIBUTES, STATES


def step_states(states: torch.Tensor, steps: int) -> torch.Tensor:
    """``[B, W]`` frame states -> ``[B, steps]``: the state of the frame at each step's centre."""
    frames = states.shape[1]
    centre = ((torch.arange(steps, device=states.device) + 0.5) * frames / steps).long().clamp(max=frames - 1)
    return states[:, centre]


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the entries whose target is not `MISSING` (classes on dim 1); 0 (in the graph) if none."""
    present = target != MISSING
    safe = torch.where(present, target, torch.zeros_like(target))
    per_entry = F.cross_entropy(logits.float(), safe, reduction="none")
    total = torch.where(present, per_entry, torch.zeros_like(per_entry)).sum()
    return total / present.sum().clamp(min=1).to(total.dtype)


class HeadLoss(nn.Module):
    """Weighted sum of the heads' masked cross-entropies (descriptor heads each ``attribute_weight``)."""

    def __init__(self, heads: Sequence[str], attribute_weight: float = 0.5, segmentation_weight: float = 0.5) -> None:
        super().__init__()
        self.attribute_heads = attribute_heads(heads)
        self.segmentation = SEGMENTATION in heads
        self.attribute_weight = float(attribute_weight)
        self.segmentation_weight = float(segmentation_weight)

    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = next(iter(outputs.values())).new_zeros((), dtype=torch.float32)
        for j, head in enumerate(self.attribute_heads):
            total = total + self.attribute_weight * masked_cross_entropy(outputs[head], targets[ATTRIBUTES][:, j])
        if self.segmentation:
            logits = outputs[SEGMENTATION]  # [B, states, T']
            total = total + self.segmentation_weight * masked_cross_entropy(
                logits, step_states(targets[STATES], logits.shape[-1]))
        return total
