"""Recordings to predict on, from whatever a user points at: WAV files, or dataset folders of any format.

Prediction needs no labels, so unlike `data.readers` this reads unlabelled folders too (a hidden test
set, a folder of WAV files) and recognises a folder's format from its layout (`detect_format`). The
formats are those of `vocabulary.FORMATS`; their file names and layouts are known here and in their readers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.circor import LOCATIONS, parse_patient_file, patient_folder, read_training_table
from ignite_trainer.data.records import Recording
from ignite_trainer.core.errors import DataError

__all__ = ["detect_format", "has_labels", "discover_recordings", "is_patient_file"]

#: A CirCor recording name, ``<patient id>_<location>[_<n>]``.
_CIRCOR_NAME = re.compile(r"^(?P<pid>.+?)_(?:" + "|".join(LOCATIONS) + r")(?:_\d+)?$", re.IGNORECASE)


def is_patient_file(path: Path) -> bool:
    """Whether a ``.txt`` file is a CirCor patient file: its first line is ``<its own name> <n> <rate>``.

    Only the header is read: a README or notes file beside the WAVs is not a patient file, while a patient
    file with a broken body still is one (and reading it reports what is wrong).
    """
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            first = next((line.split() for line in f if line.strip()), [])
    except OSError:
        return False
    return len(first) == 3 and first[0] == path.stem


def _patient_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.txt")) if is_patient_file(p)]


def detect_format(root: str | Path) -> str | None:
    """``"circor2022"`` (patient ``.txt`` files, `is_patient_file`), ``"physionet2016"`` (``training-*`` or
    ``REFERENCE.csv``), or None for a plain folder of WAV files (which may hold other ``.txt`` files)."""
    root = Path(root)
    if _patient_files(patient_folder(root)):
        return "circor2022"
    if any(p.is_dir() for p in root.glob("training-*")) or any(root.glob("REFERENCE*.csv")):
        return "physionet2016"
    return None


def has_labels(root: str | Path, fmt: str | None) -> bool:
    """Whether a dataset folder carries any label at all (a hidden test set or a WAV folder does not)."""
    root = Path(root)
    if fmt == "circor2022":
        lenient = BadInputPolicy(skip=True)
        for txt in _patient_files(patient_folder(root)):
            patient = parse_patient_file(txt, lenient)
            if patient and any(_given(patient.fields.get(k)) for k in ("outcome", "murmur")):
                return True
        table = root / "training_data.csv"
        if table.is_file():
            rows = read_training_table(table, lenient)
            return any(_given(row.get(k)) for row in rows.values() for k in ("outcome", "murmur"))
        return False
    if fmt == "physionet2016":
        return any(root.glob("REFERENCE*.csv")) or any(root.glob("training-*/REFERENCE*.csv"))
    return False


def _given(value: str | None) -> bool:
    return value is not None and value.strip() != "" and value.strip().lower() != "nan"


def _unlabelled(wav: Path, patient_id: str | None = None, location: str | None = None) -> Recording:
    if patient_id is None:
        m = _CIRCOR_NAME.match(wav.stem)
        patient_id = m.group("pid") if m else wav.stem
    return Recording(recording_id=wav.stem, patient_id=patient_id, wav_path=wav, labels=(0.0, 0.0),
                     mask=(False, False), location=location)


def discover_recordings(paths: Sequence[str | Path], fmt: str | None = None) -> list[Recording]:
    """WAV files and dataset folders -> recordings with every label masked (prediction needs none).

    A folder is read in ``fmt`` or the detected format: CirCor patient files group recordings by patient;
    PhysioNet 2016 and plain WAV folders give one patient per recording, except that CirCor-style names
    (``<pid>_<LOC>[_<n>].wav``) are grouped by ``<pid>``. A file named twice is read once.

    Example::

        recs = discover_recordings(["new_patient/", "extra/9999_AV.wav"])
    """
    found: list[Recording] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            if path.suffix.lower() != ".wav":
                raise DataError(f"{path}: not a .wav file or a dataset folder")
            found.append(_unlabelled(path))
        elif path.is_dir():
            found.extend(_folder_recordings(path, fmt or detect_format(path)))
        else:
            raise DataError(f"{path}: no such file or folder")
    unique: dict[str, Recording] = {}
    for r in found:
        other = unique.get(r.recording_id)
        if other is not None and other.wav_path.resolve() != r.wav_path.resolve():
            raise DataError(f"{r.wav_path}: recording id {r.recording_id} is also {other.wav_path}")
        unique.setdefault(r.recording_id, r)
    return list(unique.values())


def _folder_recordings(root: Path, fmt: str | None) -> list[Recording]:
    if fmt == "circor2022":
        data_dir = patient_folder(root)
        recordings = []
        for txt in _patient_files(data_dir):
            patient = parse_patient_file(txt)
            assert patient is not None  # the strict policy raises instead
            for location, names in patient.recordings:
                wav = data_dir / names[1]
                if not wav.is_file():
                    raise DataError(f"{txt}: names {names[1]}, which does not exist in {data_dir}")
                recordings.append(_unlabelled(wav, patient.patient_id, LOCATIONS.get(location.lower(), location)))
        return recordings
    folders = sorted(p for p in root.glob("training-*") if p.is_dir()) if fmt == "physionet2016" else []
    wavs = [w for folder in (folders or [root]) for w in sorted(folder.glob("*.wav"))]
    if not wavs:
        raise DataError(f"{root}: no .wav files and no dataset layout (CirCor 2022 or PhysioNet 2016)")
    return [_unlabelled(w) for w in wavs]
