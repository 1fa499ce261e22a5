"""Cross-validation experiments on a tiny set: every member a normal run, out-of-fold predictions that cover every
patient once per seed, thresholds never tuned on the fold they decide, resume, parallel members, bad input."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from ignite.engine import Events

from cli import main
from cv_experiment import FOLDS, SEEDS, cv_config, cv_data, shared_experiment
from ignite_trainer.experiments.cv import cross_validate, resume_cross_validation
from ignite_trainer.experiments.layout import Experiment, Member, member_status
from ignite_trainer.experiments.cv_report import METRICS, read_oof_predictions
from ignite_trainer.scoring.predictions import tune_thresholds
from ignite_trainer.data.prepare import prepare_data
from ignite_trainer.data.splits import assign_folds, read_split_file

QUIET = dict(bootstrap=0, figures=False, echo=lambda _: None)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return shared_experiment(tmp_path_factory)


def all_recordings(config):
    data = prepare_data(config.updated({"n_folds": 0, "val_fraction": 0.5}))
    return data.train + data.val


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- the experiment
def test_every_member_is_a_normal_run_over_the_experiments_folds(experiment):
    exp = Experiment.load(experiment.exp_dir)
    assert (exp.n_folds, exp.seeds, exp.split_seed) == (FOLDS, SEEDS, 0)
    folds = read_split_file(experiment.exp_dir / "splits.json")
    recordings = all_recordings(exp.config)
    assert folds == assign_folds(recordings, FOLDS, 0)
    for m in exp.members():
        run_dir = experiment.exp_dir / "runs" / m.name
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (config["seed"], config["fold"], config["n_folds"], config["split_seed"]) == (m.seed, m.fold, FOLDS, 0)
        assert member_status(run_dir) == "done"
        with open(run_dir / "oof" / "patients.csv", newline="") as f:
            assert sorted(r["patient_id"] for r in csv.DictReader(f)) == folds[m.fold]
    for name in ("report.md", "summary.json", "scores.csv", "figures/fold_scores.png", "figures/roc_pr_murmur.png",
                 "figures/training_curves.png"):
        assert (experiment.exp_dir / "report" / name).is_file(), name


def test_out_of_fold_predictions_hold_every_patient_once_per_seed(experiment):
    rows = read_oof_predictions(experiment.exp_dir / "oof_predictions.csv")
    folds = read_split_file(experiment.exp_dir / "splits.json")
    fold_of = {p: k for k, f in enumerate(folds) for p in f}
    for seed in SEEDS:
        ids = [r["patient_id"] for r in rows if r["seed"] == seed]
        assert sorted(ids) == sorted(fold_of) and len(set(ids)) == len(ids)
    for r in rows:
        assert r["fold"] == fold_of[r["patient_id"]]
    # exactly the member's own predictions, full precision
    member = {}
    with open(experiment.exp_dir / "runs" / "fold1_seed1" / "oof" / "patients.csv", newline="") as f:
        for r in csv.DictReader(f):
            member[r["patient_id"]] = (float(r["heart_prob"]), float(r["murmur_prob"]))
    for r in rows:
        if r["seed"] == 1 and r["fold"] == 1:
            assert (r["heart_prob"], r["murmur_prob"]) == member[r["patient_id"]]


def test_each_fold_is_decided_by_thresholds_tuned_on_the_other_folds(experiment):
    summary = json.loads((experiment.exp_dir / "report" / "summary.json").read_text())
    rows = [r for r in read_oof_predictions(experiment.exp_dir / "oof_predictions.csv") if r["seed"] == 0]
    for k in range(FOLDS):
        others = [r for r in rows if r["fold"] != k]
        probs = np.array([[r["heart_prob"], r["murmur_prob"]] for r in others])
        targets = np.array([[int(r["heart_true"] or 0), int(r["murmur_true"] or 0)] for r in others])
        mask = np.array([[r["heart_true"] != "", r["murmur_true"] != ""] for r in others])
        assert summary["sets"]["seed0"]["fold_thresholds"][str(k)] == tune_thresholds(probs, targets, mask, "f1")
    assert set(summary["pooled"]) == set(METRICS)
    assert summary["runs"]["murmur.f1"]["of"] == FOLDS * len(SEEDS)
    assert "seed_mean" in summary["sets"] and summary["missing"] == []
    assert json.loads((experiment.exp_dir / "thresholds.json").read_text())["thresholds"] == summary["thresholds"]


def oof_levels(exp_dir, seed, folds):
    """Patient- and recording-level predictions of the members ``fold<k>_seed<seed>`` (k in folds), from
    their own oof/ files and the experiment's oof_predictions.csv truth, patients sorted by id."""
    from ignite_trainer.scoring.predictions import LevelPredictions

    truth = {r["patient_id"]: r for r in read_oof_predictions(exp_dir / "oof_predictions.csv") if r["seed"] == seed}
    patients, recs = {}, []
    for k in folds:
        oof = exp_dir / "runs" / f"fold{k}_seed{seed}" / "oof"
        with open(oof / "patients.csv", newline="") as f:
            patients.update({r["patient_id"]: (float(r["heart_prob"]), float(r["murmur_prob"]))
                             for r in csv.DictReader(f)})
        with open(oof / "recordings.csv", newline="") as f:
            recs += [(r["recording_id"], r["patient_id"], float(r["heart_prob"]), float(r["murmur_prob"]))
                     for r in csv.DictReader(f)]
    ids = sorted(patients)
    targets = np.array([[int(truth[p]["heart_true"] or 0), int(truth[p]["murmur_true"] or 0)] for p in ids])
    mask = np.array([[truth[p]["heart_true"] != "", truth[p]["murmur_true"] != ""] for p in ids])
    level = LevelPredictions("patient", ids, np.array([patients[p] for p in ids]), targets, mask, ids,
                             [truth[p]["murmur_class"] or None for p in ids], np.ones(len(ids), dtype=np.int64))
    rec_level = LevelPredictions("recording", [r[0] for r in recs], np.array([r[2:] for r in recs]),
                                 np.zeros((len(recs), 2)), np.zeros((len(recs), 2), dtype=bool),
                                 [r[1] for r in recs], [None] * len(recs), np.ones(len(recs), dtype=np.int64))
    return level, rec_level


def test_each_fold_is_decided_by_a_challenge_layer_fitted_on_the_other_folds(experiment):
    from ignite_trainer.scoring.challenge import challenge_scores
    from ignite_trainer.scoring.decision import DecisionLayer, fit_decision, patient_features, patient_truth

    summary = json.loads((experiment.exp_dir / "report" / "summary.json").read_text())
    seed0 = summary["sets"]["seed0"]
    calls, truth = [], []
    for k in range(FOLDS):
        fitted = fit_decision(*oof_levels(experiment.exp_dir, 0, [j for j in range(FOLDS) if j != k]))
        stored = seed0["fold_decisions"][str(k)]
        assert stored.keys() == fitted.to_dict().keys()
        assert [stored[key] for key in sorted(stored) if key != "format" and not key.endswith("kind")
                and not key.endswith("features")] == pytest.approx(
            [v for key, v in sorted(fitted.to_dict().items()) if key != "format" and not key.endswith("kind")
             and not key.endswith("features")], abs=1e-6)
        patients, recs = oof_levels(experiment.exp_dir, 0, [k])
        layer = DecisionLayer.from_dict(stored)
        labels, probs = layer.outputs(patient_features(patients, recs))
        m, o = patient_truth(patients)
        calls.append((labels, probs))
        truth += list(zip(m, o))
    labels = np.concatenate([c[0] for c in calls])
    probs = np.concatenate([c[1] for c in calls])
    scores = challenge_scores([t[0] for t in truth], [t[1] for t in truth], labels[:, :3], probs[:, :3],
                              labels[:, 3:], probs[:, 3:])
    # the pooled out-of-fold Challenge scores are the official ones of the cross-fitted calls
    assert seed0["pooled"]["murmur_weighted_accuracy"] == pytest.approx(scores.murmur.weighted_accuracy)
    assert seed0["pooled"]["outcome_cost"] == pytest.approx(scores.outcome.cost)
    assert seed0["pooled_challenge"]["murmur"]["accuracy_classes"]["Present"] == pytest.approx(
        scores.murmur.accuracy_classes[0])
    # the ensemble's layer: fitted on all out-of-fold patients, in decision.json, listed by ensemble.json
    layer = DecisionLayer.from_json((experiment.exp_dir / "decision.json").read_text())
    assert layer.to_dict() == summary["decision"]
    assert json.loads((experiment.exp_dir / "ensemble.json").read_text())["decision"] == "decision.json"
    report = (experiment.exp_dir / "report" / "report.md").read_text()
    assert "## murmur_weighted_accuracy" in report and "## murmur_accuracy.Unknown" in report


# ---------------------------------------------------------------------------------------------- resume, parallel
def test_resume_skips_finished_runs_and_continues_the_interrupted_one_exactly(tmp_path_factory):
    config = cv_config(tmp_path_factory, epochs=2)
    base, _ = cv_data(tmp_path_factory)
    exp_dir = base / "interrupted"
    started = []

    def interrupt_second(trainer, evaluator):  # the second member is "killed" after its first epoch's checkpoint
        started.append(trainer)
        if len(started) == 2:
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda _: (_ for _ in ()).throw(KeyboardInterrupt))

    with pytest.raises(KeyboardInterrupt):
        cross_validate(config, FOLDS, [0], exp_dir=exp_dir, setup=interrupt_second, **QUIET)
    runs = exp_dir / "runs"
    assert member_status(runs / "fold0_seed0") == "done" and member_status(runs / "fold1_seed0") == "partial"
    finished_before = snapshot(runs / "fold0_seed0")

    started.clear()
    summary = resume_cross_validation(exp_dir, setup=lambda t, e: started.append(t), **QUIET)
    assert len(started) == 2  # the interrupted member and the one never started; fold 0 was not trained again
    assert snapshot(runs / "fold0_seed0") == finished_before
    assert "resumed from" in (runs / "fold1_seed0" / "train.log").read_text()
    assert summary["failed"] == {} and summary["missing"] == []

    clean = cross_validate(config, FOLDS, [0], exp_dir=base / "uninterrupted", only=["1:0"], **QUIET)
    assert clean["failed"] == {}
    for name in ("metrics.jsonl", "oof/patients.csv"):
        resumed = (runs / "fold1_seed0" / name).read_text().splitlines()
        straight = (base / "uninterrupted" / "runs" / "fold1_seed0" / name).read_text().splitlines()
        if name == "metrics.jsonl":  # equal up to the wall-clock timings
            resumed = [{k: v for k, v in json.loads(x).items() if not k.endswith("seconds")} for x in resumed]
            straight = [{k: v for k, v in json.loads(x).items() if not k.endswith("seconds")} for x in straight]
        assert resumed == straight


def test_parallel_members_give_the_same_results_as_sequential_ones(experiment, tmp_path_factory):
    config = cv_config(tmp_path_factory)
    exp_dir = experiment.base / "parallel"
    result = cross_validate(config, FOLDS, SEEDS, exp_dir=exp_dir, jobs=2, threads=1, only=["0:0", "2:1"], **QUIET)
    assert result["failed"] == {} and not result["collected"]
    assert read_split_file(exp_dir / "splits.json") == read_split_file(experiment.exp_dir / "splits.json")
    for name in ("fold0_seed0", "fold2_seed1"):
        for file in ("oof/patients.csv",):
            assert (exp_dir / "runs" / name / file).read_text() == (experiment.exp_dir / "runs" / name / file).read_text()
        assert (exp_dir / "logs" / f"{name}.log").is_file()
    assert member_status(exp_dir / "runs" / "fold1_seed0") == "new"


def test_a_failed_member_is_named_and_the_others_go_on(tmp_path_factory, capsys):
    config = cv_config(tmp_path_factory)
    base, _ = cv_data(tmp_path_factory)
    exp_dir = base / "failing"
    calls = []

    def fail_second(trainer, evaluator):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    summary = cross_validate(config, FOLDS, [0], exp_dir=exp_dir, setup=fail_second, **QUIET)
    assert summary["failed"] == {"fold1_seed0": "RuntimeError: boom"}
    assert summary["members_finished"] == ["fold0_seed0", "fold2_seed0"] and summary["missing"] == ["fold1_seed0"]
    assert json.loads((exp_dir / "state" / "fold1_seed0.json").read_text())["status"] == "failed"

    # through the CLI: the member fails again (its run directory is blocked by a file), exit code 2 names it
    shutil.rmtree(exp_dir / "runs" / "fold1_seed0")
    (exp_dir / "runs" / "fold1_seed0").write_text("not a directory")
    capsys.readouterr()
    assert main(["cv", "--resume", str(exp_dir), "--no-figures", "--bootstrap", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 run(s)" in errors[0] and "fold1_seed0" in errors[0]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    base, _ = cv_data(tmp_path_factory)
    path = base / "tiny.yaml"
    path.write_text(cv_config(tmp_path_factory).to_yaml())
    return path


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["cv", *map(str, args)])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def test_bad_inputs_are_one_line_and_lose_nothing(experiment, config_file, capsys, tmp_path):
    before = snapshot(experiment.exp_dir)
    name, out = experiment.exp_dir.name, experiment.exp_dir.parent
    common = ("--config", config_file, "--output-dir", out, "--name", name, "--no-figures", "--bootstrap", "0")

    code, errors = run_cli(capsys, *common, "--folds", 4, "--overwrite")
    assert code == 2 and len(errors) == 1 and "would hold no patient with murmur=1 (the data has 3)" in errors[0]

    code, errors = run_cli(capsys, *common, "--folds", 3)
    assert code == 2 and len(errors) == 1 and "experiment directory already exists" in errors[0]

    code, errors = run_cli(capsys, "--resume", experiment.exp_dir, "--only", "7:0")
    assert code == 2 and errors == [f"error: --only 7:0: fold 7 does not exist (folds 0..{FOLDS - 1})"]
    code, errors = run_cli(capsys, "--resume", experiment.exp_dir, "--only", "0:9")
    assert code == 2 and len(errors) == 1 and "seed 9 is not one of the experiment's seeds" in errors[0]

    folds = read_split_file(experiment.exp_dir / "splits.json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([folds[0] + ["424242"], folds[1], folds[2]]))
    code, errors = run_cli(capsys, *common, "--splits", unknown, "--overwrite")
    assert code == 2 and len(errors) == 1 and "unknown.json: 1 patient id(s) not in the data, e.g. 424242" in errors[0]
    overlap = tmp_path / "overlap.json"
    overlap.write_text(json.dumps([folds[0] + folds[1][:1], folds[1], folds[2]]))
    code, errors = run_cli(capsys, *common, "--splits", overlap, "--overwrite")
    assert code == 2 and len(errors) == 1 and f"patient {folds[1][0]} is in folds 0 and 1" in errors[0]

    empty = tmp_path / "nothing_finished"
    empty.mkdir()
    for name in ("experiment.yaml", "splits.json"):
        shutil.copy(experiment.exp_dir / name, empty / name)
    code, errors = run_cli(capsys, "--collect", empty)
    assert code == 2 and len(errors) == 1 and "no member run has finished yet" in errors[0]
    assert sorted(p.name for p in empty.iterdir()) == ["experiment.yaml", "splits.json"]

    assert snapshot(experiment.exp_dir) == before


def test_a_published_split_file_reproduces_its_folds(experiment, config_file, capsys, tmp_path):
    folds = read_split_file(experiment.exp_dir / "splits.json")
    published = tmp_path / "published.csv"
    published.write_text("patient_id,fold\n" + "".join(f"{p},{k + 1}\n" for k, f in enumerate(folds) for p in f))
    code, errors = run_cli(capsys, "--config", config_file, "--output-dir", tmp_path, "--name", "given", "--splits",
                           published, "--only", "2:0")
    assert code == 0 and errors == []
    exp = Experiment.load(tmp_path / "given")
    assert exp.split_seed is None and exp.splits_given == str(published.resolve())
    assert read_split_file(tmp_path / "given" / "splits.json") == folds
    assert exp.member_config(Member(seed=0, fold=2)).split_file == str((tmp_path / "given" / "splits.json").resolve())
    assert (tmp_path / "given" / "runs" / "fold2_seed0" / "oof" / "patients.csv").read_text() == \
        (experiment.exp_dir / "runs" / "fold2_seed0" / "oof" / "patients.csv").read_text()
