"""The Challenge wiring: training stores a decision layer, evaluate scores exactly the files predict writes,
and every probability written reads back as the same float64."""

from pathlib import Path

import pytest

import cli
from conftest import read_csv  # noqa: F401
from ignite_trainer.scoring.challenge import (
    CHALLENGE_OUTPUT_CLASSES, format_scores_csv, read_challenge_outputs, scores_from_outputs,
)
from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.scoring.decision import DecisionLayer
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.use.evaluation import evaluate
from ignite_trainer.use.export import export_safetensors
from ignite_trainer.use.inference import predict
from ignite_trainer.use.model_files import load_trained_model
from ignite_trainer.data.splits import patient_labels
from ignite_trainer.use.writers import write_challenge_outputs, write_patients_csv, write_predictions_csv


def _truth(folder: Path) -> dict[str, tuple[str, str]]:
    """Patient -> (murmur class, outcome) as the official evaluator reads it from the labelled data."""
    by_patient: dict[str, list] = {}
    for r in read_recordings(folder, "circor2022"):
        by_patient.setdefault(r.patient_id, []).append(r)
    truth = {}
    for pid, recs in by_patient.items():
        labels, mask, murmur = patient_labels(recs)
        truth[pid] = (murmur, "Abnormal" if labels[0] > 0.5 else "Normal")
    return truth


def test_training_stores_a_weights_only_decision_layer_used_by_evaluate(trained_run):
    ckpt = load_checkpoint(trained_run.checkpoint)  # weights_only=True
    layer = DecisionLayer.from_dict(ckpt["decision"])
    assert layer.prior is not None and sum(layer.prior[:3]) == pytest.approx(1.0)
    trained = load_trained_model(trained_run.run_dir)
    assert trained.decision == layer and trained.decision_layer(0.3) == layer  # the margin is only for old files
    result = evaluate(trained_run.run_dir, figures=False, out_dir=trained_run.base / "wiring_report")
    assert DecisionLayer.from_dict(result["challenge"]["decision_layer"]) == layer


def test_challenge_scores_csv_is_recomputed_from_the_written_challenge_files(trained_run, tmp_path):
    out_dir, files = tmp_path / "report", tmp_path / "outputs"
    result = evaluate(trained_run.run_dir, data=trained_run.data, split="all", out_dir=out_dir, figures=False)
    assert cli.main(["predict", str(trained_run.run_dir), str(trained_run.data), "--output", str(tmp_path / "p.csv"),
                     "--challenge-dir", str(files)]) == 0
    recomputed = scores_from_outputs(_truth(trained_run.data), read_challenge_outputs(files))
    assert (out_dir / "challenge_scores.csv").read_text() == format_scores_csv(recomputed)
    expected = recomputed.as_dict()
    for task in ("murmur", "outcome"):
        assert result["challenge"][task] == expected[task]
    assert result["challenge"]["murmur_weighted_accuracy"] == recomputed.murmur.weighted_accuracy
    assert result["challenge"]["outcome_cost"] == recomputed.outcome.cost
    text = (out_dir / "challenge_scores.csv").read_text().splitlines()
    assert text[0] == "#Murmur scores" and "#Outcome scores (per class)" in text
    assert text[text.index("#Murmur scores (per class)") + 1] == "Classes,Present,Unknown,Absent"


def test_every_written_probability_round_trips_to_the_same_float64(trained_run, tmp_path):
    result = predict(trained_run.run_dir, [trained_run.data])
    write_predictions_csv(result, tmp_path / "pred.csv")
    write_challenge_outputs(result, tmp_path / "outputs")
    write_patients_csv(result.patients, result.thresholds, tmp_path / "patients.csv")

    rows = {(r["level"], r["id"]): r for r in read_csv(tmp_path / "pred.csv")}
    for level in (result.recordings, result.patients):
        for i, item in enumerate(level.ids):
            row = rows[(level.level, item)]
            assert float(row["heart_prob"]) == level.probs[i, 0] and float(row["murmur_prob"]) == level.probs[i, 1]
    for i, row in enumerate(read_csv(tmp_path / "patients.csv")):
        assert row["patient_id"] == result.patients.ids[i]
        assert (float(row["heart_prob"]), float(row["murmur_prob"])) == tuple(result.patients.probs[i])
    labels, probs = result.challenge_outputs()
    outputs = read_challenge_outputs(tmp_path / "outputs")
    for i, pid in enumerate(result.patients.ids):
        assert outputs[pid].classes == CHALLENGE_OUTPUT_CLASSES
        assert outputs[pid].probabilities == tuple(probs[i].tolist())
        assert outputs[pid].labels == tuple(labels[i].tolist())
    assert len({p.probabilities[1] for p in outputs.values()}) > 1  # Unknown has a real probability


def test_safetensors_export_carries_the_decision_layer(trained_run, tmp_path):
    path = export_safetensors(trained_run.run_dir, tmp_path / "m.safetensors")
    assert load_trained_model(path).decision == load_trained_model(trained_run.run_dir).decision


def test_a_checkpoint_without_a_decision_layer_falls_back_to_the_legacy_rule(trained_run, tmp_path):
    import torch

    ckpt = load_checkpoint(trained_run.checkpoint)
    del ckpt["decision"]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    trained = load_trained_model(old)
    assert trained.decision is None
    assert trained.decision_layer(0.2) == DecisionLayer.legacy(trained.thresholds["murmur"],
                                                               trained.thresholds["heart"], 0.2)
    result = evaluate(old, data=trained_run.data, split="all", unknown_margin=0.2, figures=False,
                      out_dir=tmp_path / "r")
    assert result["challenge"]["decision"].startswith("legacy rule")
    ckpt["decision"] = {"format": "ignite_trainer.decision/1", "murmur.kind": "band"}
    torch.save(ckpt, old)
    with pytest.raises(CheckpointError, match="old.pt.*decision key"):
        load_trained_model(old)
