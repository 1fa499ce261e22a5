"""Reader for the CirCor DigiScope layout (PhysioNet/CinC Challenge 2022): patient ``.txt`` files -> `Recording`.

The ``.txt`` files are the source of truth (they are what the Challenge's own ``helper_code.py`` reads);
``training_data.csv`` fills a label a ``.txt`` lacks and must agree with the ones it has. Real releases have
quirks (3-field recording lines in the hidden set, ``Phc``/``PhC``, ``_1`` repeats, literal ``nan``, stray
white space, renamed csv columns), so everything is compared stripped and case-insensitively.

Every defect is one line naming the file, handed to a `BadInputPolicy`: strict runs stop there, ``--skip-bad``
runs drop the patient (label problems) or the recording (file problems) and count it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.demographics import DEMOGRAPHIC_FIELDS, Demographics, demographics_from_fields
from ignite_trainer.data.records import Recording
from ignite_trainer.data.wav import check_declared_rate
from ignite_trainer.core.errors import DataError
from ignite_trainer.core.vocabulary import MURMUR_ATTRIBUTES

#: Auscultation locations, keyed by their lower-case spelling (the release writes both ``Phc`` and ``PhC``).
LOCATIONS = {"av": "AV", "pv": "PV", "tv": "TV", "mv": "MV", "phc": "Phc"}
OUTCOME_VALUES = {"abnormal": 1.0, "normal": 0.0}
MURMUR_VALUES = {"present": "Present", "absent": "Absent", "unknown": "Unknown"}
UNKNOWN_MURMUR_POLICIES = ("mask", "positive")
#: Label fields the csv may supply or must agree on, by their normalised key.
_LABEL_FIELDS = ("murmur", "murmur locations", "outcome")


@dataclass
class PatientFile:
    """What one ``<pid>.txt`` says, before any label rule is applied."""

    path: Path
    patient_id: str
    rate: float
    recordings: list[tuple[str, list[str]]]  # (location as written, file names on the line)
    fields: dict[str, str] = field(default_factory=dict)  # normalised '#Key' -> stripped value


def patient_folder(root: Path) -> Path:
    """Where the patient files are: ``root/training_data/`` in a release, or ``root`` itself."""
    return root / "training_data" if (root / "training_data").is_dir() else root


def read_circor(root: str | Path, unknown_murmur: str = "mask",
                policy: BadInputPolicy | None = None) -> list[Recording]:
    """All usable recordings under ``root`` (the release folder, or its ``training_data/`` itself).

    ``unknown_murmur``: ``"mask"`` leaves a patient's ``Unknown`` murmur out of loss and metrics,
    ``"positive"`` counts it as present. A root that does not exist or holds no patient files is always an
    error: there is nothing to skip to.
    """
    if unknown_murmur not in UNKNOWN_MURMUR_POLICIES:
        raise ValueError(f"unknown_murmur must be one of {UNKNOWN_MURMUR_POLICIES}, got {unknown_murmur!r}")
    policy = policy if policy is not None else BadInputPolicy(skip=False)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: CirCor dataset folder does not exist")
    data_dir = patient_folder(root)
    txt_files = sorted(p for p in data_dir.glob("*.txt") if p.is_file())
    if not txt_files:
        raise DataError(f"{data_dir}: no patient .txt files (expected a CirCor 2022 layout)")
    table = _read_table(root, data_dir, policy)

    recordings: list[Recording] = []
    seen_patients: dict[str, Path] = {}
    seen_recordings: set[str] = set()
    for txt in txt_files:
        patient = parse_patient_file(txt, policy)
        if patient is None:
            continue
        if patient.patient_id in seen_patients:
            first = seen_patients[patient.patient_id].name
            policy.report(f"{txt}: duplicate patient id {patient.patient_id} (also in {first})")
            continue
        seen_patients[patient.patient_id] = txt
        row = table.get(patient.patient_id)
        labels = _patient_labels(patient, row, policy)
        if labels is None:
            continue
        demographics = _patient_demographics(patient, row)
        attributes = _patient_attributes(patient, row)
        for location, names in patient.recordings:
            recording = _make_recording(data_dir, patient, location, names, labels, unknown_murmur, policy,
                                        demographics, attributes)
            if recording is None:
                continue
            if recording.recording_id in seen_recordings:
                policy.report(f"{txt}: recording {recording.recording_id} is listed twice")
                continue
            seen_recordings.add(recording.recording_id)
            recordings.append(recording)
    if not recordings:
        raise DataError(f"{data_dir}: no usable recordings ({len(policy.skipped)} bad item(s) skipped)")
    return recordings


# ---------------------------------------------------------------------------------------------- the .txt file
def parse_patient_file(path: Path, policy: BadInputPolicy | None = None) -> PatientFile | None:
    """Parse one ``<pid>.txt`` as written; None (after ``policy.report``) if it is malformed."""
    policy = policy if policy is not None else BadInputPolicy(skip=False)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
    except OSError as e:
        policy.report(f"{path}: cannot read ({e.strerror or e})")
        return None
    lines = [ln for ln in lines if ln]
    first = lines[0].split() if lines else []
    try:
        if len(first) != 3:
            raise ValueError
        patient_id, n_recordings, rate = first[0], int(first[1]), float(first[2])
        if n_recordings < 1 or not (math.isfinite(rate) and rate > 0):
            raise ValueError
    except ValueError:
        shown = lines[0] if lines else ""
        policy.report(f"{path}: first line {shown!r} is not '<patient id> <number of recordings> <sampling rate>'")
        return None

    patient = PatientFile(path=path, patient_id=patient_id, rate=rate, recordings=[])
    for line in lines[1:]:
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep:
                patient.fields[_normalise_key(key)] = value.strip()
            continue
        parts = line.split()
        if len(parts) not in (3, 4):
            policy.report(f"{path}: recording line {line!r} is not '<location> <.hea> <.wav> [<.tsv>]'")
            return None
        patient.recordings.append((parts[0], parts[1:]))
    if len(patient.recordings) != n_recordings:
        policy.report(f"{path}: first line declares {n_recordings} recording(s), file lists {len(patient.recordings)}")
        return None
    return patient


def _normalise_key(key: str) -> str:
    return " ".join(key.split()).lower().rstrip(":")


def _value(text: str | None) -> str | None:
    """A field's value, or None where it is missing (absent, empty, or the literal ``nan``)."""
    if text is None:
        return None
    text = text.strip()
    return None if not text or text.lower() == "nan" else text


# ---------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class PatientLabels:
    heart: float
    murmur_class: str  # Present / Absent / Unknown
    murmur_locations: frozenset[str]  # lower-case


def _patient_labels(patient: PatientFile, row: dict[str, str] | None,
                    policy: BadInputPolicy) -> PatientLabels | None:
    """Outcome and murmur of one patient: from the ``.txt``, else the csv; both given must agree."""
    values: dict[str, str | None] = {}
    for key in _LABEL_FIELDS:
        from_txt = _value(patient.fields.get(key))
        from_csv = _value(row.get(key)) if row is not None else None
        if from_txt is not None and from_csv is not None and key != "murmur locations" \
                and from_txt.lower() != from_csv.lower():
            policy.report(f"{patient.path}: #{key.capitalize()}: {from_txt} disagrees with "
                          f"training_data.csv ({from_csv})")
            return None
        values[key] = from_txt if from_txt is not None else from_csv

    outcome, murmur = values["outcome"], values["murmur"]
    if outcome is None:
        policy.report(f"{patient.path}: missing #Outcome (expected Abnormal or Normal)")
        return None
    if outcome.lower() not in OUTCOME_VALUES:
        policy.report(f"{patient.path}: #Outcome: {outcome!r} is not Abnormal or Normal")
        return None
    if murmur is None:
        policy.report(f"{patient.path}: missing #Murmur (expected Present, Absent or Unknown)")
        return None
    if murmur.lower() not in MURMUR_VALUES:
        policy.report(f"{patient.path}: #Murmur: {murmur!r} is not Present, Absent or Unknown")
        return None
    locations = values["murmur locations"] or ""
    return PatientLabels(
        heart=OUTCOME_VALUES[outcome.lower()],
        murmur_class=MURMUR_VALUES[murmur.lower()],
        murmur_locations=frozenset(loc.strip().lower() for loc in locations.split("+") if loc.strip()),
    )


def _recording_murmur(location: str, labels: PatientLabels, unknown_murmur: str) -> tuple[float, bool]:
    """(label, mask) of the murmur at one location, by the common rule of the Challenge entries.

    A ``Present`` patient whose ``Murmur locations`` is missing keeps the patient label at every location:
    calling those recordings Absent would contradict the patient's own label.
    """
    if labels.murmur_class == "Unknown":
        return (1.0, True) if unknown_murmur == "positive" else (0.0, False)
    if labels.murmur_class == "Absent":
        return 0.0, True
    if not labels.murmur_locations:
        return 1.0, True
    return (1.0 if location.lower() in labels.murmur_locations else 0.0), True


def _patient_demographics(patient: PatientFile, row: dict[str, str] | None) -> Demographics:
    """Age group, sex, height, weight and pregnancy from the ``.txt``; a field the ``.txt`` lacks altogether
    is taken from ``training_data.csv``. Missing values stay missing (masked later), never 0."""
    fields = {key: patient.fields[key] if key in patient.fields else (row or {}).get(key)
              for key in DEMOGRAPHIC_FIELDS}
    return demographics_from_fields(fields)


def _patient_attributes(patient: PatientFile, row: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    """The murmur descriptors the patient file (else the csv) gives, as written; missing ones left out."""
    found = []
    for head, (field_name, _classes) in MURMUR_ATTRIBUTES.items():
        key = _normalise_key(field_name)
        value = _value(patient.fields[key] if key in patient.fields else (row or {}).get(key))
        if value is not None:
            found.append((head, value))
    return tuple(found)


# ---------------------------------------------------------------------------------------------- recordings
def _make_recording(data_dir: Path, patient: PatientFile, location: str, names: list[str],
                    labels: PatientLabels, unknown_murmur: str, policy: BadInputPolicy,
                    demographics: Demographics | None = None,
                    attributes: tuple[tuple[str, str], ...] = ()) -> Recording | None:
    hea_name, wav_name = names[0], names[1]
    tsv_name = names[2] if len(names) > 2 else None
    wav_path = data_dir / wav_name
    if not wav_path.is_file():
        policy.report(f"{patient.path}: names {wav_name}, which does not exist in {data_dir}")
        return None
    try:
        check_declared_rate(wav_path, patient.rate, patient.path.name, hea_path=data_dir / hea_name)
    except DataError as e:
        policy.report(str(e))
        return None
    tsv_path = data_dir / tsv_name if tsv_name is not None else None
    murmur, murmur_known = _recording_murmur(location, labels, unknown_murmur)
    return Recording(
        recording_id=wav_path.stem,
        patient_id=patient.patient_id,
        wav_path=wav_path,
        labels=(labels.heart, murmur),
        mask=(True, murmur_known),
        location=LOCATIONS.get(location.lower(), location),
        segmentation_path=tsv_path if tsv_path is not None and tsv_path.is_file() else None,
        declared_rate=int(patient.rate) if patient.rate == int(patient.rate) else None,
        murmur_class=labels.murmur_class,
        demographics=demographics,
        murmur_attributes=attributes,
        label_file=patient.path,
    )


# ---------------------------------------------------------------------------------------------- training_data.csv
def _read_table(root: Path, data_dir: Path, policy: BadInputPolicy) -> dict[str, dict[str, str]]:
    candidates = [root / "training_data.csv", data_dir.parent / f"{data_dir.name}.csv"]
    path = next((p for p in candidates if p.is_file()), None)
    return read_training_table(path, policy) if path is not None else {}


def read_training_table(path: Path, policy: BadInputPolicy | None = None) -> dict[str, dict[str, str]]:
    """Rows of ``training_data.csv`` by patient id, each keyed by normalised (lower-case) column name.

    Columns are found by name, not position; the old name ``Locations`` is read as ``recording locations``.
    """
    policy = policy if policy is not None else BadInputPolicy(skip=False)
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if header is None:
        raise DataError(f"{path}: empty file (expected a header row with 'Patient ID')")
    columns = [_normalise_key(name) for name in header]
    columns = ["recording locations" if c == "locations" else c for c in columns]
    if "patient id" not in columns:
        raise DataError(f"{path}: no 'Patient ID' column (columns: {', '.join(h.strip() for h in header)})")
    table: dict[str, dict[str, str]] = {}
    for line_no, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        record = {name: cell.strip() for name, cell in zip(columns, row)}
        pid = record.get("patient id", "")
        if pid in table:
            policy.report(f"{path}: line {line_no}: duplicate patient id {pid}")
            continue
        table[pid] = record
    return table
