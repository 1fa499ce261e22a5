"""Predictor: one patient in memory gives what `predict` gives on the folder; bad recordings never raise."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from ignite_trainer.scoring.challenge import CHALLENGE_OUTPUT_CLASSES
from ignite_trainer.data.wav import read_wav
from ignite_trainer.scoring.decision import DecisionLayer, MurmurLogistic, OutcomeThreshold
from ignite_trainer.use.inference import predict
from ignite_trainer.use.model_files import load_trained_model
from ignite_trainer.use.predictor import Predictor, challenge_recordings


def _patients(folder: Path) -> list[tuple[str, str, list]]:
    """(patient id, metadata text, [(int16 samples, rate, location)]) as the Challenge's loader gives them."""
    from scipy.io import wavfile

    out = []
    for txt in sorted((folder / "training_data").glob("*.txt")):
        text = txt.read_text()
        lines = text.splitlines()
        arrays = [wavfile.read(folder / "training_data" / line.split()[2])[1]
                  for line in lines[1:1 + int(lines[0].split()[1])]]
        out.append((lines[0].split()[0], text, challenge_recordings(text, arrays)))
    return out


def _tree(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in path.rglob("*")) if path.exists() else []


def test_predictor_matches_predict_on_the_folder_and_touches_no_disk(trained_run, tmp_path, monkeypatch):
    folder_result = predict(trained_run.run_dir, [trained_run.data])
    labels, probs = folder_result.challenge_outputs()
    by_id = {pid: i for i, pid in enumerate(folder_result.patients.ids)}

    predictor = Predictor.load(trained_run.run_dir)
    cache = Path(trained_run.config.cache_dir)
    before = _tree(cache)
    monkeypatch.chdir(tmp_path)
    for pid, text, recordings in _patients(trained_run.data):
        result = predictor.predict_patient(recordings, text)
        i = by_id[pid]
        assert result.patient_id == pid and result.classes == CHALLENGE_OUTPUT_CLASSES and not result.skipped
        np.testing.assert_allclose(result.probabilities, probs[i], rtol=0, atol=1e-6)  # float32 batches differ
        assert result.labels == tuple(labels[i].tolist())
        np.testing.assert_allclose([result.per_label_probs["heart"], result.per_label_probs["murmur"]],
                                   folder_result.patients.probs[i], rtol=0, atol=1e-6)  # float32 batches differ
    assert _tree(cache) == before and os.listdir(tmp_path) == []


def test_unusable_recordings_are_skipped_with_a_warning_and_none_left_gives_the_prior(trained_run, caplog):
    predictor = Predictor.load(trained_run.checkpoint)
    pid, text, recordings = _patients(trained_run.data)[0]
    good = recordings[0]
    bad = [(np.zeros(0, np.int16), 4000, "AV"), (np.ones(10, np.int16), 4000, "MV"),
           (np.array([0.1, np.nan] * 4000), 4000, "PV"), (good[0], 0, "TV"), (np.zeros((2, 4000)), 4000, "Phc")]
    with caplog.at_level(logging.WARNING, logger="ignite_trainer"):
        result = predictor.predict_patient([good] + bad, text)
    assert len(result.skipped) == 5 and not result.from_prior
    for k, (message, (_, _, location)) in enumerate(zip(result.skipped, bad)):
        assert message.startswith(f"patient {pid}, recording {k + 2} ({location})")
    assert all(m in caplog.text for m in result.skipped)
    alone = predictor.predict_patient([good], text)
    assert alone.probabilities == result.probabilities  # the skipped ones changed nothing

    nothing = predictor.predict_patient(bad, text)
    assert nothing.from_prior and nothing.per_label_probs == {"heart": None, "murmur": None}
    prior_labels, prior_probs = predictor.decision.prior_outputs()
    assert nothing.labels == tuple(prior_labels.tolist()) and nothing.probabilities == tuple(prior_probs.tolist())
    assert nothing.probabilities == predictor.decision.prior
    assert predictor.predict_patient([], "").patient_id == "patient"


def test_prior_without_stored_frequencies_is_the_documented_fallback():
    layer = DecisionLayer(MurmurLogistic.prior(), OutcomeThreshold(0.6))
    labels, probs = layer.prior_outputs()
    assert probs.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.5, 0.5])
    assert labels.tolist() == [1, 0, 0, 0, 1]  # 5·1/3 wins; 0.5 < 0.6 is Normal


def test_an_ensemble_averages_its_members(trained_run):
    single = Predictor.load(trained_run.run_dir)
    twice = Predictor.load([trained_run.run_dir, load_trained_model(trained_run.checkpoint)])
    assert len(twice.members) == 2 and twice.decision == single.decision
    _, text, recordings = _patients(trained_run.data)[1]
    a, b = single.predict_patient(recordings, text), twice.predict_patient(recordings, text)
    assert a.labels == b.labels
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-12)
    other = DecisionLayer(MurmurLogistic.prior(), OutcomeThreshold(0.0), (0.2, 0.2, 0.6, 0.5, 0.5))
    assert Predictor.load(trained_run.run_dir, decision=other).predict_patient(recordings, text).labels[3] == 1


def test_float_and_int16_inputs_agree_with_the_wav_reader(trained_run):
    predictor = Predictor.load(trained_run.run_dir)
    wav = sorted((trained_run.data / "training_data").glob("*.wav"))[0]
    rate, floats = read_wav(wav)
    from scipy.io import wavfile

    _, ints = wavfile.read(wav)
    a = predictor.predict_patient([(floats, rate, None)], "x")
    b = predictor.predict_patient([(ints, rate, None)], "x")
    assert a.probabilities == b.probabilities
