"""The synthetic generator: CirCor's byte layout, determinism, label model, and signals that carry the labels."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from ignite_trainer.data import synthetic
from ignite_trainer.data.circor import read_circor
from ignite_trainer.data.synthetic import (CSV_COLUMNS, ensure_embedded_dataset, sample_patient,
                                           synthesize_recording, write_synthetic)
from ignite_trainer.data.wav import read_wav, wav_info
from ignite_trainer.core.errors import ConfigError, DataError

SEED = 7
N_PATIENTS = 30
TXT_KEYS = ["Age", "Sex", "Height", "Weight", "Pregnancy status", "Murmur", "Murmur locations", "Most audible location",
            "Systolic murmur timing", "Systolic murmur shape", "Systolic murmur grading", "Systolic murmur pitch",
            "Systolic murmur quality", "Diastolic murmur timing", "Diastolic murmur shape", "Diastolic murmur grading",
            "Diastolic murmur pitch", "Diastolic murmur quality", "Campaign", "Additional ID", "Outcome"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic") / "set", N_PATIENTS, SEED)


@pytest.fixture(scope="module")
def patients() -> list[synthetic.SyntheticPatient]:
    return [sample_patient(SEED, i) for i in range(N_PATIENTS)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- layout
def test_patient_file_has_circor_layout(dataset: Path, patients) -> None:
    for patient in patients:
        lines = (dataset / "training_data" / f"{patient.patient_id}.txt").read_text().split("\n")
        assert lines[-1] == "" and lines[0] == f"{patient.patient_id} {len(patient.recordings)} 4000"
        rec_lines = lines[1:1 + len(patient.recordings)]
        for line, plan in zip(rec_lines, patient.recordings):
            assert line == f"{plan.location} {plan.name}.hea {plan.name}.wav {plan.name}.tsv"
        fields = lines[1 + len(patient.recordings):-1]
        assert [f.split(":", 1)[0] for f in fields] == [f"#{k}" for k in TXT_KEYS]
        values = dict(f[1:].split(": ", 1) for f in fields)
        assert values["Murmur"] == patient.murmur and values["Outcome"] == patient.outcome
        if patient.murmur == "Present":
            assert values["Murmur locations"] == "+".join(patient.murmur_locations)
            assert values["Most audible location"] in patient.murmur_locations
            assert {values["Systolic murmur timing"], values["Diastolic murmur timing"]} != {"nan"}
        else:
            assert values["Murmur locations"] == "nan" and values["Systolic murmur grading"] == "nan"


def test_recording_files_have_circor_layout(dataset: Path, patients) -> None:
    data = dataset / "training_data"
    n_files = 0
    for patient in patients:
        assert 1 <= len(patient.locations) <= 4
        for plan in patient.recordings:
            rate, n = wav_info(data / f"{plan.name}.wav")
            assert rate == 4000 and n == round(plan.duration_s * 4000) and 5 * 4000 <= n <= 40 * 4000
            assert (data / f"{plan.name}.hea").read_text() == (
                f"{plan.name} 1 4000 {n}\n{plan.name}.wav 16+44 1 16 0 0 0 0 {plan.location}\n")
            rows = np.loadtxt(data / f"{plan.name}.tsv", ndmin=2)
            assert rows[0, 0] == 0 and rows[-1, 1] == pytest.approx(n / 4000)
            np.testing.assert_array_equal(rows[1:, 0], rows[:-1, 1])  # contiguous
            states = rows[:, 2].astype(int).tolist()
            core = states[1:] if states[0] == 0 else states  # unannotated only before the first full beat
            core = core[:-1] if core[-1] == 0 else core  # and after the last
            assert core == [1, 2, 3, 4] * (len(core) // 4) and len(core) >= 4 * 4
            n_files += 1
    assert n_files == len(list(data.glob("*.wav")))


def test_csv_has_the_real_column_names_and_matches_the_txt(dataset: Path, patients) -> None:
    with open(dataset / "training_data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [r["Patient ID"] for r in rows] == [p.patient_id for p in patients]
    for row, patient in zip(rows, patients):
        assert row["Outcome"] == patient.outcome and row["Murmur"] == patient.murmur
        assert row["Recording locations:"] == "+".join(r.location for r in patient.recordings)


def test_physionet2016_layout(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "p", 7, SEED, fmt="physionet2016")
    references = sorted(root.glob("training-*/REFERENCE.csv"))
    rows = [line.split(",") for ref in references for line in ref.read_text().splitlines()]
    assert len(rows) == 7 and {v for _, v in rows} <= {"1", "-1"}
    for ref in references:
        for name, _ in (line.split(",") for line in ref.read_text().splitlines()):
            assert name.startswith(ref.parent.name[-1]) and wav_info(ref.parent / f"{name}.wav")[0] == 2000


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    a = _files(write_synthetic(tmp_path / "a", 5, seed=3))
    b = _files(write_synthetic(tmp_path / "b", 5, seed=3))
    c = _files(write_synthetic(tmp_path / "c", 5, seed=4))
    assert a == b
    wavs_a = {v for k, v in a.items() if k.endswith(".wav")}
    wavs_c = {v for k, v in c.items() if k.endswith(".wav")}
    assert wavs_a and not wavs_a & wavs_c


def test_each_patient_is_generated_independently_of_the_others(dataset: Path, patients) -> None:
    """Seeding per (seed, patient index) lets any subset be generated alone, in any order, with the same bytes."""
    patient = patients[N_PATIENTS - 1]
    assert sample_patient(SEED, N_PATIENTS - 1) == patient
    samples, _ = synthesize_recording(patient, 0, SEED)
    _, stored = read_wav(dataset / "training_data" / f"{patient.recordings[0].name}.wav")
    np.testing.assert_array_equal(samples.astype(np.float32) / 32768, stored)


# ---------------------------------------------------------------------------------------------- label model
def test_class_balance_is_near_circor() -> None:
    drawn = [sample_patient(2022, i) for i in range(2000)]
    share = lambda pred: np.mean([pred(p) for p in drawn])  # noqa: E731
    assert share(lambda p: p.outcome == "Abnormal") == pytest.approx(0.48, abs=0.04)
    assert share(lambda p: p.murmur == "Present") == pytest.approx(0.19, abs=0.03)
    assert share(lambda p: p.murmur == "Unknown") == pytest.approx(0.07, abs=0.02)
    assert 3.1 < np.mean([len(p.recordings) for p in drawn]) < 3.6
    assert any(r.name.endswith("_1") for p in drawn for r in p.recordings)
    assert any("Phc" in p.locations for p in drawn)


def test_heart_is_not_a_copy_of_murmur() -> None:
    drawn = [sample_patient(2022, i) for i in range(1000)]
    known = [p for p in drawn if p.murmur != "Unknown"]
    agree = np.mean([(p.murmur == "Present") == (p.outcome == "Abnormal") for p in known])
    assert 0.4 < agree < 0.8
    assert any(p.murmur == "Present" and p.outcome == "Normal" for p in known)  # innocent murmurs
    assert any(p.murmur == "Absent" and p.outcome == "Abnormal" and p.cues for p in known)  # S3, split, rhythm
    flipped = np.mean([p.abnormal != (p.outcome == "Abnormal") for p in drawn])
    assert 0.06 < flipped < 0.12  # label noise


def test_murmurs_only_at_listed_locations_and_unknown_never_described() -> None:
    for p in (sample_patient(5, i) for i in range(300)):
        assert set(p.murmur_locations) <= set(p.locations)
        if p.murmur == "Present":
            assert p.murmurs and p.most_audible in p.murmur_locations
        if p.murmur == "Absent":
            assert not p.murmurs and not p.murmur_locations


# ---------------------------------------------------------------------------------------------- signals
def _band_power_ratio(wav: Path, tsv: Path, band: tuple[float, float], state: int,
                      first_s: float | None = None) -> float:
    """Mean power in ``band`` inside segments of ``state`` (optionally their first ``first_s``), relative to S1."""
    rate, x = read_wav(wav)
    sos = scipy.signal.butter(4, band, btype="band", fs=rate, output="sos")
    power = scipy.signal.sosfiltfilt(sos, x.astype(np.float64)) ** 2
    rows = np.loadtxt(tsv, ndmin=2)

    def mean_in(wanted: int, limit: float | None = None) -> float:
        parts = []
        for start, end, s in rows:
            if s == wanted:
                a = int(round(start * rate))
                b = int(round(end * rate)) if limit is None else min(int(round(end * rate)), a + int(limit * rate))
                parts.append(power[a:b])
        return float(np.concatenate(parts).mean())

    return mean_in(state, first_s) / mean_in(1)


def test_systolic_murmur_adds_band_energy_inside_systole(dataset: Path, patients) -> None:
    data = dataset / "training_data"
    with_murmur, without = [], []
    for p in patients:
        for plan in p.recordings:
            ratio = _band_power_ratio(data / f"{plan.name}.wav", data / f"{plan.name}.tsv", (60, 300), state=2)
            if p.murmur == "Present" and plan.location in p.murmur_locations and \
                    any(m.phase == "systole" for m in p.murmurs):
                with_murmur.append(ratio)
            elif p.murmur == "Absent":
                without.append(ratio)
    assert len(with_murmur) >= 5 and len(without) >= 20
    assert np.median(with_murmur) > 10 * np.median(without)
    assert np.mean(np.array(with_murmur) > np.median(without)) == 1.0


def test_s3_gallop_adds_low_frequency_energy_early_in_diastole(tmp_path: Path) -> None:
    """The same patients rendered with and without their S3: 30-60 Hz power right after S2 must jump."""
    gallops = [p for p in (sample_patient(1, i) for i in range(300)) if "s3" in p.cues and not p.murmurs][:8]
    assert len(gallops) == 8
    gains = []
    for p in gallops:
        ratios = []
        for variant in (p, dataclasses.replace(p, cues=tuple(c for c in p.cues if c != "s3"), s3_gain=0.0)):
            samples, segments = synthesize_recording(variant, 0, 1)
            wav, tsv = tmp_path / "r.wav", tmp_path / "r.tsv"
            synthetic.write_wav(wav, 4000, samples)
            tsv.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in segments))
            ratios.append(_band_power_ratio(wav, tsv, (30, 60), state=4, first_s=0.12))
        gains.append(ratios[0] / max(ratios[1], 1e-9))
    assert np.median(gains) > 10 and np.mean(np.array(gains) > 1.5) >= 0.75


# ---------------------------------------------------------------------------------------------- embedded cache
def test_embedded_dataset_is_generated_once_then_reused(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = synthetic.write_synthetic

    def counting(out_dir, n_patients, seed, fmt="circor2022", **options):
        calls.append(Path(out_dir))
        return real(out_dir, n_patients, seed, fmt, **options)

    monkeypatch.setattr(synthetic, "write_synthetic", counting)
    first = ensure_embedded_dataset(tmp_path, 4, 9)
    assert first == tmp_path / "synthetic" / "circor2022-p4-s9"
    assert (first / "training_data.csv").is_file() and len(list((first / "training_data").glob("*.txt"))) == 4
    assert calls and calls[0] != first  # written elsewhere, then moved into place
    assert ensure_embedded_dataset(tmp_path, 4, 9) == first and len(calls) == 1
    assert sorted(os.listdir(tmp_path / "synthetic")) == ["circor2022-p4-s9"]


def test_a_killed_generation_leaves_no_dataset_behind(tmp_path: Path, monkeypatch) -> None:
    def dies_halfway(out_dir, n_patients, seed, fmt="circor2022", **options):
        (Path(out_dir) / "training_data").mkdir(parents=True)
        (Path(out_dir) / "training_data" / "1000.txt").write_text("1000 1 4000\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_synthetic", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_dataset(tmp_path, 4, 9)
    assert os.listdir(tmp_path / "synthetic") == []
    monkeypatch.undo()
    assert (ensure_embedded_dataset(tmp_path, 4, 9) / "training_data.csv").is_file()


# ---------------------------------------------------------------------------------------------- difficulty
def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_default_output_is_byte_identical_to_the_original_generator(tmp_path: Path) -> None:
    """Hashes of sets written before difficulties existed: cached embedded sets and published numbers stay valid."""
    assert _digest(write_synthetic(tmp_path / "c", 4, 5)) == \
        "1e421a3a330a3ad94da66584e3a7ac632d652c98640a410e1126a488b7a61e1d"
    assert _digest(write_synthetic(tmp_path / "p", 4, 5, fmt="physionet2016", difficulty="default")) == \
        "9a3df7d28f24b68bedf3a7cb14b9dc2be3fe3310b33d66ec6b40f82f43bac4d0"


def test_hard_set_is_harder_in_every_promised_way() -> None:
    default = [sample_patient(2022, i) for i in range(2000)]
    hard = [sample_patient(2022, i, "hard") for i in range(2000)]
    share = lambda ps, pred: np.mean([pred(p) for p in ps])  # noqa: E731
    assert share(hard, lambda p: p.murmur == "Unknown") > 1.7 * share(default, lambda p: p.murmur == "Unknown")
    assert share(hard, lambda p: p.murmur == "Present") == pytest.approx(0.19, abs=0.03)
    innocent = lambda ps: np.mean([m.kind.startswith("innocent") for p in ps if p.murmur == "Present"  # noqa: E731
                                   for m in p.murmurs])
    assert innocent(hard) > innocent(default) + 0.15
    amplitude = lambda ps: np.mean([m.amplitude for p in ps if p.murmur == "Present" for m in p.murmurs])  # noqa: E731
    assert amplitude(hard) < 0.85 * amplitude(default)  # lower grades
    assert {p.noise_profile for p in hard if p.murmur == "Unknown"} == {"faint", "noisy", "partial"}
    assert all(p.noise_profile == "clean" for p in hard if p.murmur != "Unknown")
    assert share(hard, lambda p: p.outcome == "Abnormal") == pytest.approx(0.48, abs=0.05)


def test_hard_outcome_depends_on_age_and_growth_default_does_not() -> None:
    def abnormal_by_age(ps):
        return {age: np.mean([p.abnormal for p in ps if p.age == age]) for age in ("Infant", "Child", "Adolescent")}

    default = abnormal_by_age([sample_patient(3, i) for i in range(3000)])
    hard_patients = [sample_patient(3, i, "hard") for i in range(3000)]
    hard = abnormal_by_age(hard_patients)
    assert max(default.values()) - min(default.values()) < 0.08
    assert hard["Infant"] > hard["Child"] + 0.08 > hard["Adolescent"] + 0.16
    children = [p for p in hard_patients if p.age == "Child" and p.weight is not None]
    sick = np.mean([p.weight for p in children if p.abnormal])
    well = np.mean([p.weight for p in children if not p.abnormal])
    assert sick < 0.9 * well  # failure to thrive: weight-for-age is a demographic cue of the outcome


def test_partial_recordings_lose_the_heart_sounds_in_stretches() -> None:
    patient = next(p for p in (sample_patient(1, i, "hard") for i in range(400)) if p.noise_profile == "partial")
    clean = dataclasses.replace(patient, noise_profile="clean")

    def quiet_share(p) -> float:
        """Share of half seconds whose heart-band RMS is below a third of the loud ones' (90th percentile)."""
        samples, _ = synthesize_recording(p, 0, 1)
        sos = scipy.signal.butter(4, (25, 200), btype="band", fs=4000, output="sos")
        x = scipy.signal.sosfiltfilt(sos, samples.astype(np.float64))
        rms = np.sqrt(np.mean(x[: len(x) // 2000 * 2000].reshape(-1, 2000) ** 2, axis=1))
        return float(np.mean(rms < np.percentile(rms, 90) / 3))

    assert quiet_share(patient) > 0.2 and quiet_share(clean) < 0.05


def test_unknown_difficulty_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="difficulty='extreme'"):
        write_synthetic(tmp_path / "x", 2, 0, difficulty="extreme")
    assert not (tmp_path / "x").exists()


def test_hard_embedded_set_has_a_folder_of_its_own(tmp_path: Path) -> None:
    hard = ensure_embedded_dataset(tmp_path, 2, 9, difficulty="hard", progress=False)
    assert hard == tmp_path / "synthetic" / "circor2022-hard-r2-p2-s9"
    expected = [sample_patient(9, i, "hard") for i in range(2)]
    recordings = read_circor(hard)
    assert {r.patient_id for r in recordings} == {p.patient_id for p in expected}
    for r in recordings:
        p = next(p for p in expected if p.patient_id == r.patient_id)
        assert r.murmur_class == p.murmur and r.demographics.weight_kg == p.weight  # growth cue written as drawn


# ---------------------------------------------------------------------------------------------- target folder
def test_non_empty_target_is_refused_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"d: folder is not empty .*--overwrite"):
        write_synthetic(target, 2, 0)
    with pytest.raises(DataError, match="refusing to replace a folder that holds no dataset"):
        write_synthetic(target, 2, 0, overwrite=True)
    assert os.listdir(target) == ["notes.txt"] and os.listdir(tmp_path) == ["d"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="exists and is not a folder"):
        write_synthetic(tmp_path / "f", 2, 0)


def test_empty_target_is_filled(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert (write_synthetic(tmp_path / "d", 2, 0) / "training_data.csv").is_file()
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_overwrite_replaces_the_old_set_completely(tmp_path: Path) -> None:
    target = write_synthetic(tmp_path / "d", 3, 1)
    (target / "training_data" / "stale.txt").write_text("old")
    write_synthetic(target, 2, 2, overwrite=True)
    assert _files(target) == _files(write_synthetic(tmp_path / "fresh", 2, 2))
    assert sorted(os.listdir(tmp_path)) == ["d", "fresh"]  # no staging or old copy left behind


def test_a_failed_overwrite_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    target = write_synthetic(tmp_path / "d", 3, 1)
    before = _files(target)

    def fails(out_dir, patients, seed, done):
        (out_dir / "training_data").mkdir(parents=True)
        (out_dir / "training_data.csv").write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "_write_circor", fails)
    with pytest.raises(DataError, match=r"d: cannot write the synthetic set \(No space left on device\)"):
        write_synthetic(target, 2, 2, overwrite=True)
    assert _files(target) == before and os.listdir(tmp_path) == ["d"]


def test_read_only_target_is_one_data_error(tmp_path: Path, monkeypatch) -> None:
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(DataError, match=r"ro: cannot write the synthetic set there \(Permission denied\)"):
        write_synthetic(tmp_path / "ro", 2, 0)
    assert os.listdir(tmp_path) == []


def test_overwrite_where_only_the_target_itself_is_writable(tmp_path: Path, monkeypatch) -> None:
    """With no room beside the target, the new set is staged inside it and swapped in entry by entry."""
    target = write_synthetic(tmp_path / "d", 3, 1)
    real_mkdir = Path.mkdir

    def parent_read_only(self, *args, **kwargs):
        if self.parent == tmp_path and self.name.startswith("."):
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", parent_read_only)
    write_synthetic(target, 2, 2, overwrite=True)
    monkeypatch.undo()
    assert _files(target) == _files(write_synthetic(tmp_path / "fresh", 2, 2))
    assert sorted(os.listdir(target)) == ["training_data", "training_data.csv"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_by_permissions(tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    os.chmod(target, 0o555)
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(DataError, match="ro: cannot write"):
            write_synthetic(target, 2, 0)
    finally:
        os.chmod(tmp_path, 0o755)
        os.chmod(target, 0o755)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(tmp_path: Path, monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    write_synthetic(tmp_path / "a", 2, 0)
    n_recordings = sum(len(sample_patient(0, i).recordings) for i in range(2))
    assert "synthetic set" in terminal.getvalue() and f"0/{n_recordings} " in terminal.getvalue()  # counts
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    write_synthetic(tmp_path / "b", 2, 0, progress=False)
    assert quiet.getvalue() == ""
    log = io.StringIO()  # a log file, not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    write_synthetic(tmp_path / "c", 2, 0)
    assert log.getvalue() == ""
