"""Sweeps whose trials are cross-validation experiments: each trial an experiment directory scored by a pooled
out-of-fold score, pruning steps that are folds, and a bad objective or fold count refused before any trial."""

import json

import optuna
import pytest
import yaml

from cli import main
from cv_experiment import cv_config
from ignite_trainer.experiments.layout import Experiment
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.experiments.storage import open_storage, storage_url
from ignite_trainer.experiments.sweeps import sweep
from ignite_trainer.experiments.trials import member_score
from ignite_trainer.experiments.space import SWEEP_OWNED_FIELDS, parse_space

LR = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}


def space(tmp_path_factory, metric="oof.murmur_weighted_accuracy", experiment=None, pruner=None) -> dict:
    base = {k: v for k, v in cv_config(tmp_path_factory).to_dict().items() if k not in SWEEP_OWNED_FIELDS}
    return {"params": {"learning_rate": LR}, "objective": {"metric": metric},
            "sampler": {"name": "tpe", "seed": 0}, "pruner": pruner or {"name": "median", "n_startup_trials": 5},
            "base": base, "experiment": experiment or {"kind": "cv", "folds": 2, "seeds": [0]}}


def test_each_trial_is_an_experiment_scored_out_of_fold_with_fold_steps(tmp_path_factory, tmp_path):
    summary = sweep(parse_space(space(tmp_path_factory)), tmp_path / "sw", 2)
    assert summary["states"]["complete"] == 2
    study = optuna.load_study(study_name="sw", storage=open_storage(storage_url(None, tmp_path / "sw")))
    for trial in study.trials:
        exp_dir = tmp_path / "sw" / "trials" / f"trial_{trial.number:04d}"
        assert trial.user_attrs["run_dir"] == str(exp_dir)
        pooled = json.loads((exp_dir / "report" / "summary.json").read_text())["pooled"]
        assert trial.value == pooled["murmur_weighted_accuracy"] and (exp_dir / "decision.json").is_file()
        # pruning steps are runs finished: the mean of the finished runs' own fold scores
        exp = Experiment.load(exp_dir)
        scores = [member_score(exp_dir, m, "oof.murmur_weighted_accuracy", "maximize") for m in exp.members()]
        assert trial.intermediate_values == pytest.approx({1: scores[0], 2: (scores[0] + scores[1]) / 2})
        assert trial.user_attrs["epochs"] == 2  # 2 folds x 1 seed x 1 epoch


def test_a_bad_objective_or_fold_count_is_one_line_before_any_trial(tmp_path_factory, tmp_path, capsys):
    with pytest.raises(ConfigError, match="cross-validated score; it needs experiment"):
        parse_space(space(tmp_path_factory, experiment="run"))
    with pytest.raises(ConfigError, match="outcome_cost.*lower"):
        parse_space({**space(tmp_path_factory, metric="oof.outcome_cost"),
                     "objective": {"metric": "oof.outcome_cost", "direction": "maximize"}})
    with pytest.raises(ConfigError, match="seeds"):
        parse_space(space(tmp_path_factory, experiment={"kind": "cv", "folds": 2, "seeds": []}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(space(tmp_path_factory, experiment={"kind": "cv", "folds": 9, "seeds": [0]})))
    assert main(["sweep", str(bad), "--trials", "1", "--dir", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: experiment.folds: n_folds=9")
    assert not (tmp_path / "sw").exists()
