"""Late fusion of patient demographics with the audio embedding, for the outcome (``heart``) logit only.

Age, sex, body size and pregnancy carry prior information about an abnormal outcome that a 4 s window of
sound cannot (a neonate's heart rate is not abnormal, a pregnant patient's flow murmur is expected), while the
murmur label is about the sound alone, so only the heart logit sees them. CirCor leaves many of these fields
empty, and an empty field is not a zero: every feature travels with a "known" flag, a missing value is
replaced by zero *inside* the model and only its flag reaches the weights, so a missing value contributes
exactly what "missing" contributes, whatever number sits in its slot (NaN included).

The tensor layout a batch carries (``demographics [B, 2 * len(DEMOGRAPHIC_FEATURES)]``, float32):
columns ``[0, N)`` are the values in `DEMOGRAPHIC_FEATURES` order, columns ``[N, 2N)`` the matching flags
(1 = known, 0 = missing). `encode_demographics` builds one row from a patient's fields.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ignite_trainer.errors import ConfigError, DataError

#: CirCor's age groups, in the order of the one-hot columns; an empty age ("nan", CirCor's adults) is missing.
AGE_GROUPS = ("Neonate", "Infant", "Child", "Adolescent", "Young Adult")

#: Value columns of the demographics tensor; each has a "known" flag N columns further on.
DEMOGRAPHIC_FEATURES = (
    "age_neonate", "age_infant", "age_child", "age_adolescent", "age_young_adult",  # one-hot age group
    "sex_female",  # 1 female, 0 male
    "height_cm",
    "weight_kg",
    "pregnant",  # 1 pregnant, 0 not
)
N_DEMOGRAPHIC = len(DEMOGRAPHIC_FEATURES)

#: Fixed centring and scale applied to the known values inside the model (roughly CirCor's spread), so that
#: height and weight enter on the same footing as the 0/1 columns.
DEMOGRAPHIC_CENTER = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 110.0, 25.0, 0.0)
DEMOGRAPHIC_SCALE = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 35.0, 18.0, 1.0)


def encode_demographics(age: str | None = None, sex: str | None = None, height_cm: float | None = None,
                        weight_kg: float | None = None, pregnant: bool | None = None) -> torch.Tensor:
    """One patient's demographics as a row ``[2 * N_DEMOGRAPHIC]``: values, then known flags.

    ``None``, an empty string, ``"nan"`` or a non-finite number is missing. Unknown age or sex strings and a
    height or weight that is not positive are a `DataError` that names the value.

    Example::

        row = encode_demographics(age="Child", sex="Female", height_cm=120.0, weight_kg=None, pregnant=False)
        row[:N_DEMOGRAPHIC]   # age_child = 1, sex_female = 1, height 120, weight 0 (missing), pregnant 0
        row[N_DEMOGRAPHIC:]   # flags: age 1 x5, sex 1, height 1, weight 0, pregnant 1
    """
    values = [0.0] * N_DEMOGRAPHIC
    known = [0.0] * N_DEMOGRAPHIC
    if not _missing(age):
        if age not in AGE_GROUPS:
            raise DataError(f"age {age!r}: expected one of {', '.join(AGE_GROUPS)} or empty")
        values[AGE_GROUPS.index(age)] = 1.0
        known[:len(AGE_GROUPS)] = [1.0] * len(AGE_GROUPS)
    i = DEMOGRAPHIC_FEATURES.index("sex_female")
    if not _missing(sex):
        if str(sex).lower() not in ("female", "male"):
            raise DataError(f"sex {sex!r}: expected Female, Male or empty")
        values[i], known[i] = float(str(sex).lower() == "female"), 1.0
    for name, value in (("height_cm", height_cm), ("weight_kg", weight_kg)):
        if not _missing(value):
            number = float(value)  # type: ignore[arg-type]
            if number <= 0:
                raise DataError(f"{name.split('_')[0]} {value!r}: must be positive")
            i = DEMOGRAPHIC_FEATURES.index(name)
            values[i], known[i] = number, 1.0
    i = DEMOGRAPHIC_FEATURES.index("pregnant")
    if not _missing(pregnant):
        values[i], known[i] = float(bool(pregnant)), 1.0
    return torch.tensor(values + known, dtype=torch.float32)


def _missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in ("", "nan", "none")
    return isinstance(value, float) and not math.isfinite(value)


class DemographicsFusion(nn.Module):
    """Wraps an audio model that has ``embed(x)``, ``head`` and ``embedding_size`` (every built-in model).

    ``forward(x, demographics=None)`` returns ``(logits [B, 2], attention [B, T'])`` like the audio model.
    The murmur logit is the audio model's; the heart logit is the audio model's plus a term from a small
    network over ``[audio embedding, demographics embedding]``, where the demographics embedding sees each
    known value (centred and scaled) and every flag. Without ``demographics`` every field counts as missing.

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
        self.register_buffer("center", torch.tensor(DEMOGRAPHIC_CENTER), persistent=False)
        self.register_buffer("scale", torch.tensor(DEMOGRAPHIC_SCALE), persistent=False)

    def features(self, demographics: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``[B, 2N]`` model input: known values centred and scaled, missing ones exactly 0, then the flags."""
        if demographics is None:
            return like.new_zeros(batch, 2 * N_DEMOGRAPHIC)
        if demographics.shape != (batch, 2 * N_DEMOGRAPHIC):
            raise ValueError(f"demographics of shape {tuple(demographics.shape)}: expected "
                             f"({batch}, {2 * N_DEMOGRAPHIC}) (values, then known flags)")
        demographics = demographics.to(like.dtype)
        values, known = demographics[:, :N_DEMOGRAPHIC], demographics[:, N_DEMOGRAPHIC:] > 0
        values = torch.where(known, (values - self.center) / self.scale, torch.zeros_like(values))
        return torch.cat([values, known.to(like.dtype)], dim=1)

    def forward(self, x: torch.Tensor, demographics: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.base.embed(x)
        logits = self.base.head(pooled)
        demo = self.encode(self.features(demographics, x.shape[0], pooled))
        heart = logits[:, :1] + self.heart(torch.cat([pooled, demo], dim=1))
        return torch.cat([heart, logits[:, 1:]], dim=1), attention
