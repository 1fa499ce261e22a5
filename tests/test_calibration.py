"""Temperature scaling, expected calibration error and the calibration stored with a model."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

from cli import main
from conftest import tiny_config
from cv_experiment import shared_experiment
from ignite_trainer import train
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.data.records import Recording
from ignite_trainer.scoring.calibration import (ECE_BINS, Calibration, apply_temperatures, expected_calibration_error,
                                                fit_temperature, fit_temperatures, reliability)
from ignite_trainer.scoring.predictions import WindowPredictions
from ignite_trainer.use.evaluation import evaluate
from ignite_trainer.use.export import export_safetensors
from ignite_trainer.data.prepare import prepare_data
from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.scoring.predictions import recording_predictions
from ignite_trainer.use.model_files import load_trained_model
from ignite_trainer.use.windows import run_windows


# ---------------------------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("t0", [0.5, 2.5])
def test_fitting_recovers_a_known_temperature(t0):
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 3.0, 5000)
    y = (rng.random(z.size) < expit(z / t0)).astype(float)
    t = fit_temperature(z, np.arange(z.size), np.arange(z.size), y, np.ones(z.size, bool))
    assert t == pytest.approx(t0, rel=0.1)
    assert fit_temperature(z, np.arange(z.size), np.arange(z.size), y, np.ones(z.size, bool)) == t  # deterministic


def test_fitting_is_at_the_patient_level_after_the_window_mean():
    """Windows' logits / T, averaged per recording, recordings per patient: T0 is recovered at that level."""
    rng = np.random.default_rng(0)
    n, per = 20000, 3
    z = (rng.normal(0.0, 3.0, n)[:, None] + rng.normal(0.0, 1.0, (n, per))).ravel()  # windows of one recording agree
    rec_of = np.repeat(np.arange(n), per)
    y = (rng.random(n) < expit(z / 2.0).reshape(n, per).mean(axis=1)).astype(float)
    assert fit_temperature(z, rec_of, np.arange(n), y, np.ones(n, bool)) == pytest.approx(2.0, rel=0.08)


def test_masked_labels_are_left_out():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 3.0, 4000)
    y = (rng.random(z.size) < expit(z / 2.0)).astype(float)
    mask = np.ones(z.size, bool)
    mask[:2000] = False
    poisoned = y.copy()
    poisoned[:2000] = (z[:2000] < 0).astype(float)  # every masked one wrong: would drive T up if counted
    kept = fit_temperature(z, np.arange(z.size), np.arange(z.size), poisoned, mask)
    assert kept == fit_temperature(z[2000:], np.arange(2000), np.arange(2000), y[2000:], np.ones(2000, bool))
    assert fit_temperature(z, np.arange(z.size), np.arange(z.size), y, np.zeros(z.size, bool)) is None
    assert fit_temperature(z, np.arange(z.size), np.arange(z.size), np.ones(z.size), mask) is None  # one class


def test_fit_temperatures_leaves_an_absent_label_at_one():
    recs = [Recording(f"p{i}", f"p{i}_AV", Path("x.wav"), (float(i % 2), 0.0), (True, False)) for i in range(6)]
    probs = np.column_stack([np.linspace(0.1, 0.9, 6), np.full(6, 0.3)])
    windows = WindowPredictions(probs, np.zeros((6, 2)), np.ones((6, 2), bool), np.arange(6))
    cal = fit_temperatures(windows, list(range(6)), recs, "mean")
    assert cal.fitted == {"heart": True, "murmur": False} and cal.temperatures["murmur"] == 1.0
    assert cal.ece_before["murmur"] is None


# ---------------------------------------------------------------------------------------------- ECE
def test_ece_of_calibrated_and_over_confident_predictions():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    confident = np.where(p >= 0.5, 0.99, 0.01)
    assert expected_calibration_error(y, confident) > 0.2
    assert expected_calibration_error(np.array([1, 0]), np.array([0.99, 0.99])) == pytest.approx(0.49)
    assert expected_calibration_error(y, p) == expected_calibration_error(y, p)
    assert expected_calibration_error(np.array([]), np.array([])) is None


def test_reliability_bins():
    table = reliability(np.array([0, 1, 1, 0]), np.array([0.0, 0.95, 1.0, 0.55]))
    assert len(table) == ECE_BINS
    assert [b["count"] for b in table] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert table[9]["confidence"] == pytest.approx(0.975) and table[9]["accuracy"] == 1.0
    assert table[1]["confidence"] is None


def test_temperature_scaling_keeps_the_order_and_one_changes_nothing():
    p = np.array([[0.2, 0.7], [0.9, 0.4], [0.6, 0.99]])
    assert np.array_equal(apply_temperatures(p, {"heart": 1.0, "murmur": 1.0}), p)
    soft = apply_temperatures(p, {"heart": 3.0, "murmur": 3.0})
    assert (np.argsort(soft, axis=0) == np.argsort(p, axis=0)).all()
    assert (np.abs(soft - 0.5) < np.abs(p - 0.5)).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "2", True])
def test_a_temperature_must_be_finite_and_positive(bad):
    good = Calibration.identity().to_dict()
    good["temperatures"]["heart"] = bad
    with pytest.raises(CheckpointError, match="temperatures.heart"):
        Calibration.from_dict(good)
    with pytest.raises(ValueError):
        apply_temperatures(np.array([[0.5, 0.5]]), {"heart": bad, "murmur": 1.0})


# ---------------------------------------------------------------------------------------------- trained runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_run):
    """The shared run (calibrate off), and one trained with calibrate: true on the same data."""
    base = tmp_path_factory.mktemp("calibrated")
    on = Path(train(tiny_config(trained_run.data, trained_run.base, output_dir=str(base), name="on",
                                calibrate=True))["run_dir"])
    return trained_run.run_dir, on


def test_training_writes_the_best_checkpoints_calibration(runs):
    off, on = runs
    for run_dir in runs:
        cal = Calibration.from_json((run_dir / "calibration.json").read_text())
        trained = load_trained_model(run_dir)
        assert cal.epoch == trained.epoch and trained.calibration == cal
        assert all(t > 0 for t in cal.temperatures.values())
    assert not load_trained_model(off).applies_calibration and load_trained_model(on).applies_calibration


def test_evaluate_reports_ece_before_and_after_and_draws_the_diagram(runs, tmp_path, capsys):
    off, on = runs
    out = tmp_path / "report"
    assert main(["evaluate", str(on), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ECE before" in printed and "after" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["applied"] is True and cal["bins"] == ECE_BINS
    assert set(cal["ece_before"]) == set(cal["ece_after"]) == {"heart", "murmur"}
    stored = Calibration.from_json((on / "calibration.json").read_text())
    assert cal["temperatures"] == stored.temperatures
    assert cal["ece_after"] == stored.ece_after  # the same validation patients, the same temperatures
    assert (out / "figures" / "reliability.png").stat().st_size > 0
    assert "## Calibration" in (out / "report.md").read_text()


def test_calibrate_on_decides_on_temperature_scaled_probabilities(runs, tmp_path):
    _, on = runs
    trained = load_trained_model(on)
    evaluate(on, out_dir=tmp_path / "r", figures=False)
    written = np.array([[float(r["heart_prob"]), float(r["murmur_prob"])] for r in _rows(tmp_path / "r" / "recordings.csv")])
    run = run_windows(trained, [r for r in prepare_data(trained.config).val])
    assert np.array_equal(run.windows.probs, apply_temperatures(run.raw_windows.probs, trained.temperatures))
    _, recs, _ = run.levels(trained.config.aggregation)
    assert np.array_equal(written, recs.probs)  # what evaluate wrote are the calibrated probabilities
    assert trained.temperatures != {"heart": 1.0, "murmur": 1.0}
    raw = recording_predictions(run.raw_windows, run.dataset.window_recording, run.dataset.recordings)
    assert not np.allclose(raw.probs, recs.probs)
    ckpt_cal = load_checkpoint(trained.source)["calibration"]  # a calibrate: true checkpoint carries its own
    assert Calibration.from_dict(ckpt_cal) == trained.calibration


def _rows(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_model_without_the_file_evaluates_and_predicts_exactly_as_before(runs, tmp_path):
    """calibrate off: the file changes no output; without it (every older run) the outputs are the same bytes."""
    off, _ = runs
    old = tmp_path / "old"
    shutil.copytree(off, old, ignore=shutil.ignore_patterns("report"))
    (old / "calibration.json").unlink()
    trained = load_trained_model(old)
    assert trained.calibration is None and trained.temperatures == {"heart": 1.0, "murmur": 1.0}
    a = evaluate(off, out_dir=tmp_path / "a", figures=False)
    b = evaluate(old, out_dir=tmp_path / "b", figures=False)
    for name in ("patients.csv", "recordings.csv", "challenge_scores.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["levels"] == b["levels"] and a["challenge"] == b["challenge"]
    assert "calibration" not in b and "calibration" in a  # an old model's results hold what they always held
    for run_dir, name in ((off, "a.csv"), (old, "b.csv")):
        assert main(["predict", str(run_dir), str(trained.config.data), "--output", str(tmp_path / name)],
) == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_the_calibration_travels_with_an_export(runs, tmp_path):
    _, on = runs
    path = export_safetensors(on, tmp_path / "m.safetensors")
    trained = load_trained_model(path)
    assert trained.calibration == load_trained_model(on).calibration and trained.applies_calibration


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["temperatures"].update(murmur=-2.0), "temperatures.murmur"),
    (lambda d: d["temperatures"].pop("heart"), "temperatures"),
    (lambda d: d.update(applied="yes"), "applied"),
    (lambda d: d.update(format="other"), "format"),
    (None, "not JSON"),
])
def test_a_damaged_calibration_file_is_one_error_naming_it(runs, tmp_path, capsys, edit, field):
    off, _ = runs
    bad = tmp_path / "bad"
    shutil.copytree(off, bad, ignore=shutil.ignore_patterns("report"))
    if edit is None:
        (bad / "calibration.json").write_text("{not json")
    else:
        d = json.loads((bad / "calibration.json").read_text())
        edit(d)
        (bad / "calibration.json").write_text(json.dumps(d))
    assert main(["evaluate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "calibration.json" in err[0] and field in err[0]
    assert not (bad / "report").exists()


# ---------------------------------------------------------------------------------------------- cv
def test_the_cv_report_shows_ece_before_and_after_and_the_ensemble_temperature(tmp_path_factory):
    exp = shared_experiment(tmp_path_factory)
    cal = exp.summary["calibration"]
    for when in ("before", "after"):
        for label in ("heart", "murmur"):
            assert set(cal[f"ece_{when}"][label]) == {"mean", "sd", "n", "of"}
    assert cal["ece_before"]["heart"]["n"] == len(cal["per_run"]) > 1
    markdown = (exp.exp_dir / "report" / "report.md").read_text()
    assert "ECE before" in markdown and "ECE after" in markdown
    stored = Calibration.from_json((exp.exp_dir / "calibration.json").read_text())
    assert stored.temperatures == cal["ensemble"]["temperatures"]
    from ignite_trainer.use.ensemble import load_ensemble
    assert load_ensemble(exp.exp_dir).calibration == stored


# ---------------------------------------------------------------------------------------------- MC dropout
def test_mc_dropout_is_reproducible_and_spreads(runs, tmp_path):
    from ignite_trainer.use.mc_dropout import mc_dropout
    off, _ = runs
    trained = load_trained_model(off)
    recordings = prepare_data(trained.config).val
    a = mc_dropout(trained, recordings, 3, seed=5)
    b = mc_dropout(trained, recordings, 3, seed=5)
    one_by_one = mc_dropout(trained, recordings, 3, seed=5, batch_size=1)
    other = mc_dropout(trained, recordings, 3, seed=6)
    assert a.dropout_modules > 0
    assert np.array_equal(a.patients.probs, b.patients.probs) and np.array_equal(a.patient_sd, b.patient_sd)
    # masks are drawn per window: another batching changes nothing but float rounding
    assert np.allclose(a.patients.probs, one_by_one.patients.probs, rtol=0, atol=1e-6)
    assert (a.patient_sd > 0).all()
    assert not np.array_equal(a.patients.probs, other.patients.probs)
    # the model itself is left as it was: the next ordinary pass is deterministic
    assert not trained.model.training and not any(m._forward_hooks for m in trained.model.modules())


def test_evaluate_writes_the_mc_dropout_table(runs, tmp_path):
    off, _ = runs
    result = evaluate(off, out_dir=tmp_path / "r", figures=False, mc_dropout=2, mc_seed=1)
    rows = _rows(tmp_path / "r" / "mc_dropout.csv")
    assert len(rows) == result["counts"]["patient"] and rows[0]["passes"] == "2"
    assert float(rows[0]["murmur_sd"]) >= 0 and result["mc_dropout"]["passes"] == 2


@pytest.mark.parametrize("args", [["--mc-dropout", "0"], ["--mc-dropout", "-3"], ["--mc-seed", "-1"]])
def test_bad_mc_dropout_flags_are_one_error(runs, tmp_path, capsys, args):
    off, _ = runs
    out = tmp_path / "never"
    assert main(["evaluate", str(off), "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and args[0] in err[0]
    assert not out.exists()


def test_predict_mc_dropout_needs_its_output_file(runs, tmp_path, capsys):
    off, _ = runs
    data = load_trained_model(off).config.data
    assert main(["predict", str(off), str(data), "--mc-dropout", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mc-output" in err[0]
    assert main(["predict", str(off), str(data), "--output", str(tmp_path / "p.csv"), "--mc-dropout", "2",
                 "--mc-output", str(tmp_path / "mc.csv")]) == 0
    assert len(_rows(tmp_path / "mc.csv")) == len({r["patient_id"] for r in _rows(tmp_path / "p.csv")})


def test_the_predictor_answers_with_the_calibrated_probabilities_predict_gives(runs, trained_run):
    from test_predictor import _patients
    from ignite_trainer.use.inference import predict
    from ignite_trainer.use.predictor import Predictor
    _, on = runs
    folder = predict(on, [trained_run.data])
    by_id = {pid: i for i, pid in enumerate(folder.patients.ids)}
    predictor = Predictor.load(on)
    for pid, text, recordings in _patients(trained_run.data)[:4]:
        result = predictor.predict_patient(recordings, text)
        np.testing.assert_allclose([result.per_label_probs["heart"], result.per_label_probs["murmur"]],
                                   folder.patients.probs[by_id[pid]], rtol=0, atol=1e-6)  # float32 batches differ
