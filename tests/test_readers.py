"""The contract every dataset reader keeps, checked once over every format and every kind of bad input.

A bad input stops a strict read with one line naming the file and the problem; with ``--skip-bad`` the
same line is recorded once, the bad item is left out and every good recording is still read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import test_circor
import test_physionet2016
from conftest import by_id
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.core.errors import DataError
from ignite_trainer.core.vocabulary import FORMATS


def _two_circor_patients(root: Path) -> set[str]:
    test_circor.write_patient(root, "100")
    test_circor.write_patient(root, "200")
    return {"100_AV", "100_MV", "200_AV", "200_MV"}


def _two_physionet_records(root: Path) -> set[str]:
    test_physionet2016.write_folder(root, "a", {"a0001": "1", "a0002": "-1"})
    return {"a0001", "a0002"}


GOOD_FOLDER = {"circor2022": _two_circor_patients, "physionet2016": _two_physionet_records}
BAD_INPUTS = {"circor2022": test_circor.BAD_INPUTS, "physionet2016": test_physionet2016.BAD_INPUTS}
CASES = [(fmt, make_bad) for fmt in FORMATS for make_bad in BAD_INPUTS[fmt]]


def test_every_format_has_a_reader_and_bad_inputs_to_check() -> None:
    assert set(GOOD_FOLDER) == set(BAD_INPUTS) == set(FORMATS)


@pytest.mark.parametrize("fmt, make_bad", CASES, ids=[f"{f}-{m.__name__.strip('_')}" for f, m in CASES])
def test_a_bad_input_stops_a_strict_read_and_is_skipped_and_counted_otherwise(tmp_path: Path, fmt, make_bad) -> None:
    good = GOOD_FOLDER[fmt](tmp_path)
    bad_file, problem, survivors = make_bad(tmp_path)

    with pytest.raises(DataError) as info:
        read_recordings(tmp_path, fmt)
    message = str(info.value)
    assert message.startswith(f"{bad_file}: ") and problem in message and "\n" not in message

    policy = BadInputPolicy(skip=True)
    kept = set(by_id(read_recordings(tmp_path, fmt, policy=policy)))
    assert policy.skipped == [message]
    assert kept == good | survivors
