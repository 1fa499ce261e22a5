"""The record every reader produces and every later stage consumes.

Readers (one per on-disk format) turn a dataset folder into a list of `Recording`; nothing downstream
knows which format the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ignite_trainer.core.errors import ConfigError
from ignite_trainer.data.demographics import Demographics
from ignite_trainer.core.vocabulary import LABELS  # noqa: F401  (the order of ``labels`` and ``mask``)


@dataclass(frozen=True)
class Recording:
    """One PCG recording with its patient-level labels.

    ``labels[i]`` is 0.0 or 1.0 for ``LABELS[i]``; ``mask[i]`` is False where that label is missing
    (CirCor's ``Unknown`` murmur under the ``mask`` policy, every murmur in PhysioNet 2016), and then
    ``labels[i]`` carries no meaning. ``demographics`` is the patient's (CirCor); None where the format has
    none (PhysioNet 2016), which `encode_demographics` turns into an all-masked encoding.

    Example::

        rec = read_recordings("data/circor", "circor2022")[0]
        print(rec.patient_id, rec.location, dict(zip(LABELS, rec.labels)), rec.mask)
    """

    recording_id: str
    patient_id: str
    wav_path: Path
    labels: tuple[float, float]
    mask: tuple[bool, bool]
    location: str | None = None
    segmentation_path: Path | None = None
    declared_rate: int | None = None
    #: CirCor's three-class patient murmur ("Present", "Unknown", "Absent"); None for other formats.
    murmur_class: str | None = None
    #: The patient's age group, sex, height, weight and pregnancy status; None for formats without them.
    demographics: Demographics | None = None
    #: The patient's murmur descriptors as written (`MURMUR_ATTRIBUTES` head name -> value), missing ones left
    #: out; empty for formats without them. Which recordings a descriptor applies to is `data.annotations`' rule.
    murmur_attributes: tuple[tuple[str, str], ...] = ()
    #: The file the labels came from (CirCor's ``<patient>.txt``), for messages; None where there is none.
    label_file: Path | None = None


def require_demographics(recordings: Sequence[Recording], fmt: str, field: str = "demographics",
                         source: str = "config") -> None:
    """Refuse a model that fuses demographics on data that records none (PhysioNet 2016): one `ConfigError`
    naming the setting and the format, raised before anything is trained or written.

    Example::

        if config.demographics:
            require_demographics(recordings, config.format, field="demographics")
    """
    if not any(r.demographics is not None for r in recordings):
        raise ConfigError(f"{source}: {field} needs the patients' demographics (age, sex, height, weight, "
                          f"pregnancy), and format={fmt!r} records none; turn {field} off for this data")
