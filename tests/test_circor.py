"""CirCor 2022 reader: labels and masks from the patient files, the release's quirks, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import by_id
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.circor import parse_patient_file, read_circor, read_training_table
from ignite_trainer.data.demographics import (DEMOGRAPHIC_FEATURES, HEIGHT_CM, WEIGHT_KG, Demographics,
                                              demographics_from_fields, encode_demographics, encode_many)
from ignite_trainer.data.records import require_demographics
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.data.synthetic import sample_patient, write_synthetic
from ignite_trainer.data.wav import write_wav
from ignite_trainer.core.errors import ConfigError, DataError

SEED = 11
N_PATIENTS = 24


# ---------------------------------------------------------------------------------------------- helpers
def write_patient(data_dir: Path, pid: str, locations: list[str] | None = None, *, murmur: str = "Absent",
                  murmur_locations: str = "nan", outcome: str | None = "Normal", rate: int = 4000,
                  wav_rate: int | None = None, tsv: bool = True, three_fields: bool = False,
                  first_line: str | None = None, extra: str = "", skip_wavs: tuple[str, ...] = ()) -> Path:
    """A minimal but complete CirCor patient: ``<pid>.txt`` plus a short WAV, ``.hea`` and ``.tsv`` per line."""
    data_dir.mkdir(parents=True, exist_ok=True)
    locations = locations or ["AV", "MV"]
    names, seen = [], {}
    for loc in locations:
        count = seen.get(loc, 0)
        seen[loc] = count + 1
        names.append((loc, f"{pid}_{loc}" + (f"_{count}" if count else "")))
    lines = [first_line if first_line is not None else f"{pid} {len(names)} {rate}"]
    for loc, name in names:
        files = [f"{name}.hea", f"{name}.wav"] + ([] if three_fields else [f"{name}.tsv"])
        lines.append(" ".join([loc] + files))
        if name not in skip_wavs:
            write_wav(data_dir / f"{name}.wav", wav_rate or rate, (np.arange(2000) % 50 * 100).astype(np.int16))
        (data_dir / f"{name}.hea").write_text(f"{name} 1 {rate} 2000\n{name}.wav 16+44 1 16 0 0 0 0 {loc}\n")
        if tsv:
            (data_dir / f"{name}.tsv").write_text("0.0\t0.1\t1\n")
    lines += ["#Age: Child", "#Sex: Female", f"#Murmur: {murmur}", f"#Murmur locations: {murmur_locations}"]
    if outcome is not None:
        lines.append(f"#Outcome: {outcome}")
    path = data_dir / f"{pid}.txt"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("circor") / "set", N_PATIENTS, SEED)


# ---------------------------------------------------------------------------------------------- round trip
def test_reads_back_what_the_generator_wrote(generated: Path) -> None:
    patients = {p.patient_id: p for p in (sample_patient(SEED, i) for i in range(N_PATIENTS))}
    recordings = read_circor(generated)
    assert len(recordings) == sum(len(p.recordings) for p in patients.values())
    assert {p.murmur for p in patients.values()} == {"Present", "Absent", "Unknown"}, "fixture must cover all classes"
    for r in recordings:
        patient = patients[r.patient_id]
        plan = next(p for p in patient.recordings if p.name == r.recording_id)
        assert r.location == plan.location
        assert r.wav_path == generated / "training_data" / f"{plan.name}.wav"
        assert r.segmentation_path == generated / "training_data" / f"{plan.name}.tsv"
        assert r.declared_rate == 4000
        assert r.murmur_class == patient.murmur
        assert r.labels[0] == (1.0 if patient.outcome == "Abnormal" else 0.0) and r.mask[0]
        if patient.murmur == "Unknown":
            assert r.mask[1] is False
        else:
            assert r.mask[1] is True
            assert r.labels[1] == float(patient.murmur == "Present" and plan.location in patient.murmur_locations)
    assert any(r.labels[1] == 1.0 for r in recordings) and any(r.labels[1] == 0.0 and r.mask[1] for r in recordings)


def test_unknown_murmur_counts_as_present_under_positive_policy(generated: Path) -> None:
    unknown = [r for r in read_circor(generated, unknown_murmur="positive") if r.murmur_class == "Unknown"]
    assert unknown and all(r.labels[1] == 1.0 and r.mask[1] for r in unknown)
    with pytest.raises(ValueError):
        read_circor(generated, unknown_murmur="ignore")


def test_dispatch_by_format(generated: Path) -> None:
    assert by_id(read_recordings(generated, "circor2022")) == by_id(read_circor(generated))
    with pytest.raises(ConfigError, match="format='wfdb'"):
        read_recordings(generated, "wfdb")


def test_root_may_be_the_training_data_folder_itself(generated: Path) -> None:
    assert by_id(read_circor(generated / "training_data")) == by_id(read_circor(generated))


# ---------------------------------------------------------------------------------------------- demographics
def test_demographics_read_back_what_the_generator_wrote(generated: Path) -> None:
    patients = {p.patient_id: p for p in (sample_patient(SEED, i) for i in range(N_PATIENTS))}
    recordings = read_circor(generated)
    for r in recordings:
        p, d = patients[r.patient_id], r.demographics
        assert d == Demographics(age_group=p.age, sex=p.sex, height_cm=p.height, weight_kg=p.weight,
                                 pregnant=p.pregnant)
    assert any(r.demographics.age_group is None for r in recordings) or all(p.age for p in patients.values())


def test_missing_demographics_are_masked_not_zero(tmp_path: Path) -> None:
    write_patient(tmp_path, "100", extra="#Height: nan\n#Weight:   14.5 \n#Pregnancy status: False\n")
    write_patient(tmp_path, "200", extra="#Height: 12O\n#Weight: -3\n")  # unreadable values: masked as well
    recordings = by_id(read_circor(tmp_path))
    d = recordings["100_AV"].demographics
    assert d == Demographics(age_group="Child", sex="Female", height_cm=None, weight_kg=14.5, pregnant=False)
    values, mask = encode_demographics(d)
    expected = dict(zip(DEMOGRAPHIC_FEATURES, [0, 0, 1, 0, 0, 1, 0, (14.5 - WEIGHT_KG[0]) / WEIGHT_KG[1], 0]))
    known = dict(zip(DEMOGRAPHIC_FEATURES, [1, 1, 1, 1, 1, 1, 0, 1, 1]))
    assert values.tolist() == pytest.approx(list(expected.values()))
    assert mask.tolist() == list(known.values())
    other = recordings["200_MV"].demographics
    assert other.height_cm is None and other.weight_kg is None and other.pregnant is None


def test_csv_fills_demographics_the_txt_lacks(tmp_path: Path) -> None:
    write_patient(tmp_path / "training_data", "100")  # its .txt has age and sex only
    (tmp_path / "training_data.csv").write_text(
        "Patient ID,Age,Sex,Height,Weight,Pregnancy status,Murmur,Outcome\n"
        "100,Infant,Male,70.0,8.1,False,Absent,Normal\n")
    d = read_circor(tmp_path)[0].demographics
    assert d == Demographics(age_group="Child", sex="Female", height_cm=70.0, weight_kg=8.1, pregnant=False)


def test_demographic_encoding_layout() -> None:
    d = demographics_from_fields({"age": " young  adult ", "sex": "MALE", "height": "170", "weight": "nan",
                                  "pregnancy status": "True"})
    values, mask = encode_demographics(d)
    assert values.shape == mask.shape == (len(DEMOGRAPHIC_FEATURES),) and values.dtype == torch.float32
    as_dict = dict(zip(DEMOGRAPHIC_FEATURES, values.tolist()))
    assert as_dict["age_young_adult"] == 1 and sum(values[:5].tolist()) == 1 and as_dict["sex_female"] == 0
    assert as_dict["height"] == pytest.approx((170 - HEIGHT_CM[0]) / HEIGHT_CM[1]) and as_dict["pregnant"] == 1
    assert dict(zip(DEMOGRAPHIC_FEATURES, mask.tolist()))["weight"] == 0 and as_dict["weight"] == 0
    none_values, none_mask = encode_demographics(None)  # PhysioNet 2016: nothing known
    assert not none_values.any() and not none_mask.any()
    stacked, stacked_mask = encode_many([d, None])
    assert stacked.shape == (2, len(DEMOGRAPHIC_FEATURES)) and torch.equal(stacked_mask[1], none_mask)


def test_demographics_fusion_on_a_format_without_demographics_is_refused(generated: Path, tmp_path: Path) -> None:
    require_demographics(read_circor(generated), "circor2022")
    p2016 = read_recordings(write_synthetic(tmp_path / "p", 3, 1, fmt="physionet2016", progress=False), "physionet2016")
    assert all(r.demographics is None for r in p2016)
    with pytest.raises(ConfigError, match=r"^config: demographics needs .* format='physionet2016' records none"):
        require_demographics(p2016, "physionet2016")


# ---------------------------------------------------------------------------------------------- quirks
def test_three_field_lines_have_no_segmentation(tmp_path: Path) -> None:
    write_patient(tmp_path, "100", three_fields=True, tsv=False)
    recordings = read_circor(tmp_path)
    assert [r.recording_id for r in recordings] == ["100_AV", "100_MV"]
    assert all(r.segmentation_path is None for r in recordings)


def test_tsv_named_but_missing_is_not_an_error(tmp_path: Path) -> None:
    write_patient(tmp_path, "100", tsv=False)
    recordings = read_circor(tmp_path)
    assert len(recordings) == 2 and all(r.segmentation_path is None for r in recordings)


def test_repeats_at_one_location_each_get_the_location_label(tmp_path: Path) -> None:
    write_patient(tmp_path, "100", ["AV", "MV", "MV", "MV"], murmur="Present", murmur_locations="MV")
    recordings = by_id(read_circor(tmp_path))
    assert sorted(recordings) == ["100_AV", "100_MV", "100_MV_1", "100_MV_2"]
    assert [recordings[k].labels[1] for k in ("100_AV", "100_MV", "100_MV_1", "100_MV_2")] == [0.0, 1.0, 1.0, 1.0]
    assert all(r.location == "MV" for k, r in recordings.items() if "_MV" in k)


def test_location_case_is_ignored(tmp_path: Path) -> None:
    write_patient(tmp_path, "100", ["PhC", "AV"], murmur="Present", murmur_locations="Phc")
    write_patient(tmp_path, "200", ["Phc", "av"], murmur="Present", murmur_locations="PHC+AV")
    recordings = by_id(read_circor(tmp_path))
    assert recordings["100_PhC"].labels[1] == 1.0 and recordings["100_AV"].labels[1] == 0.0
    assert recordings["100_PhC"].location == "Phc" and recordings["200_av"].location == "AV"
    assert recordings["200_Phc"].labels[1] == 1.0 and recordings["200_av"].labels[1] == 1.0


def test_nan_values(tmp_path: Path) -> None:
    write_patient(tmp_path, "100", murmur="Absent", murmur_locations="nan", extra="#Height: nan\n")
    write_patient(tmp_path, "200", murmur="Present", murmur_locations="nan")  # location not recorded
    recordings = by_id(read_circor(tmp_path))
    assert recordings["100_AV"].labels == (0.0, 0.0) and recordings["100_AV"].mask == (True, True)
    assert recordings["200_AV"].labels[1] == 1.0 and recordings["200_MV"].labels[1] == 1.0


def test_stray_white_space_and_crlf(tmp_path: Path) -> None:
    path = write_patient(tmp_path, "100", murmur="Present", murmur_locations="AV", outcome="Abnormal")
    text = path.read_text()
    text = text.replace("#Murmur: Present", "#Murmur :   Present  \t").replace("AV 100_AV.hea", "  AV   100_AV.hea ")
    text = text.replace("#Murmur locations: AV", "#Murmur locations:  AV + TV ").replace("#Outcome: Abnormal", "#Outcome:abnormal ")
    path.write_bytes(text.replace("\n", "\r\n").encode())
    recordings = by_id(read_circor(tmp_path))
    assert recordings["100_AV"].labels == (1.0, 1.0) and recordings["100_MV"].labels == (1.0, 0.0)


def test_fields_split_at_the_first_colon(tmp_path: Path) -> None:
    path = write_patient(tmp_path, "100", extra="#Additional ID: 12:34\n#Campaign:CC2014\n")
    patient = parse_patient_file(path)
    assert patient is not None
    assert patient.fields["additional id"] == "12:34" and patient.fields["campaign"] == "CC2014"
    assert patient.patient_id == "100" and patient.rate == 4000
    assert patient.recordings == [("AV", ["100_AV.hea", "100_AV.wav", "100_AV.tsv"]),
                                  ("MV", ["100_MV.hea", "100_MV.wav", "100_MV.tsv"])]


def test_csv_columns_found_by_name_and_fill_missing_labels(tmp_path: Path) -> None:
    data = tmp_path / "training_data"
    write_patient(data, "100", outcome=None, murmur="nan")  # labels only in the csv
    write_patient(data, "200", outcome="Normal", murmur="Absent")
    (tmp_path / "training_data.csv").write_text(
        "Outcome,Murmur locations,Murmur,Recording locations:,Patient ID\n"
        "Abnormal,MV,Present,AV+MV,100\n"
        "Normal,nan,Absent,AV+MV,200\n")
    recordings = by_id(read_circor(tmp_path))
    assert recordings["100_MV"].labels == (1.0, 1.0) and recordings["100_AV"].labels == (1.0, 0.0)
    assert recordings["100_MV"].murmur_class == "Present"
    assert recordings["200_AV"].labels == (0.0, 0.0)


def test_old_csv_without_outcome_and_with_locations_column(tmp_path: Path) -> None:
    data = tmp_path / "training_data"
    write_patient(data, "100", outcome="Abnormal", murmur="nan")
    csv_path = tmp_path / "training_data.csv"
    csv_path.write_text("Patient ID,Locations,Age,Murmur,Murmur locations\n100,AV+MV,Child,Present,AV\n")
    table = read_training_table(csv_path)
    assert table["100"]["recording locations"] == "AV+MV" and "outcome" not in table["100"]
    recordings = by_id(read_circor(tmp_path))
    assert recordings["100_AV"].labels == (1.0, 1.0) and recordings["100_MV"].labels == (1.0, 0.0)


# ---------------------------------------------------------------------------------------------- bad inputs
# Each breaker adds a patient 300 with one defect and returns (file named, problem, recordings of 300 that a
# skipping read keeps): a file problem costs one recording, a label or .txt problem the whole patient.
def _missing_wav(d: Path):
    return write_patient(d, "300", skip_wavs=("300_MV",)), "names 300_MV.wav, which does not exist", {"300_AV"}


def _unknown_outcome(d: Path):
    return write_patient(d, "300", outcome="Maybe"), "#Outcome: 'Maybe' is not Abnormal or Normal", set()


def _missing_outcome(d: Path):
    return write_patient(d, "300", outcome=None), "missing #Outcome", set()


def _unknown_murmur(d: Path):
    return write_patient(d, "300", murmur="Perhaps"), "#Murmur: 'Perhaps' is not Present, Absent or Unknown", set()


def _duplicate_patient(d: Path):
    write_patient(d, "300", ["TV"])
    path = write_patient(d, "300b", ["PV"], first_line="300 1 4000")
    return path, "duplicate patient id 300 (also in 300.txt)", {"300_TV"}


def _bad_first_line(d: Path):
    return write_patient(d, "300", first_line="300 four 4000"), "first line '300 four 4000' is not", set()


def _count_mismatch(d: Path):
    return write_patient(d, "300", first_line="300 3 4000"), "declares 3 recording(s), file lists 2", set()


def _wav_rate_mismatch(d: Path):
    write_patient(d, "300")
    write_wav(d / "300_AV.wav", 2000, np.zeros(1000, dtype=np.int16))
    return d / "300_AV.wav", "WAV header says 2000 Hz, 300.txt declares 4000 Hz", {"300_MV"}


def _hea_rate_mismatch(d: Path):
    write_patient(d, "300")
    (d / "300_MV.hea").write_text("300_MV 1 2000 2000\n")
    return d / "300_MV.wav", "300_MV.hea declares 2000 Hz", {"300_AV"}


def _truncated_wav(d: Path):
    write_patient(d, "300")
    wav = d / "300_MV.wav"
    wav.write_bytes(wav.read_bytes()[:500])
    return wav, "truncated WAV", {"300_AV"}


BAD_INPUTS = [_missing_wav, _unknown_outcome, _missing_outcome, _unknown_murmur, _duplicate_patient, _bad_first_line,
              _count_mismatch, _wav_rate_mismatch, _hea_rate_mismatch, _truncated_wav]



def test_a_file_problem_drops_one_recording_a_label_problem_the_patient(tmp_path: Path) -> None:
    write_patient(tmp_path, "100", ["AV", "MV"], skip_wavs=("100_MV",))
    write_patient(tmp_path, "200", ["AV", "MV"], outcome="Maybe")
    write_patient(tmp_path, "300", ["TV"])
    policy = BadInputPolicy(skip=True)
    assert sorted(by_id(read_circor(tmp_path, policy=policy))) == ["100_AV", "300_TV"]
    assert len(policy.skipped) == 2 and policy.summary() == "skipped 2 bad item(s); see the warnings above"


def test_csv_disagreeing_with_txt_is_bad_input(tmp_path: Path) -> None:
    data = tmp_path / "training_data"
    path = write_patient(data, "100", outcome="Normal")
    (tmp_path / "training_data.csv").write_text("Patient ID,Outcome,Murmur\n100,Abnormal,Absent\n")
    with pytest.raises(DataError, match=rf"^{path}: #Outcome: Normal disagrees with training_data.csv \(Abnormal\)$"):
        read_circor(tmp_path)


@pytest.mark.parametrize("skip", [False, True])
def test_nonexistent_or_empty_root_is_always_an_error(tmp_path: Path, skip: bool) -> None:
    policy = BadInputPolicy(skip=skip)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nowhere'}: CirCor dataset folder does not exist$"):
        read_circor(tmp_path / "nowhere", policy=policy)
    (tmp_path / "training_data").mkdir()
    (tmp_path / "training_data" / "100_AV.wav").write_bytes(b"")
    with pytest.raises(DataError, match=r"training_data: no patient \.txt files"):
        read_circor(tmp_path, policy=policy)


def test_all_patients_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    write_patient(tmp_path, "100", outcome="Maybe")
    policy = BadInputPolicy(skip=True)
    with pytest.raises(DataError, match=r"no usable recordings \(1 bad item\(s\) skipped\)"):
        read_circor(tmp_path, policy=policy)
