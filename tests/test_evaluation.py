"""evaluate: scores wired to the right predictions, the run's own split, files that agree with each other.

The tiny trained run these tests share (`trained_run`) lives in conftest.py.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from conftest import circor_subset, level_predictions, read_csv, tiny_config  # noqa: F401
from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.data.splits import split_patients
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.core.errors import CheckpointError, DataError
from ignite_trainer.scoring.challenge import challenge_cost
from ignite_trainer.scoring.decision import DecisionLayer
from ignite_trainer.use.evaluation import challenge_section, evaluate, level_scores
from ignite_trainer.use.model_files import load_trained_model
from ignite_trainer.use.writers import PATIENT_COLUMNS
from ignite_trainer.scoring.scores import auprc, auroc, binary_stats, macc


# ---------------------------------------------------------------------------------------------- score wiring
lp = level_predictions


def test_level_scores_by_hand_with_masks_and_thresholds():
    # heart at t=0.4: preds 1,1,0,0,1,0 vs truth 1,0,1,0,1,0 -> TP 2, FP 1, FN 1, TN 2.
    # murmur at t=0.6, present only for the first four: preds 1,0,0,1 vs truth 1,1,0,0 -> TP 1 FP 1 FN 1 TN 1.
    probs = [[0.9, 0.7], [0.4, 0.5], [0.3, 0.1], [0.1, 0.6], [0.8, 0.9], [0.2, 0.99]]
    targets = [[1, 1], [0, 1], [1, 0], [0, 0], [1, 0], [0, 1]]
    mask = [[1, 1], [1, 1], [1, 1], [1, 1], [1, 0], [1, 0]]
    s = level_scores(lp(probs, targets, mask), {"heart": 0.4, "murmur": 0.6})
    h, m = s["heart"], s["murmur"]
    assert (h["tp"], h["fp"], h["fn"], h["tn"]) == (2, 1, 1, 2)
    assert h["precision"] == pytest.approx(2 / 3) and h["recall"] == pytest.approx(2 / 3)
    assert h["specificity"] == pytest.approx(2 / 3) and h["f1"] == pytest.approx(2 / 3)
    assert h["macc"] == pytest.approx(2 / 3) and h["support"] == 6 and h["positives"] == 3
    # AUROC: positives 0.9, 0.3, 0.8 vs negatives 0.4, 0.1, 0.2 -> 8 of 9 pairs ranked right.
    assert h["auroc"] == pytest.approx(8 / 9)
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["support"]) == (1, 1, 1, 1, 4)
    assert m["accuracy"] == 0.5 and "macc" not in m
    assert m["auroc"] == pytest.approx(0.75)  # positives 0.7, 0.5 vs negatives 0.1, 0.6: 3 of 4


def test_level_scores_are_none_where_undefined_and_leave_out_an_absent_label():
    none = level_scores(lp([[0.2, 0.7], [0.6, 0.1]], [[0, 0], [0, 0]]), {"heart": 0.5, "murmur": 0.5})["heart"]
    assert (none["precision"], none["recall"], none["f1"], none["auroc"]) == (0.0, None, 0.0, None)
    assert none["specificity"] == 0.5 and none["macc"] is None
    every = level_scores(lp([[0.2, 0.7], [0.6, 0.1]], [[1, 1], [1, 1]]), {"heart": 0.5, "murmur": 0.5})["heart"]
    assert (every["recall"], every["specificity"], every["precision"], every["auprc"]) == (0.5, None, 1.0, None)
    heart_only = level_scores(lp([[0.2, 0.7], [0.6, 0.1]], [[1, 0], [0, 0]], [[1, 0], [1, 0]]),
                              {"heart": 0.5, "murmur": 0.5})
    assert list(heart_only) == ["heart"]  # murmur is present nowhere (PhysioNet 2016): no row at all


def test_challenge_section_scores_the_layers_calls_by_hand():
    # Legacy layer: murmur threshold 0.3, margin 0.1 -> Unknown band [0.2, 0.4); heart threshold 0.5.
    murmur = [0.9, 0.25, 0.3, 0.1, 0.35]  # -> Present, Unknown, Unknown, Absent, Unknown
    classes = ["Present", "Present", "Unknown", "Absent", "Absent"]
    heart = [0.8, 0.6, 0.2, 0.1, 0.4]  # -> Abnormal, Abnormal, Normal, Normal, Normal vs truth A, N, A, N, N
    probs = np.stack([heart, murmur], 1)
    targets = [[1, 1], [0, 1], [1, 0], [0, 0], [0, 0]]
    mask = [[1, 1], [1, 1], [1, 0], [1, 1], [1, 1]]
    patients = lp(probs, targets, mask, classes)
    ch, scores = challenge_section(patients, lp(probs, targets, mask, classes, level="recording"),
                                   DecisionLayer.legacy(0.3, 0.5, 0.1))
    assert ch["scored_patients"] == 5 and scores.n_patients == 5
    assert ch["murmur_weighted_accuracy"] == pytest.approx((5 * 1 + 3 * 1 + 1 * 1) / (5 * 2 + 3 * 1 + 1 * 2))
    # Outcome: TP 1, FP 1, FN 1, TN 2, n 5, s = 2/5.
    expert = (25 + 397 * 0.4 - 1718 * 0.4**2 + 11296 * 0.4**4) * 5
    assert ch["outcome_cost"] == pytest.approx((10 * 5 + expert + 10000 * 1 + 50000 * 1) / 5)
    assert ch["outcome_cost"] == pytest.approx(12208.0976)
    # The murmur cost refers Present and Unknown calls (patients 0, 1, 2, 4) against the outcome truth.
    assert ch["murmur"]["cost"] == pytest.approx(challenge_cost(2, 2, 0, 1))
    assert ch["murmur"]["accuracy_classes"] == {"Present": 0.5, "Unknown": 1.0, "Absent": 0.5}
    assert ch["outcome"]["weighted_accuracy"] == pytest.approx((5 * 1 + 1 * 2) / (5 * 2 + 1 * 3))
    assert ch["decision_layer"]["murmur.kind"] == "band"


def test_challenge_section_is_empty_without_murmur_classes():
    probs = np.stack([[0.5] * 4, [0.9, 0.2, 0.6, 0.1]], 1)
    targets = [[1, 1], [0, 1], [1, 0], [0, 0]]
    patients = lp(probs, targets)  # 2016-like: binary labels, no Present/Unknown/Absent class
    ch, scores = challenge_section(patients, lp(probs, targets, level="recording"), DecisionLayer.legacy(0.5, 0.5))
    assert scores is None and ch["scored_patients"] == 0
    assert ch["murmur_weighted_accuracy"] is None and ch["outcome_cost"] is None and ch["murmur"] is None


# ---------------------------------------------------------------------------------------------- on a trained run
def test_evaluate_reproduces_the_runs_validation_split_with_its_thresholds(trained_run):
    result = evaluate(trained_run.run_dir, figures=False)
    config = trained_run.config
    _, val = split_patients(read_recordings(trained_run.data, "circor2022"), config.val_fraction, config.seed,
                            n_folds=config.n_folds, fold=config.fold)
    rows = read_csv(Path(result["files"]["patients"]))
    assert [r["patient_id"] for r in rows] == list(dict.fromkeys(r.patient_id for r in val))
    assert result["counts"]["recording"] == len(val) and result["split"] == "val"
    assert result["thresholds"] == trained_run.thresholds and result["thresholds_tuned"]
    assert Path(result["files"]["metrics"]) == trained_run.run_dir / "report" / "metrics.json"
    assert json.loads((trained_run.run_dir / "report" / "metrics.json").read_text()) == json.loads(json.dumps(result))
    for r in rows:
        for label in ("heart", "murmur"):
            assert int(r[f"{label}_pred"]) == int(float(r[f"{label}_prob"]) >= trained_run.thresholds[label])


def test_patients_csv_agrees_with_metrics_json(trained_run, tmp_path):
    result = evaluate(trained_run.run_dir, split="all", out_dir=tmp_path, figures=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    with open(tmp_path / "patients.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == PATIENT_COLUMNS
        rows = list(reader)
    assert len(rows) == metrics["counts"]["patient"] == 12
    assert any(r["murmur_true"] == "" for r in rows)  # Unknown murmurs are masked: empty truth

    t = metrics["thresholds"]
    for label in ("heart", "murmur"):
        present = [r for r in rows if r[f"{label}_true"] != ""]
        y = np.array([int(r[f"{label}_true"]) for r in present])
        p = np.array([float(r[f"{label}_prob"]) for r in present])
        pred = np.array([int(r[f"{label}_pred"]) for r in present])
        np.testing.assert_array_equal(pred, p >= t[label])
        expected = {**binary_stats(y, pred), "auroc": auroc(y, p), "auprc": auprc(y, p)}
        for key, value in expected.items():
            assert metrics["levels"]["patient"][label][key] == pytest.approx(value), (label, key)
    heart = metrics["levels"]["patient"]["heart"]
    assert heart["macc"] == pytest.approx(macc(heart["sensitivity"], heart["specificity"]))

    assert metrics["challenge"]["scored_patients"] == 12
    assert metrics["project"]["heart_macc"] == metrics["levels"]["recording"]["heart"]["macc"]
    assert result["levels"] == metrics["levels"]


def test_aggregation_mean_and_any_over_recordings(trained_run, tmp_path):
    means = evaluate(trained_run.run_dir, out_dir=tmp_path / "mean", figures=False)
    anys = evaluate(trained_run.run_dir, aggregation="any", out_dir=tmp_path / "any", figures=False)
    assert means["aggregation"] == "mean" and anys["aggregation"] == "any"
    recordings = read_csv(tmp_path / "mean" / "recordings.csv")
    assert recordings == read_csv(tmp_path / "any" / "recordings.csv")  # windows -> recordings is always the mean
    for how, reduce in (("mean", np.mean), ("any", np.max)):
        for row in read_csv(tmp_path / how / "patients.csv"):
            mine = [r for r in recordings if r["patient_id"] == row["patient_id"]]
            for label in ("heart", "murmur"):
                expected = reduce([float(r[f"{label}_prob"]) for r in mine])
                assert float(row[f"{label}_prob"]) == pytest.approx(expected, rel=1e-12)
    assert sum(int(r["windows"]) for r in recordings) == means["counts"]["window"]


def test_evaluate_writes_report_with_figures(trained_run):
    result = evaluate(trained_run.run_dir)
    report = trained_run.run_dir / "report"
    text = (report / "report.md").read_text()
    # confusion and ROC/PR per label, training curves, and the reliability diagram of the run's calibration
    assert len(result["files"]["figures"]) == 6
    for fig in result["files"]["figures"]:
        assert Path(fig).stat().st_size > 10_000 and f"figures/{Path(fig).name}" in text


def test_evaluate_on_a_labelless_folder_says_use_predict(trained_run, tmp_path):
    folder = circor_subset(trained_run.data, tmp_path / "hidden", 2, strip_labels=True)
    with pytest.raises(DataError, match="has no labels; use predict"):
        evaluate(trained_run.run_dir, data=folder)
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    shutil.copy(next((trained_run.data / "training_data").glob("*.wav")), wavs)
    with pytest.raises(DataError, match="has no labels; use predict"):
        evaluate(trained_run.run_dir, data=wavs)


def test_evaluate_on_another_labelled_folder_uses_all_of_it(trained_run, tmp_path):
    folder = circor_subset(trained_run.data, tmp_path / "other", 3)
    result = evaluate(trained_run.run_dir, data=folder, out_dir=tmp_path / "out", figures=False)
    assert result["split"] == "all" and result["counts"]["patient"] == 3
    assert result["data"] == str(folder)


def _edited_checkpoint(trained_run, tmp_path, edit):
    ckpt = load_checkpoint(trained_run.checkpoint)
    edit(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["config"].update(n_mels=32),
     r"weights do not fit model AttentionCNN .*shape mismatch.*feature setting"),
    (lambda c: c["config"].update(model="mean_pool_cnn"), r"weights do not fit model MeanPoolCNN .*unexpected key"),
    (lambda c: c["config"].update(model="no_such_model"),
     r"cannot rebuild its model .*'no_such_model' is not registered"),
    (lambda c: c.pop("config"), r"holds no training config"),
    (lambda c: c["config"].update(batch_sizes=3),
     r"training config is not usable .*unknown config field 'batch_sizes'"),
    (lambda c: c.update(thresholds={"heart": 2.0}), r"thresholds .* are not one number in \[0, 1\]"),
    (lambda c: c.update(thresholds={"heart": True, "murmur": 0.5}), r"thresholds .* are not one number in \[0, 1\]"),
])
def test_a_checkpoint_that_does_not_fit_gets_one_clear_line(trained_run, tmp_path, edit, message):
    path = _edited_checkpoint(trained_run, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_trained_model(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_checkpoint_without_thresholds_falls_back_to_half(trained_run, tmp_path):
    path = _edited_checkpoint(trained_run, tmp_path, lambda c: c.pop("thresholds"))
    loaded = load_trained_model(path)
    assert loaded.thresholds == {"heart": 0.5, "murmur": 0.5} and not loaded.thresholds_tuned
    assert loaded.run_dir is None


def test_cli_evaluate_prints_scores_and_errors_are_one_line(trained_run, tmp_path, capsys):
    assert cli.main(["evaluate", str(trained_run.checkpoint), "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2022 Challenge murmur weighted accuracy" in out and str(tmp_path / "report.md") in out
    assert cli.main(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'missing'}: no such run directory or checkpoint file"]
