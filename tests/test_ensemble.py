"""Ensembles: an experiment directory (or a list of models, or one exported file) predicts the mean of its
members' probabilities and decides with the out-of-fold thresholds."""

import json

import numpy as np
import pytest

from cv_experiment import FOLDS, SEEDS, shared_experiment
from ignite_trainer.ensemble import export_ensemble, is_ensemble, load_ensemble, mean_probabilities
from ignite_trainer.errors import CheckpointError
from ignite_trainer.data.discovery import discover_recordings
from ignite_trainer.inference import run_windows
from ignite_trainer.model_files import load_trained_model
from ignite_trainer.predictions import patient_predictions


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


def test_an_uncollected_experiment_is_refused(experiment, tmp_path):
    (tmp_path / "experiment.yaml").write_text((experiment.exp_dir / "experiment.yaml").read_text())
    with pytest.raises(CheckpointError, match="never collected .* cv --collect"):
        load_ensemble(tmp_path)


def test_mean_probabilities_is_the_plain_mean():
    assert mean_probabilities([np.array([[0.2, 0.9]]), np.array([[0.4, 0.5]])]).tolist() == [[0.30000000000000004, 0.7]]
    with pytest.raises(ValueError):
        mean_probabilities([])
