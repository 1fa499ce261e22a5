"""examples/challenge/team_code.py driven the way the Challenge's train_model.py and run_model.py drive it.

The driver below is written from the Challenge's interface description: find the patient ``.txt`` files,
train once, load the model once, then per patient read its text and its recordings' arrays (16-bit samples,
as the Challenge's loader gives them), call ``run_challenge_model`` and write ``<patient>.csv`` in the
Challenge's output format (``#id``, classes, labels, probabilities, each value as ``str``).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from conftest import circor_subset
from ignite_trainer import evaluate, predict
from ignite_trainer.scoring.challenge import read_challenge_outputs, scores_from_outputs

TEAM_CODE = Path(__file__).resolve().parent.parent / "examples" / "challenge" / "team_code.py"


def _team_code():
    spec = importlib.util.spec_from_file_location("team_code", TEAM_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_model(team_code, model_folder: Path, data_folder: Path, output_folder: Path) -> None:
    model = team_code.load_challenge_model(str(model_folder), 0)
    output_folder.mkdir()
    for patient_file in sorted(data_folder.glob("*.txt")):
        data = patient_file.read_text()
        lines = data.splitlines()
        n = int(lines[0].split()[1])
        recordings = [wavfile.read(data_folder / line.split()[2])[1] for line in lines[1:1 + n]]
        classes, labels, probabilities = team_code.run_challenge_model(model, data, recordings, 0)
        text = "\n".join([f"#{lines[0].split()[0]}", ",".join(str(c) for c in classes),
                          ",".join(str(v) for v in labels), ",".join(str(p) for p in probabilities)]) + "\n"
        (output_folder / f"{patient_file.stem}.csv").write_text(text)


def test_team_code_trains_runs_and_scores_like_evaluate(trained_run, tmp_path, monkeypatch):
    team_code = _team_code()
    monkeypatch.setattr(team_code, "SETTINGS", {  # tiny, so that training takes seconds
        "epochs": 1, "batch_size": 4, "n_mels": 8, "sample_rate": 1000, "hop_ms": 20.0, "n_fft": 64,
        "val_fraction": 0.34, "device": "cpu", "early_stopping_patience": 0})
    data = circor_subset(trained_run.data, tmp_path / "data", 12) / "training_data"
    model_folder, outputs = tmp_path / "model", tmp_path / "outputs"
    team_code.train_challenge_model(str(data), str(model_folder), 0)
    _run_model(team_code, model_folder, data, outputs)

    run_dir = model_folder / team_code.RUN_NAME
    report = evaluate(run_dir, data=data.parent, split="all", out_dir=tmp_path / "report", figures=False)
    written = read_challenge_outputs(outputs)
    assert len(written) == report["counts"]["patient"] == 12
    truth = {}
    for txt in sorted(data.glob("*.txt")):
        fields = dict(line[1:].split(": ", 1) for line in txt.read_text().splitlines() if line.startswith("#"))
        truth[txt.stem] = (fields["Murmur"].strip(), fields["Outcome"].strip())
    scores = scores_from_outputs(truth, written).as_dict()
    for task in ("murmur", "outcome"):
        for key, value in scores[task].items():
            if isinstance(value, dict):
                assert value == pytest.approx(report["challenge"][task][key], abs=1e-6), (task, key)
            elif key != "classes":
                assert value == pytest.approx(report["challenge"][task][key], abs=1e-6), (task, key)

    folder = predict(run_dir, [data.parent])
    labels, probs = folder.challenge_outputs()
    for i, pid in enumerate(folder.patients.ids):
        assert written[pid].labels == tuple(labels[i].tolist())
        np.testing.assert_allclose(written[pid].probabilities, probs[i], rtol=0, atol=1e-6)
