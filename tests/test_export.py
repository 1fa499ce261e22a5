"""export: a safetensors file alone is enough to evaluate and predict, with exactly the .pt's results."""

import json

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import yaml

import cli
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.use.evaluation import evaluate
from ignite_trainer.use.export import export_safetensors
from ignite_trainer.use.inference import predict
from ignite_trainer.use.model_files import load_trained_model

from conftest import circor_subset


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return export_safetensors(trained_run.run_dir, tmp_path_factory.mktemp("export") / "model.safetensors")


def test_export_holds_weights_config_and_thresholds(trained_run, exported):
    with safetensors.safe_open(str(exported), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert yaml.safe_load(metadata["config"]) == trained_run.config.to_dict()
    assert json.loads(metadata["thresholds"]) == trained_run.thresholds
    state = torch.load(trained_run.checkpoint, weights_only=True)["model_state_dict"]
    assert keys == set(state)
    weights = safetensors.torch.load_file(str(exported))
    assert all(torch.equal(weights[k], state[k]) for k in state)

    loaded = load_trained_model(exported)
    assert loaded.thresholds == trained_run.thresholds and loaded.thresholds_tuned
    assert loaded.config == trained_run.config and loaded.run_dir is None and not loaded.model.training


def test_predict_and_evaluate_from_the_export_match_the_checkpoint(trained_run, exported, tmp_path):
    folder = circor_subset(trained_run.data, tmp_path / "subset", 2)
    from_pt = predict(trained_run.checkpoint, [folder])
    from_st = predict(exported, [folder])
    assert from_st.recordings.ids == from_pt.recordings.ids
    np.testing.assert_array_equal(from_st.recordings.probs, from_pt.recordings.probs)
    np.testing.assert_array_equal(from_st.patients.probs, from_pt.patients.probs)

    # Evaluating the export without --data reproduces the run's own validation split from its stored config.
    via_st = evaluate(exported, figures=False)
    via_run = evaluate(trained_run.run_dir, out_dir=tmp_path / "run_report", figures=False)
    assert via_st["levels"] == via_run["levels"] and via_st["challenge"] == via_run["challenge"]
    assert via_st["files"]["report"] == str(exported.parent / "model_report" / "report.md")


def test_export_cli_and_bad_files(trained_run, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert cli.main(["export", str(trained_run.checkpoint), str(out)]) == 0
    assert load_trained_model(out).thresholds == trained_run.thresholds

    assert cli.main(["export", str(trained_run.checkpoint), str(tmp_path / "model.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_trained_model(garbage)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign), metadata={"framework": "other"})
    with pytest.raises(CheckpointError, match="holds no ignite_trainer config"):
        load_trained_model(foreign)
