"""The training loss: binary cross-entropy per label, weighted for rare positives, blind to missing labels.

A recording can lack a label (CirCor's ``Unknown`` murmur, every murmur in PhysioNet 2016). Such an
entry must neither pull the loss nor receive gradient, so the loss is the mean over *present*
entries only, and whatever value sits in a masked target (even NaN) is never looked at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WeightedBCELoss"]


class WeightedBCELoss(nn.Module):
    """Masked multi-label BCE-with-logits with one positive-class weight per label.

    With every label present (``mask`` None or all ones) it equals
    ``F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)``. With a mask, it is
    the mean over present entries. A batch with no present entry gives a zero loss that is still part
    of the autograd graph, so ``loss.backward()`` runs (and yields zero gradients) instead of failing
    on a tensor without ``grad_fn``, and no data-dependent branch forces a device sync.

    The loss is computed in float32 whatever the logits' dtype, so it is safe under ``torch.autocast``.

    Args:
        pos_weight_heart: weight of positive examples of ``heart`` (> 0).
        pos_weight_murmur: weight of positive examples of ``murmur`` (> 0); 2.5 fits CirCor's
            ~1:4 Present:Absent murmur prior.

    Example:

        .. code-block:: python

            criterion = WeightedBCELoss(pos_weight_heart=1.0, pos_weight_murmur=2.5).to(device)
            logits = model(x)                                   # [B, 2]
            loss = criterion(logits, targets, mask)             # mask: [B, 2], False = missing
            loss.backward()
    """

    pos_weight: torch.Tensor

    def __init__(self, pos_weight_heart: float = 1.0, pos_weight_murmur: float = 2.5) -> None:
        super().__init__()
        weights = torch.tensor([pos_weight_heart, pos_weight_murmur], dtype=torch.float32)
        if not bool(torch.isfinite(weights).all()) or bool((weights <= 0).any()):
            raise ValueError(f"pos weights must be finite and > 0, got {weights.tolist()}")
        # A buffer so that `.to(device)` moves it with the module; not persistent because it comes
        # from the run's config, not from training, and must not be restored over a new config.
        self.register_buffer("pos_weight", weights, persistent=False)

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the scalar loss: mean over present entries of the weighted BCE (float32)."""
        n_labels = self.pos_weight.numel()
        if logits.ndim != 2 or logits.shape[1] != n_labels:
            raise ValueError(f"logits must have shape [B, {n_labels}], got {tuple(logits.shape)}")
        if targets.shape != logits.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from logits {tuple(logits.shape)}")
        if mask is not None and mask.shape != logits.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from logits {tuple(logits.shape)}")

        logits = logits.float()
        targets = targets.float()
        pos_weight = self.pos_weight.to(device=logits.device, dtype=torch.float32)

        if mask is None:
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)

        present = mask.to(device=logits.device, dtype=torch.bool)
        # Neutralise masked targets *before* the loss: a NaN there would make the gradient NaN even
        # when the entry is later multiplied by zero.
        targets = torch.where(present, targets, torch.zeros_like(targets))
        per_entry = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
        total = torch.where(present, per_entry, torch.zeros_like(per_entry)).sum()
        count = present.sum().clamp(min=1).to(total.dtype)
        return total / count
