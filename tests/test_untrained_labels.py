"""A model learns only the labels its data carry: a PhysioNet 2016 run (heart only) never trained its murmur
output. Such a model may not join an ensemble of CirCor models (the mean would average the untrained output
in), and may not make the 2022 Challenge's murmur calls; nor may a decision layer fitted on no patient with a
murmur class or an outcome. Each refusal is one ``error:`` line, exit code 2, and nothing written."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

import cli
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.core.vocabulary import FORMAT_LABELS, LABELS
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.use.ensemble import load_ensemble
from ignite_trainer.use.inference import predict
from ignite_trainer.use.model_files import load_trained_model
from ignite_trainer.use.predictor import Predictor
from test_bad_inputs import fresh_log_stream  # noqa: F401  (autouse: stderr handlers per test)
from test_challenge_team_code import _team_code


def one_error(capsys, args) -> str:
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def wav(run) -> str:
    return str(sorted(run.data.rglob("*.wav"))[0])


def test_each_format_s_readers_fill_exactly_the_labels_it_declares(trained_run, trained_2016_run):
    for fmt, data in (("circor2022", trained_run.data), ("physionet2016", trained_2016_run.data)):
        masks = np.array([r.mask for r in read_recordings(data, fmt)])
        assert tuple(label for j, label in enumerate(LABELS) if masks[:, j].any()) == FORMAT_LABELS[fmt]
    assert load_trained_model(trained_2016_run.run_dir).learned_labels == ("heart",)
    assert load_trained_model(trained_run.run_dir).learned_labels == ("heart", "murmur")


# ---------------------------------------------------------------------------------------------- ensembles
def test_an_ensemble_of_members_that_learned_different_labels_is_refused(trained_run, trained_2016_run, tmp_path,
                                                                         capsys):
    circor, p2016 = str(trained_run.run_dir), str(trained_2016_run.run_dir)
    with pytest.raises(CheckpointError) as refused:
        load_ensemble([circor, p2016])
    message = str(refused.value)
    assert message.startswith("the ensemble's members learned different labels: ")
    assert f"heart and murmur ({circor}; format=circor2022)" in message
    assert f"heart ({p2016}; format=physionet2016)" in message and "untrained murmur outputs" in message

    out = tmp_path / "mixed.safetensors"
    assert "members learned different labels" in one_error(capsys, ["export", f"{circor},{p2016}", str(out)])
    assert not out.exists()
    csv = tmp_path / "p.csv"
    assert "members learned different labels" in one_error(
        capsys, ["predict", f"{p2016},{circor}", wav(trained_run), "--output", str(csv)])
    assert not csv.exists()
    with pytest.raises(CheckpointError, match="members learned different labels"):
        Predictor([load_trained_model(circor), load_trained_model(p2016)])


def test_members_that_learned_the_same_labels_still_make_an_ensemble(trained_2016_run):
    ensemble = load_ensemble([trained_2016_run.run_dir, trained_2016_run.checkpoint])
    assert ensemble.learned_labels == ("heart",) and len(ensemble.members) == 2


# ---------------------------------------------------------------------------------------------- Challenge output
def test_challenge_files_from_a_physionet2016_model_are_refused(trained_2016_run, trained_run, tmp_path, capsys):
    run = trained_2016_run.run_dir
    out, csv = tmp_path / "challenge", tmp_path / "p.csv"
    line = one_error(capsys, ["predict", str(run), wav(trained_run), "--challenge-dir", str(out), "--output", str(csv)])
    assert line == (f"error: {run}: it never learned the murmur label: it trained on format=physionet2016, which "
                    "has heart only, so its murmur output is untrained; the Challenge's murmur and outcome calls "
                    "need a model trained on circor2022 data")
    assert not out.exists() and not csv.exists()

    # the probabilities are still the model's to give; only the Challenge's calls are refused
    assert cli.main(["predict", str(run), wav(trained_run), "--output", str(csv)]) == 0
    assert csv.is_file()
    result = predict(run, [wav(trained_run)])
    with pytest.raises(CheckpointError, match="never learned the murmur label"):
        result.challenge_outputs()


def test_team_code_refuses_a_physionet2016_model(trained_2016_run, tmp_path):
    model_folder = tmp_path / "model"
    shutil.copytree(trained_2016_run.run_dir, model_folder / _team_code().RUN_NAME)
    with pytest.raises(CheckpointError, match="never learned the murmur label"):
        _team_code().load_challenge_model(str(model_folder), 0)
    with pytest.raises(CheckpointError, match="never learned the murmur label"):
        Predictor([load_trained_model(trained_2016_run.run_dir)])


def test_a_decision_layer_fitted_on_no_murmur_patient_is_refused_for_challenge_output(trained_run, tmp_path, capsys):
    ckpt = torch.load(trained_run.checkpoint, weights_only=True)
    assert ckpt["decision"]["fitted_patients.murmur"] > 0 and ckpt["decision"]["fitted_patients.outcome"] > 0
    ckpt["decision"]["fitted_patients.murmur"] = 0.0  # as training on validation patients without a murmur class
    unfitted = tmp_path / "unfitted.pt"
    torch.save(ckpt, unfitted)

    out = tmp_path / "challenge"
    line = one_error(capsys, ["predict", str(unfitted), wav(trained_run), "--challenge-dir", str(out)])
    assert line == (f"error: {unfitted}: its Challenge decision layer was fitted on 0 validation patients with a "
                    "murmur label, so its murmur calls were never fitted to anything; retrain with a validation "
                    "split that holds both labels")
    assert not out.exists()
    trained = load_trained_model(unfitted)
    with pytest.raises(CheckpointError, match="fitted on 0 validation patients with a murmur label"):
        Predictor([trained])
    # a layer that does not record its patients (an older file) is used as before
    legacy = dataclasses.replace(trained.decision, fitted_patients=None)
    assert Predictor([trained], decision=legacy).decision is legacy
