"""CirCor's annotations beyond Present/Absent, as targets: murmur descriptors per recording, heart-cycle states per frame.

The one owner of two rules:

* **which recordings a murmur descriptor applies to**: a descriptor (systolic timing, grading, ...) describes
  the murmur a clinician heard, so it is a target only on a recording of a ``Present`` patient where that
  murmur is labelled present (its location is among the patient's murmur locations, or the patient lists
  none), and only where the field has a value. Everywhere else (an ``Absent`` or ``Unknown`` patient, a
  location without the murmur, ``nan``) the target is missing and masked out of the loss and the scores;
* **how a ``.tsv`` becomes frame states**: the ``.tsv`` rows are ``start<TAB>end<TAB>state`` in seconds, states
  1-4 = S1, systole, S2, diastole and 0 = not annotated. Feature frame ``t`` covers the hop interval
  ``[t, t + 1) / frames_per_second`` and takes the state at that interval's centre; a frame in state 0 or in no
  row is missing (-1). A recording without a ``.tsv`` has every frame missing.

Example::

    targets = attribute_targets(recordings, ("systolic_timing", "systolic_grading"))   # [N, 2], -1 = missing
    states = frame_states(read_states(rec.segmentation_path), n_frames=1200, frames_per_second=100.0)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ignite_trainer.core.errors import ConfigError, DataError
from ignite_trainer.core.vocabulary import HEART_STATES, MURMUR_ATTRIBUTES, SEGMENTATION
from ignite_trainer.data.records import Recording

#: Target value of a missing entry (a masked descriptor, an unannotated frame).
MISSING = -1


# ---------------------------------------------------------------------------------------------- descriptors
def describes_murmur(recording: Recording) -> bool:
    """Whether the patient's murmur descriptors are targets of this recording (see the module's rule)."""
    return recording.murmur_class == "Present" and recording.mask[1] and recording.labels[1] == 1.0


def attribute_class(recording: Recording, head: str) -> int:
    """The class index of descriptor ``head`` on ``recording``, or `MISSING`.

    A value that is not one of the head's classes (compared case-insensitively, spaces ignored) is a
    `DataError` naming the patient file, the field and the value.
    """
    field_name, classes = MURMUR_ATTRIBUTES[head]
    value = dict(recording.murmur_attributes).get(head)
    if value is None or not describes_murmur(recording):
        return MISSING
    wanted = "".join(value.split()).lower()
    for k, name in enumerate(classes):
        if "".join(name.split()).lower() == wanted:
            return k
    where = recording.label_file or recording.wav_path
    raise DataError(f"{where}: #{field_name}: {value!r} is not one of {', '.join(classes)}")


def attribute_targets(recordings: Sequence[Recording], heads: Sequence[str]) -> np.ndarray:
    """``[len(recordings), len(heads)]`` int64 class indices, `MISSING` where masked."""
    out = np.full((len(recordings), len(heads)), MISSING, dtype=np.int64)
    for i, rec in enumerate(recordings):
        for j, head in enumerate(heads):
            out[i, j] = attribute_class(rec, head)
    return out


# ---------------------------------------------------------------------------------------------- heart-cycle states
def read_states(path: Path) -> list[tuple[float, float, int]]:
    """The rows of a ``.tsv`` segmentation file; a malformed one is a `DataError` naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 3:
                raise ValueError
            start, end, state = float(parts[0]), float(parts[1]), int(float(parts[2]))
            if not (math.isfinite(start) and math.isfinite(end)) or end < start or start < 0 \
                    or not 0 <= state <= len(HEART_STATES) or float(parts[2]) != state:
                raise ValueError
        except ValueError:
            raise DataError(f"{path}: line {line_no}: {line.strip()!r} is not '<start s> <end s> <state 0-"
                            f"{len(HEART_STATES)}>' with start <= end") from None
        rows.append((start, end, state))
    return rows


def frame_states(rows: Sequence[tuple[float, float, int]], n_frames: int, frames_per_second: float) -> np.ndarray:
    """``[n_frames]`` int8: the state (0 = S1 ... 3 = diastole) at each frame's centre, `MISSING` where unannotated."""
    out = np.full(n_frames, MISSING, dtype=np.int8)
    centres = (np.arange(n_frames) + 0.5) / frames_per_second
    for start, end, state in rows:
        if state == 0:
            continue
        lo, hi = np.searchsorted(centres, [start, end], side="left")
        out[lo:hi] = state - 1
    return out


# ---------------------------------------------------------------------------------------------- checks
def attribute_heads(heads: Sequence[str]) -> tuple[str, ...]:
    """The descriptor heads among ``heads``, in `MURMUR_ATTRIBUTES`' order."""
    return tuple(h for h in MURMUR_ATTRIBUTES if h in heads)


def check_head_labels(recordings: Sequence[Recording], heads: Sequence[str], fmt: str,
                      source: str = "config") -> None:
    """Refuse a head whose labels the data does not have at all, and a descriptor value outside its classes.

    A descriptor head needs at least one recording it describes with a value (`attribute_class`); the
    segmentation head needs at least one recording with a ``.tsv``, and every ``.tsv`` must read
    (`read_states`). Recordings without one are masked.
    """
    described = [r for r in recordings if describes_murmur(r)]
    for head in attribute_heads(heads):
        field_name = MURMUR_ATTRIBUTES[head][0]
        known = [attribute_class(r, head) for r in described]  # raises on a value outside the classes
        if not any(k != MISSING for k in known):
            raise ConfigError(f"{source}: heads: {head} needs CirCor's '{field_name}' on patients with a murmur, "
                              f"and none of the {len(recordings)} recordings (format={fmt!r}) has one; "
                              f"drop {head} from heads for this data"
                              + (" ('systolic' names the five systolic descriptors)" if head.startswith("diastolic_")
                                 else ""))
    if SEGMENTATION in heads:
        for r in recordings:
            if r.segmentation_path is not None:
                read_states(r.segmentation_path)  # a malformed .tsv is refused before anything is written
    if SEGMENTATION in heads and not any(r.segmentation_path is not None for r in recordings):
        raise ConfigError(f"{source}: heads: {SEGMENTATION} needs the recordings' .tsv heart-cycle states, and "
                          f"none of the {len(recordings)} recordings (format={fmt!r}) has one; "
                          f"drop {SEGMENTATION} from heads for this data")
