"""One entry point from a labelled dataset folder to `Recording` objects, whatever its on-disk format.

Everything after reading is format-agnostic. The list of formats is `vocabulary.FORMATS`; this module maps
each to its reader, and `data.discovery` recognises them in an unknown folder (for prediction).
"""

from __future__ import annotations

from pathlib import Path

from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.circor import read_circor
from ignite_trainer.data.physionet2016 import read_physionet2016
from ignite_trainer.data.records import Recording
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.core.vocabulary import FORMATS


def read_recordings(root: str | Path, fmt: str, unknown_murmur: str = "mask",
                    policy: BadInputPolicy | None = None) -> list[Recording]:
    """Read the dataset at ``root`` in format ``fmt`` (``circor2022`` or ``physionet2016``).

    ``unknown_murmur`` only matters for CirCor: PhysioNet 2016 has no murmur labels, so all are masked.

    Example::

        recordings = read_recordings("data/circor", "circor2022", policy=BadInputPolicy(skip=True))
    """
    if fmt == "circor2022":
        return read_circor(root, unknown_murmur=unknown_murmur, policy=policy)
    if fmt == "physionet2016":
        return read_physionet2016(root, policy=policy)
    raise ConfigError(f"format={fmt!r} is not one of: {', '.join(FORMATS)}")
