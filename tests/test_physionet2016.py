"""PhysioNet 2016 reader: heart labels from REFERENCE.csv, quality filtering, murmur always masked, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import by_id
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.physionet2016 import read_physionet2016
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.data.synthetic import sample_patient, write_synthetic
from ignite_trainer.data.wav import wav_info, write_wav
from ignite_trainer.core.errors import DataError


def write_folder(root: Path, letter: str, labels: dict[str, str], quality: dict[str, str] | None = None,
                 rate: int = 2000, missing: tuple[str, ...] = ()) -> Path:
    folder = root / f"training-{letter}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in labels:
        if name not in missing:
            write_wav(folder / f"{name}.wav", rate, (np.arange(1000) % 40 * 200).astype(np.int16))
    (folder / "REFERENCE.csv").write_text("".join(f"{n},{v}\n" for n, v in labels.items()))
    if quality is not None:
        (folder / "REFERENCE_withSQI.csv").write_text("".join(f"{n},{v},{quality[n]}\n" for n, v in labels.items()))
    return folder


def test_reads_back_what_the_generator_wrote(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "p2016", 8, seed=5, fmt="physionet2016")
    recordings = read_physionet2016(root)
    patients = [sample_patient(5, i) for i in range(8)]
    assert len(recordings) == 8
    assert sorted(p.name for p in root.iterdir()) == [f"training-{c}" for c in "abcdef"]
    # patients are spread over the folders in order, numbered within each folder
    heart = [r.labels[0] for r in sorted(recordings, key=lambda r: (r.wav_path.parent.name, r.recording_id))]
    assert heart == [1.0 if p.outcome == "Abnormal" else 0.0 for p in patients]
    assert set(heart) == {0.0, 1.0}
    for r in recordings:
        assert r.patient_id == r.recording_id and r.mask == (True, False) and r.murmur_class is None
        assert r.declared_rate == 2000 and wav_info(r.wav_path)[0] == 2000
    assert by_id(read_recordings(root, "physionet2016", unknown_murmur="positive")) == by_id(recordings)


def test_labels_one_is_abnormal_minus_one_normal(tmp_path: Path) -> None:
    write_folder(tmp_path, "a", {"a0001": "1", "a0002": "-1"})
    write_folder(tmp_path, "b", {"b0001": " -1 "})
    recordings = by_id(read_physionet2016(tmp_path))
    assert {k: r.labels for k, r in recordings.items()} == {"a0001": (1.0, 0.0), "a0002": (0.0, 0.0), "b0001": (0.0, 0.0)}
    assert recordings["a0001"].declared_rate is None  # no .hea beside it


def test_sqi_file_wins_and_drops_unusable_recordings(tmp_path: Path) -> None:
    write_folder(tmp_path, "a", {"a0001": "1", "a0002": "-1", "a0003": "1"}, quality={"a0001": "1", "a0002": "0", "a0003": "1"})
    policy = BadInputPolicy(skip=True)
    assert sorted(by_id(read_physionet2016(tmp_path, policy=policy))) == ["a0001", "a0003"]
    assert policy.skipped == []  # low quality is a decision, not a bad input


def test_a_single_folder_can_be_the_root(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, "c", {"c0001": "1"})
    assert list(by_id(read_physionet2016(folder))) == ["c0001"]


def _missing_wav(root: Path):
    folder = write_folder(root, "c", {"c0001": "1", "c0002": "-1"}, missing=("c0002",))
    return folder / "REFERENCE.csv", "line 2: names c0002, but", {"c0001"}


def _unknown_label(root: Path):
    folder = write_folder(root, "c", {"c0001": "1", "c0002": "0"})
    return folder / "REFERENCE.csv", "line 2: label '0' for c0002 is not 1 (abnormal) or -1 (normal)", {"c0001"}


def _bad_quality(root: Path):
    folder = write_folder(root, "c", {"c0001": "1", "c0002": "1"}, quality={"c0001": "1", "c0002": "maybe"})
    return folder / "REFERENCE_withSQI.csv", "signal quality 'maybe' for c0002 is not 0 or 1", {"c0001"}


def _duplicate_id(root: Path):
    folder = write_folder(root, "c", {"a0001": "-1", "c0002": "1"})
    return folder / "REFERENCE.csv", "duplicate recording id a0001", {"c0002"}


def _rate_mismatch(root: Path):
    folder = write_folder(root, "c", {"c0001": "1", "c0002": "1"})
    (folder / "c0002.hea").write_text("c0002 1 4000 1000\nc0002.wav 16+44 1 16 0 0 0 0 PCG\n")
    return folder / "c0002.wav", "WAV header says 2000 Hz, c0002.hea declares 4000 Hz", {"c0001"}


def _malformed_row(root: Path):
    folder = write_folder(root, "c", {"c0001": "1"})
    (folder / "REFERENCE.csv").write_text("c0001,1\nc0002\n")
    return folder / "REFERENCE.csv", "line 2: 'c0002' is not '<record>,<1|-1>'", {"c0001"}



#: Each writes one bad input into a folder of a0001 and a0002 and returns (bad file, problem, surviving ids);
#: `test_readers` runs them against the reader contract.
BAD_INPUTS = [_missing_wav, _unknown_label, _bad_quality, _duplicate_id, _rate_mismatch, _malformed_row]



def test_folder_without_reference_is_bad_input(tmp_path: Path) -> None:
    write_folder(tmp_path, "a", {"a0001": "1"})
    (tmp_path / "training-b").mkdir()
    with pytest.raises(DataError, match=r"training-b: no REFERENCE\.csv$"):
        read_physionet2016(tmp_path)
    policy = BadInputPolicy(skip=True)
    assert list(by_id(read_physionet2016(tmp_path, policy=policy))) == ["a0001"] and len(policy.skipped) == 1


@pytest.mark.parametrize("skip", [False, True])
def test_nonexistent_or_empty_root_is_always_an_error(tmp_path: Path, skip: bool) -> None:
    policy = BadInputPolicy(skip=skip)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nowhere'}: PhysioNet 2016 dataset folder does not exist$"):
        read_physionet2016(tmp_path / "nowhere", policy=policy)
    with pytest.raises(DataError, match=rf"^{tmp_path}: no training-\* folders"):
        read_physionet2016(tmp_path, policy=policy)
    write_folder(tmp_path, "a", {"a0001": "1"}, quality={"a0001": "0"})
    with pytest.raises(DataError, match=r"no usable recordings"):
        read_physionet2016(tmp_path, policy=policy)
