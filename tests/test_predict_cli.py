"""predict: WAV files and dataset folders in either format -> per-recording and per-patient CSV, Challenge files."""

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pytest

import cli
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.data.wav import write_wav
from ignite_trainer.core.errors import DataError
from ignite_trainer.data.discovery import detect_format, discover_recordings
from ignite_trainer.use.inference import predict
from ignite_trainer.use.writers import CHALLENGE_CLASSES, PREDICTION_COLUMNS

from conftest import circor_subset, read_csv


def _by_level(rows):
    return ([r for r in rows if r["level"] == "recording"], [r for r in rows if r["level"] == "patient"])


def test_predict_cli_on_a_circor_folder_writes_csv_and_challenge_files(trained_run, tmp_path, capsys):
    folder = circor_subset(trained_run.data, tmp_path / "subset", 3)
    out, challenge = tmp_path / "pred.csv", tmp_path / "challenge"
    assert cli.main(["predict", str(trained_run.checkpoint), str(folder), "--output", str(out),
                     "--challenge-dir", str(challenge)]) == 0
    assert "3 patient row(s)" in capsys.readouterr().err

    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == PREDICTION_COLUMNS
        recordings, patients = _by_level(list(reader))
    wavs = sorted(p.stem for p in (folder / "training_data").glob("*.wav"))
    assert sorted(r["id"] for r in recordings) == wavs
    assert [p["id"] for p in patients] == sorted(p.stem for p in (folder / "training_data").glob("*.txt"))
    t = trained_run.thresholds
    for p in patients:
        mine = [r for r in recordings if r["patient_id"] == p["id"]]
        assert int(p["windows"]) == sum(int(r["windows"]) for r in mine)
        for label in ("heart", "murmur"):
            assert float(p[f"{label}_prob"]) == pytest.approx(np.mean([float(r[f"{label}_prob"]) for r in mine]))
            assert int(p[f"{label}_pred"]) == int(float(p[f"{label}_prob"]) >= t[label])

    files = sorted(challenge.glob("*.csv"))
    assert [f.stem for f in files] == [p["id"] for p in patients]
    for f, p in zip(files, patients):
        lines = f.read_text().splitlines()
        assert len(lines) == 4 and lines[0] == f"#{p['id']}"
        assert lines[1].split(",") == list(CHALLENGE_CLASSES) == ["Present", "Unknown", "Absent", "Abnormal", "Normal"]
        labels = [int(v) for v in lines[2].split(",")]
        probs = [float(v) for v in lines[3].split(",")]
        assert set(labels) <= {0, 1} and sum(labels[:3]) == 1 and sum(labels[3:]) == 1
        assert CHALLENGE_CLASSES[labels[:3].index(1)] == p["murmur_class"]
        assert CHALLENGE_CLASSES[3 + labels[3:].index(1)] == p["outcome_class"]
        assert sum(probs[:3]) == pytest.approx(1.0) and probs[3] == float(p["heart_prob"])  # full precision
        assert all(0 <= v <= 1 for v in probs)


def test_predict_a_single_wav_to_stdout(trained_run, capsys):
    wav = sorted((trained_run.data / "training_data").glob("*_AV.wav"))[0]
    assert cli.main(["predict", str(trained_run.checkpoint), str(wav)]) == 0
    recordings, patients = _by_level(list(csv.DictReader(io.StringIO(capsys.readouterr().out))))
    assert [r["id"] for r in recordings] == [wav.stem]
    assert [p["id"] for p in patients] == [wav.stem.split("_")[0]]  # CirCor naming: <patient>_<location>
    assert recordings[0]["heart_prob"] == patients[0]["heart_prob"]


def test_predict_agrees_with_evaluate_on_the_same_recordings(trained_run, tmp_path):
    from ignite_trainer.use.evaluation import evaluate

    folder = circor_subset(trained_run.data, tmp_path / "subset", 2)
    evaluated = evaluate(trained_run.run_dir, data=folder, out_dir=tmp_path / "eval", figures=False)
    predicted = {r["id"]: r for r in _by_level(_rows(predict(trained_run.run_dir, [folder])))[1]}
    for row in read_csv(Path(evaluated["files"]["patients"])):
        assert float(row["murmur_prob"]) == pytest.approx(float(predicted[row["patient_id"]]["murmur_prob"]), rel=1e-12)


def _rows(result):
    from ignite_trainer.use.writers import write_predictions_csv

    buffer = io.StringIO()
    write_predictions_csv(result, buffer)
    return list(csv.DictReader(io.StringIO(buffer.getvalue())))


def test_predict_on_an_unlabelled_folder_works(trained_run, tmp_path):
    folder = circor_subset(trained_run.data, tmp_path / "hidden", 2, strip_labels=True)
    result = predict(trained_run.checkpoint, [folder])
    assert len(result.patients) == 2 and np.isfinite(result.patients.probs).all()
    assert not result.recordings.mask.any()  # prediction never reads labels


def test_predict_on_a_physionet2016_folder(trained_run, tmp_path):
    folder = write_synthetic(tmp_path / "p2016", 3, 1, fmt="physionet2016")
    assert detect_format(folder) == "physionet2016"
    result = predict(trained_run.checkpoint, [folder])
    expected = sorted(p.stem for p in folder.glob("training-*/*.wav"))
    assert sorted(result.recordings.ids) == expected and sorted(result.patients.ids) == expected


def test_a_wav_shorter_than_one_window_is_padded_with_a_warning(trained_run, tmp_path, caplog):
    wav = tmp_path / "short_AV.wav"
    t = np.arange(int(1.5 * 4000)) / 4000
    write_wav(wav, 4000, (3000 * np.sin(2 * np.pi * 60 * t)).astype(np.int16))
    with caplog.at_level(logging.WARNING, logger="ignite_trainer"):
        result = predict(trained_run.checkpoint, [wav])
    assert result.recordings.n_windows.tolist() == [1]
    assert np.isfinite(result.recordings.probs).all()
    assert len(result.warnings) == 1 and "shorter than one 4 s window; zero-padded" in result.warnings[0]
    assert str(wav) in caplog.text


def test_predict_errors_are_one_line(trained_run, tmp_path, capsys):
    tiny = tmp_path / "tiny.wav"
    write_wav(tiny, 4000, np.zeros(20, dtype=np.int16))  # 5 ms: too short even for the band-pass filter
    note = tmp_path / "notes.txt"
    note.write_text("hello")
    for path, message in ((tmp_path / "nope.wav", "no such file or folder"), (note, "not a .wav file"),
                          (tiny, "too short")):
        assert cli.main(["predict", str(trained_run.checkpoint), str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0] and str(path) in err[0]


def test_discover_groups_circor_names_and_rejects_clashing_ids(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for folder in (a, b):
        write_wav(folder / "77_MV_1.wav", 4000, np.zeros(4000, dtype=np.int16))
    write_wav(a / "77_AV.wav", 4000, np.zeros(4000, dtype=np.int16))
    recs = discover_recordings([a, a / "77_AV.wav"])  # the same file twice is read once
    assert sorted((r.recording_id, r.patient_id) for r in recs) == [("77_AV", "77"), ("77_MV_1", "77")]
    with pytest.raises(DataError, match="recording id 77_MV_1 is also"):
        discover_recordings([a, b])
