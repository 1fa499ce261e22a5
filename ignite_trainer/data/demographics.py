"""A patient's demographics as CirCor records them, and their fixed-length encoding for a model.

CirCor's patient files carry ``#Age`` (an age group), ``#Sex``, ``#Height`` (cm), ``#Weight`` (kg) and
``#Pregnancy status``. Four of the five best outcome entries of the 2022 Challenge used them beside the audio.
Any of them may be missing (the literal ``nan``; CirCor's pregnant adults have no age group, about 8 % of
patients no height or weight): a missing value is *masked*, never encoded as 0, so a model can tell "no
value" from "a small value". PhysioNet 2016 records none of them: every feature is masked there.

The encoding is `DEMOGRAPHIC_FEATURES` long: the five age groups one-hot, sex (1 female, 0 male), height and
weight standardised with the fixed constants `HEIGHT_CM` and `WEIGHT_KG` (round figures near the spread of
CirCor's mostly paediatric patients, fixed so that an encoding never depends on which patients are in a
split), and pregnancy (1 pregnant, 0 not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch



#: CirCor's age groups, in the order of their one-hot features.
AGE_GROUPS: tuple[str, ...] = ("Neonate", "Infant", "Child", "Adolescent", "Young Adult")
#: Names of the encoded features, in order (the length of every encoding).
DEMOGRAPHIC_FEATURES: tuple[str, ...] = (
    "age_neonate", "age_infant", "age_child", "age_adolescent", "age_young_adult",
    "sex_female", "height", "weight", "pregnant",
)
#: The patient-file fields they come from, as normalised (lower-case) keys.
DEMOGRAPHIC_FIELDS: tuple[str, ...] = ("age", "sex", "height", "weight", "pregnancy status")
#: (mean, std) used to standardise height in cm and weight in kg.
HEIGHT_CM: tuple[float, float] = (110.0, 30.0)
WEIGHT_KG: tuple[float, float] = (25.0, 15.0)
_AGE_BY_KEY = {group.lower(): group for group in AGE_GROUPS}
_SEX_BY_KEY = {"female": "Female", "male": "Male"}
_BOOL_BY_KEY = {"true": True, "false": False}


@dataclass(frozen=True)
class Demographics:
    """One patient's demographics; ``None`` where the value is missing or could not be read.

    Example::

        demo = demographics_from_fields({"age": "Child", "sex": "Female", "height": "123.0", "weight": "nan"})
        values, mask = encode_demographics(demo)  # weight is masked, not 0
    """

    age_group: str | None = None
    sex: str | None = None
    height_cm: float | None = None
    weight_kg: float | None = None
    pregnant: bool | None = None


def demographics_from_fields(fields: Mapping[str, str | None]) -> Demographics:
    """Demographics from a patient's ``#Key: value`` fields keyed by lower-case name (``"pregnancy status"``).

    Missing keys, empty values and ``nan`` are missing; so is a value that is not one of CirCor's (an unknown
    age group, a height that is not a positive number): these are features, not labels, so an odd value is
    left out of the model's input rather than stopping the run.
    """

    def text(key: str) -> str | None:
        value = fields.get(key)
        value = value.strip() if isinstance(value, str) else None
        return None if not value or value.lower() == "nan" else value

    def lookup(key: str, table: Mapping[str, object]):
        value = text(key)
        return table.get(" ".join(value.lower().split())) if value is not None else None

    def positive(key: str) -> float | None:
        value = text(key)
        try:
            number = float(value) if value is not None else math.nan
        except ValueError:
            return None
        return number if math.isfinite(number) and number > 0 else None

    return Demographics(age_group=lookup("age", _AGE_BY_KEY), sex=lookup("sex", _SEX_BY_KEY),
                        height_cm=positive("height"), weight_kg=positive("weight"),
                        pregnant=lookup("pregnancy status", _BOOL_BY_KEY))


def encode_demographics(demographics: Demographics | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, mask)``, both ``[len(DEMOGRAPHIC_FEATURES)]`` float32; ``mask`` is 1 where a value is known
    and 0 where it is missing (its value is then 0 and carries no meaning). ``None``: everything masked.

    Example::

        values, mask = encode_demographics(recording.demographics)
        model_input = torch.cat([values, mask])  # a fusion head sees which values are missing
    """
    values = torch.zeros(len(DEMOGRAPHIC_FEATURES))
    mask = torch.zeros(len(DEMOGRAPHIC_FEATURES))
    if demographics is None:
        return values, mask
    d = demographics
    if d.age_group is not None:
        values[AGE_GROUPS.index(d.age_group)] = 1.0
        mask[: len(AGE_GROUPS)] = 1.0
    known = {
        "sex_female": None if d.sex is None else float(d.sex == "Female"),
        "height": None if d.height_cm is None else (d.height_cm - HEIGHT_CM[0]) / HEIGHT_CM[1],
        "weight": None if d.weight_kg is None else (d.weight_kg - WEIGHT_KG[0]) / WEIGHT_KG[1],
        "pregnant": None if d.pregnant is None else float(d.pregnant),
    }
    for name, value in known.items():
        if value is not None:
            i = DEMOGRAPHIC_FEATURES.index(name)
            values[i], mask[i] = value, 1.0
    return values, mask


def encode_many(demographics: Sequence[Demographics | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_demographics` of each, stacked: ``([N, D], [N, D])``.

    Example::

        values, mask = encode_many([r.demographics for r in dataset.recordings])
    """
    pairs = [encode_demographics(d) for d in demographics]
    if not pairs:
        empty = torch.zeros(0, len(DEMOGRAPHIC_FEATURES))
        return empty, empty.clone()
    return torch.stack([v for v, _ in pairs]), torch.stack([m for _, m in pairs])
