"""A patient model: gated-attention multiple-instance learning over a registered model's window embeddings.

CirCor's murmur and outcome are the patient's, heard at up to five auscultation locations; a window model
learns them from every window alone and a fixed rule (`scoring.predictions`) averages windows into the
patient afterwards. `PatientMIL` learns the patient from its recordings together instead (Ilse, Tomczak and
Welling 2018, "Attention-based deep multiple instance learning"): a *bag* is a patient, its *instances* are
windows of its recordings (`data.bags`), each instance is embedded by the wrapped model's own ``embed(x)``,
a gated attention weighs the instances (``a_i ∝ exp(w·(tanh(V h_i) ⊙ sigmoid(U h_i)))``), and the wrapped
model's own ``head`` turns the weighted mean of the embeddings into the patient's two logits.

A batch is padded to its largest bag; ``instance_mask [B, N]`` marks the real instances. Padding never
reaches a weight: only real instances go through ``embed`` (so BatchNorm's batch statistics and dropout
see exactly the real ones), their attention score is the only one the softmax sees, and a padded slot's
weight is exactly 0. The output therefore does not depend on what padding holds, or how much of it there is.

The wrapped model keeps its names under ``base.`` (its trunk is what ``--init-from`` and ``--freeze-trunk``
mean, `model.trunk`); the gated attention is ``bag_attention.``.
"""

from __future__ import annotations

import torch
from torch import nn

from ignite_trainer.core.errors import ConfigError

__all__ = ["OWN_PREFIXES", "GatedAttention", "PatientMIL", "check_instance_model"]

#: Key prefixes of `PatientMIL`'s own layers (everything else is under ``base.``).
OWN_PREFIXES = ("bag_attention.",)


def check_instance_model(base: nn.Module, name: str) -> None:
    """Refuse a model that cannot be a patient model's instance encoder: it needs ``embed(x) -> (pooled [B, H],
    attention)``, ``embedding_size`` (H) and a ``head`` from H to the two logits (every built-in model has them)."""
    missing = [attr for attr in ("embed", "embedding_size", "head") if not hasattr(base, attr)]
    if missing:
        raise ConfigError(f"patient_model needs a model with embed(x), embedding_size and head; model {name!r} "
                          f"({type(base).__name__}) has no {', '.join(repr(m) for m in missing)}")


class GatedAttention(nn.Module):
    """Ilse et al.'s gated attention: one score per instance, softmax over the real instances of each bag."""

    def __init__(self, size: int, hidden: int = 64) -> None:
        super().__init__()
        self.value = nn.Linear(size, hidden)
        self.gate = nn.Linear(size, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``h [B, N, H]``, ``mask [B, N]`` bool -> weights ``[B, N]``: sum 1 over real instances, 0 on padding."""
        scores = self.score(torch.tanh(self.value(h)) * torch.sigmoid(self.gate(h))).squeeze(-1)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores.float(), dim=1)
        return torch.where(mask, weights, torch.zeros_like(weights))


class PatientMIL(nn.Module):
    """Wraps a registered model with ``embed``, ``embedding_size`` and ``head`` (every built-in model).

    ``forward(x [B, N, n_mels, T], instance_mask [B, N])`` returns ``(logits [B, 2], weights [B, N])``: the
    patient's logits and each instance's attention weight (0 on padding). Without ``instance_mask`` every
    instance is real.

    Example::

        model = PatientMIL(build_model("attention_cnn", n_mels=64))
        logits, weights = model(bags, instance_mask)          # bags [B, N, 64, 400], instance_mask [B, N]
        h = model.instances(windows)                          # [n, H]: a patient's windows, any batching
        logits, weights = model.pool(h[None], torch.ones(1, len(h), dtype=torch.bool))
    """

    def __init__(self, base: nn.Module, attention_hidden: int = 64, name: str | None = None) -> None:
        super().__init__()
        check_instance_model(base, name or type(base).__name__)
        self.base = base
        self.embedding_size = int(base.embedding_size)
        self.bag_attention = GatedAttention(self.embedding_size, attention_hidden)

    def instances(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, n_mels, T]`` windows -> ``[n, H]`` instance embeddings (the wrapped model's ``embed``)."""
        return self.base.embed(x)[0]

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h [B, N, H]`` and ``mask [B, N]`` -> ``(logits [B, 2], weights [B, N])``."""
        mask = mask.to(device=h.device, dtype=torch.bool)
        weights = self.bag_attention(h, mask)
        bag = torch.bmm(weights.to(h.dtype).unsqueeze(1), h).squeeze(1)
        return self.base.head(bag), weights

    def forward(self, x: torch.Tensor, instance_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"a patient model takes bags [B, N, n_mels, T], got shape {tuple(x.shape)}")
        batch, slots = x.shape[:2]
        mask = (torch.ones(batch, slots, dtype=torch.bool, device=x.device) if instance_mask is None
                else instance_mask.to(device=x.device, dtype=torch.bool))
        real = self.instances(x[mask])  # only real instances reach the network
        h = real.new_zeros(batch, slots, real.shape[-1]).masked_scatter(mask.unsqueeze(-1), real)
        return self.pool(h, mask)
