"""Late fusion of patient demographics with the audio embedding, for the outcome (``heart``) logit only.

Age, sex, body size and pregnancy carry prior information about an abnormal outcome that a 4 s window of
sound cannot (a neonate's heart rate is not abnormal, a pregnant patient's flow murmur is expected), while the
murmur label is about the sound alone, so only the heart logit sees them. CirCor leaves many of these fields
empty, and an empty field is not a zero: every feature travels with a "known" flag, a missing value is
replaced by zero *inside* the model and only its flag reaches the weights, so a missing value contributes
exactly what "missing" contributes, whatever number sits in its slot (NaN included).

The tensor layout a batch carries (``demographics [B, 2 * len(DEMOGRAPHIC_FEATURES)]``, float32) is
`ignite_trainer.data.demographics`'s, which owns the encoding: columns ``[0, N)`` are the values of
`encode_demographics` (height and weight already standardised), columns ``[N, 2N)`` its mask (1 = known,
0 = missing); the datasets built with ``demographics=True`` concatenate the two per recording.
"""

from __future__ import annotations

import torch
from torch import nn

from ignite_trainer.data.demographics import DEMOGRAPHIC_FEATURES
from ignite_trainer.core.errors import ConfigError

#: Value columns of the demographics tensor; each has a "known" flag N columns further on.
N_DEMOGRAPHIC = len(DEMOGRAPHIC_FEATURES)


class DemographicsFusion(nn.Module):
    """Wraps an audio model that has ``embed(x)``, ``head`` and ``embedding_size`` (every built-in model).

    ``forward(x, demographics=None)`` returns ``(logits [B, 2], attention [B, T'])`` like the audio model.
    The murmur logit is the audio model's; the heart logit is the audio model's plus a term from a small
    network over ``[audio embedding, demographics embedding]``, where the demographics embedding sees each
    known value and every flag. Without ``demographics`` every field counts as missing.

    Example::

        model = DemographicsFusion(build_model("attention_cnn", n_mels=64))
        logits, attention = model(x, demographics)        # demographics [B, 2 * N_DEMOGRAPHIC]
        logits, attention = model(x)                      # as if nothing were known about the patients
    """

    def __init__(self, base: nn.Module, hidden: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        for needed in ("embed", "head", "embedding_size"):
            if not hasattr(base, needed):
                raise ConfigError(f"demographics fusion needs a model with {needed!r}; "
                                  f"{type(base).__name__} has none")
        self.base = base
        self.encode = nn.Sequential(nn.Linear(2 * N_DEMOGRAPHIC, hidden), nn.GELU())
        self.heart = nn.Sequential(nn.Dropout(dropout), nn.Linear(int(base.embedding_size) + hidden, hidden),
                                   nn.GELU(), nn.Linear(hidden, 1))

    def features(self, demographics: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``[B, 2N]`` model input: known values, missing ones exactly 0 (whatever their slot held), then the flags."""
        if demographics is None:
            return like.new_zeros(batch, 2 * N_DEMOGRAPHIC)
        if demographics.shape != (batch, 2 * N_DEMOGRAPHIC):
            raise ValueError(f"demographics of shape {tuple(demographics.shape)}: expected "
                             f"({batch}, {2 * N_DEMOGRAPHIC}) (values, then known flags)")
        demographics = demographics.to(like.dtype)
        values, known = demographics[:, :N_DEMOGRAPHIC], demographics[:, N_DEMOGRAPHIC:] > 0
        values = torch.where(known, values, torch.zeros_like(values))
        return torch.cat([values, known.to(like.dtype)], dim=1)

    def fuse(self, pooled: torch.Tensor, demographics: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The two logits from the audio embedding ``pooled`` and the batch's demographics."""
        logits = self.base.head(pooled)
        demo = self.encode(self.features(demographics, batch, pooled))
        heart = logits[:, :1] + self.heart(torch.cat([pooled, demo], dim=1))
        return torch.cat([heart, logits[:, 1:]], dim=1)

    def forward(self, x: torch.Tensor, demographics: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.base.embed(x)
        return self.fuse(pooled, demographics, x.shape[0]), attention
