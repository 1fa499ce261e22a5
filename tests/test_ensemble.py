"""Ensembles: an experiment directory (or a list of models, or one exported file) predicts the mean of its
members' probabilities and decides with the out-of-fold thresholds."""

import json

import numpy as np
import pytest

from cv_experiment import FOLDS, SEEDS, shared_experiment
from ignite_trainer.use.ensemble import is_ensemble, load_ensemble, mean_probabilities
from ignite_trainer.use.export import export_ensemble
from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.data.discovery import discover_recordings
from ignite_trainer.use.model_files import load_trained_model
from ignite_trainer.use.windows import run_windows
from ignite_trainer.scoring.predictions import patient_predictions


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return shared_experiment(tmp_path_factory)


@pytest.fixture(scope="module")
def recordings(experiment):
    return discover_recordings([experiment.data])


def test_an_experiment_is_an_ensemble_of_its_members_with_out_of_fold_thresholds(experiment, recordings):
    ensemble = load_ensemble(experiment.exp_dir)
    assert is_ensemble(experiment.exp_dir) and len(ensemble.members) == FOLDS * len(SEEDS)
    assert ensemble.thresholds == json.loads((experiment.exp_dir / "thresholds.json").read_text())["thresholds"]
    assert ensemble.thresholds_tuned and "out-of-fold" in ensemble.threshold_source

    recs, patients, _ = ensemble.levels(recordings)
    singles = []
    for m in ensemble.members:
        _, member_recs, _ = run_windows(m, recordings).levels("mean")
        assert member_recs.ids == recs.ids
        singles.append(member_recs.probs)
    np.testing.assert_array_equal(recs.probs, np.mean(np.stack(singles), axis=0))
    # with mean aggregation the patient probability is the mean of the members' patient probabilities too
    member_patients = [patient_predictions(r_like(recs, p), recordings_of(recs, recordings)).probs for p in singles]
    np.testing.assert_allclose(patients.probs, np.mean(np.stack(member_patients), axis=0), rtol=0, atol=1e-12)


def r_like(recs, probs):
    from dataclasses import replace

    return replace(recs, probs=probs)


def recordings_of(recs, recordings):
    by_id = {r.recording_id: r for r in recordings}
    return [by_id[i] for i in recs.ids]


def test_one_exported_file_holds_every_member_and_predicts_the_same(experiment, recordings, tmp_path):
    path = export_ensemble(experiment.exp_dir, tmp_path / "cv.safetensors")
    assert is_ensemble(path) and not is_ensemble(tmp_path)
    loaded = load_ensemble(path)
    original = load_ensemble(experiment.exp_dir)
    assert len(loaded.members) == len(original.members) and loaded.thresholds == original.thresholds
    np.testing.assert_array_equal(loaded.levels(recordings)[1].probs, original.levels(recordings)[1].probs)
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        export_ensemble(experiment.exp_dir, tmp_path / "cv.pt")


def test_a_list_of_models_uses_given_or_the_members_own_thresholds(experiment):
    runs = [experiment.exp_dir / "runs" / f"fold{k}_seed0" for k in range(FOLDS)]
    ensemble = load_ensemble(runs)
    own = [load_trained_model(r).thresholds for r in runs]
    assert ensemble.thresholds == {label: float(np.mean([t[label] for t in own])) for label in ("heart", "murmur")}
    assert ensemble.threshold_source == "mean of the members' own validation thresholds"
    given = load_ensemble(runs, {"heart": 0.3, "murmur": 0.6})
    assert given.thresholds == {"heart": 0.3, "murmur": 0.6} and given.threshold_source == "given"
    for bad in ({"heart": True, "murmur": 0.6}, {"heart": 0.3}, {"heart": 1.5, "murmur": 0.6}):
        with pytest.raises(ConfigError, match=r"^thresholds .* are not one number in \[0, 1\] per label"):
            load_ensemble(runs, bad)


def test_an_uncollected_experiment_is_refused(experiment, tmp_path):
    (tmp_path / "experiment.yaml").write_text((experiment.exp_dir / "experiment.yaml").read_text())
    with pytest.raises(CheckpointError, match="never collected .* cv --collect"):
        load_ensemble(tmp_path)


def test_mean_probabilities_is_the_plain_mean():
    assert mean_probabilities([np.array([[0.2, 0.9]]), np.array([[0.4, 0.5]])]).tolist() == [[0.30000000000000004, 0.7]]
    with pytest.raises(ValueError):
        mean_probabilities([])


# ---------------------------------------------------------------------------------------------- everywhere a model goes
def test_the_exported_file_keeps_the_out_of_fold_decision_layer(experiment, tmp_path):
    from cli import main

    original = load_ensemble(experiment.exp_dir)
    assert original.decision is not None and "out-of-fold" in original.decision_source
    assert original.decision.to_json() == (experiment.exp_dir / "decision.json").read_text().strip()
    assert main(["export", str(experiment.exp_dir), str(tmp_path / "cv.safetensors")]) == 0
    loaded = load_ensemble(tmp_path / "cv.safetensors")
    assert loaded.decision == original.decision and loaded.decision_source == original.decision_source
    assert [m.config.seed for m in loaded.members] == [m.config.seed for m in original.members]
    # the library function takes an experiment directory too (the CLI and scripts write the same file)
    from ignite_trainer.use.export import export_safetensors

    again = export_safetensors(experiment.exp_dir, tmp_path / "again.safetensors")
    assert load_ensemble(again).decision == original.decision
    assert len(load_ensemble(again).members) == len(original.members)


def test_evaluate_and_predict_score_an_experiment_as_its_ensemble(experiment, recordings, tmp_path):
    from cli import main
    from ignite_trainer.use.evaluation import challenge_section, evaluate
    from ignite_trainer.use.inference import predict

    from ignite_trainer.data.readers import read_recordings

    ensemble = load_ensemble(experiment.exp_dir)
    labelled = read_recordings(experiment.data, "circor2022", unknown_murmur=ensemble.config.unknown_murmur)
    recs, patients, _ = ensemble.levels(labelled)
    result = evaluate(experiment.exp_dir, data=experiment.data, out_dir=tmp_path / "ev", figures=False)
    assert len(result["members"]) == FOLDS * len(SEEDS) and result["thresholds"] == ensemble.thresholds
    expected, _ = challenge_section(patients, recs, ensemble.decision)
    assert expected["scored_patients"] > 0
    assert result["challenge"]["murmur_weighted_accuracy"] == expected["murmur_weighted_accuracy"]
    assert result["challenge"]["outcome_cost"] == expected["outcome_cost"]
    assert result["challenge"]["decision_layer"] == ensemble.decision.to_dict()
    assert "window" not in result["levels"] and result["counts"]["patient"] == len(patients)
    with pytest.raises(ConfigError, match="held-out recordings"):
        evaluate(experiment.exp_dir)

    predicted = predict(experiment.exp_dir, [experiment.data])
    np.testing.assert_array_equal(predicted.patients.probs, ensemble.levels(recordings)[1].probs)
    assert predicted.layer == ensemble.decision
    # the command line takes the experiment directory, or members separated by commas
    runs = ",".join(str(experiment.exp_dir / "runs" / f"fold{k}_seed0") for k in range(FOLDS))
    assert main(["predict", runs, str(experiment.data), "--output", str(tmp_path / "p.csv")]) == 0
    assert main(["evaluate", str(experiment.exp_dir), "--data", str(experiment.data)]) == 0
    assert (experiment.exp_dir / "evaluation" / "metrics.json").is_file()


def test_predictor_loads_an_experiment_with_its_decision_layer(experiment, tmp_path):
    from test_predictor import _patients

    from ignite_trainer.use.inference import predict
    from ignite_trainer.use.predictor import Predictor

    folder = predict(experiment.exp_dir, [experiment.data])
    labels, probs = folder.challenge_outputs()
    by_id = {pid: i for i, pid in enumerate(folder.patients.ids)}
    path = export_ensemble(experiment.exp_dir, tmp_path / "cv.safetensors")
    for source in (experiment.exp_dir, path):
        predictor = Predictor.load(source)
        assert len(predictor.members) == FOLDS * len(SEEDS) and predictor.decision == folder.layer
        for pid, text, recs in _patients(experiment.data)[:3]:
            result = predictor.predict_patient(recs, text)
            np.testing.assert_allclose(result.probabilities, probs[by_id[pid]], rtol=0, atol=1e-6)
            assert result.labels == tuple(labels[by_id[pid]].tolist())


def test_a_damaged_decision_layer_is_one_checkpoint_error(experiment, tmp_path):
    (tmp_path / "ensemble.json").write_text((experiment.exp_dir / "ensemble.json").read_text())
    (tmp_path / "decision.json").write_text('{"format": "ignite_trainer.decision/1", "murmur.kind": "oracle"}')
    with pytest.raises(CheckpointError, match="decision.json: unreadable decision layer"):
        load_ensemble(tmp_path)


def test_an_exported_ensemble_of_demographics_models_loads_and_predicts_the_same(tmp_path_factory, tmp_path):
    from cv_experiment import cv_config, cv_data

    from ignite_trainer.model.fusion import DemographicsFusion
    from ignite_trainer.training.run import train
    from ignite_trainer.use.inference import predict

    _, data = cv_data(tmp_path_factory)
    runs = [train(cv_config(tmp_path_factory, name=f"demo{seed}", seed=seed, demographics=True,
                            output_dir=str(tmp_path / "runs")))["run_dir"] for seed in (0, 1)]
    path = export_ensemble(runs, tmp_path / "demo.safetensors")
    loaded = load_ensemble(path)
    assert len(loaded.members) == 2 and all(isinstance(m.model, DemographicsFusion) for m in loaded.members)
    assert all(m.config.demographics for m in loaded.members)
    in_memory, from_file = predict(runs, [data]), predict(path, [data])
    assert from_file.recordings.ids == in_memory.recordings.ids and from_file.thresholds == in_memory.thresholds
    np.testing.assert_array_equal(from_file.recordings.probs, in_memory.recordings.probs)
    np.testing.assert_array_equal(from_file.patients.probs, in_memory.patients.probs)
