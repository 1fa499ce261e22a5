"""Reader for the PhysioNet/CinC Challenge 2016 layout: ``training-*/REFERENCE.csv`` -> `Recording`.

The 2016 data label only the heart (1 abnormal, -1 normal), so every murmur is masked. Its updated
``REFERENCE_withSQI.csv`` adds a signal-quality column; where it exists it is used and recordings the
annotators marked unusable (quality 0) are left out, as the Challenge's scoring did.
"""

from __future__ import annotations

from pathlib import Path

from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.records import Recording
from ignite_trainer.data.wav import check_declared_rate, read_wfdb_rate
from ignite_trainer.core.errors import DataError

HEART_VALUES = {"1": 1.0, "-1": 0.0}
QUALITY_VALUES = {"1": True, "0": False}


def read_physionet2016(root: str | Path, policy: BadInputPolicy | None = None) -> list[Recording]:
    """All usable recordings in the ``training-*`` folders under ``root`` (or in ``root`` itself, if it is one)."""
    policy = policy if policy is not None else BadInputPolicy(skip=False)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: PhysioNet 2016 dataset folder does not exist")
    folders = sorted(p for p in root.glob("training-*") if p.is_dir())
    if not folders and _reference_file(root) is not None:
        folders = [root]
    if not folders:
        raise DataError(f"{root}: no training-* folders (expected a PhysioNet 2016 layout)")

    recordings: list[Recording] = []
    seen: dict[str, Path] = {}
    for folder in folders:
        reference = _reference_file(folder)
        if reference is None:
            policy.report(f"{folder}: no REFERENCE.csv")
            continue
        for line_no, fields in _reference_rows(reference):
            recording = _make_recording(folder, reference, line_no, fields, policy)
            if recording is None:
                continue
            if recording.recording_id in seen:
                policy.report(f"{reference}: line {line_no}: duplicate recording id {recording.recording_id} "
                              f"(also in {seen[recording.recording_id]})")
                continue
            seen[recording.recording_id] = reference
            recordings.append(recording)
    if not recordings:
        raise DataError(f"{root}: no usable recordings ({len(policy.skipped)} bad item(s) skipped)")
    return recordings


def _reference_file(folder: Path) -> Path | None:
    for name in ("REFERENCE_withSQI.csv", "REFERENCE.csv"):
        if (folder / name).is_file():
            return folder / name
    return None


def _reference_rows(path: Path) -> list[tuple[int, list[str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append((line_no, [cell.strip() for cell in line.split(",")]))
    return rows


def _make_recording(folder: Path, reference: Path, line_no: int, fields: list[str],
                    policy: BadInputPolicy) -> Recording | None:
    with_quality = reference.name == "REFERENCE_withSQI.csv"
    expected = 3 if with_quality else 2
    where = f"{reference}: line {line_no}"
    if len(fields) != expected or not fields[0]:
        shape = "<record>,<1|-1>,<0|1>" if with_quality else "<record>,<1|-1>"
        policy.report(f"{where}: {','.join(fields)!r} is not '{shape}'")
        return None
    name, heart = fields[0], fields[1]
    if heart not in HEART_VALUES:
        policy.report(f"{where}: label {heart!r} for {name} is not 1 (abnormal) or -1 (normal)")
        return None
    if with_quality:
        if fields[2] not in QUALITY_VALUES:
            policy.report(f"{where}: signal quality {fields[2]!r} for {name} is not 0 or 1")
            return None
        if not QUALITY_VALUES[fields[2]]:
            return None  # annotators could not judge it: not a bad input, just not used
    wav_path = folder / f"{name}.wav"
    if not wav_path.is_file():
        policy.report(f"{where}: names {name}, but {wav_path} does not exist")
        return None
    hea_path = folder / f"{name}.hea"
    try:
        declared = read_wfdb_rate(hea_path) if hea_path.is_file() else None
        check_declared_rate(wav_path, declared, hea_path.name)
    except DataError as e:
        policy.report(str(e))
        return None
    return Recording(
        recording_id=name,
        patient_id=name,
        wav_path=wav_path,
        labels=(HEART_VALUES[heart], 0.0),
        mask=(True, False),
        declared_rate=int(declared) if declared is not None and declared == int(declared) else None,
    )
