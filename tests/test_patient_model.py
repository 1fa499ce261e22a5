"""The patient model (``patient_model: true``): gated-attention multiple-instance learning over a patient's
recordings. The attention ignores padding; bags are cut as the window datasets cut windows; a run trains,
validates on patients, is the same with 0 or 2 workers and resumes exactly; evaluate, predict, the
Predictor and ensembles answer per patient; bad combinations are one ``error:`` line, exit 2."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONSTANT_MODEL, tiny_config
from test_bad_inputs import fresh_log_stream  # noqa: F401  (autouse: stderr handlers per test)
from ignite.engine import Events
from test_predictor import _patients as challenge_patients

import cli
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.data.bags import EvalBags, TrainBags, collate_bags, patient_groups
from ignite_trainer.data.datasets import EvalWindows, TrainWindows
from ignite_trainer.data.prepare import prepare_data
from ignite_trainer.data.splits import patient_labels
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.model.registry import build_model
from ignite_trainer.runs.checkpoint import find_best_checkpoint, load_checkpoint
from ignite_trainer.scoring.predictions import tune_thresholds
from ignite_trainer.training.run import train
from ignite_trainer.use.evaluation import evaluate
from ignite_trainer.use.inference import predict
from ignite_trainer.use.predictor import Predictor
from ignite_trainer.use.writers import write_predictions_csv

TIMING = {"seconds", "val_seconds"}



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("patients") / "data", 12, 4)


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path, epoch: int = 2) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / f"last_checkpoint_{epoch}.pt")["model_state_dict"]


# ---------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_padding_never_changes_the_output(mode):
    torch.manual_seed(0)
    model = build_model("attention_cnn", n_mels=8, patient=True)
    model.train(mode == "train")
    bag = torch.randn(3, 8, 40)
    other = torch.randn(2, 8, 40)
    outputs = []
    for slots, fill in ((3, 0.0), (5, 7.0), (6, float("nan"))):
        x = torch.full((2, slots, 8, 40), fill)
        x[0, :3], x[1, :2] = bag, other
        mask = torch.zeros(2, slots, dtype=torch.bool)
        mask[0, :3], mask[1, :2] = True, True
        torch.manual_seed(1)  # the same dropout draws for the same real instances
        logits, weights = model(x, instance_mask=mask)
        assert torch.isfinite(logits).all()
        assert torch.equal(weights[~mask], torch.zeros(int((~mask).sum())))
        assert torch.allclose(weights.sum(dim=1), torch.ones(2))
        outputs.append((logits.detach(), weights[:, :3].detach()))
    for logits, weights in outputs[1:]:
        assert torch.allclose(logits, outputs[0][0], atol=1e-6) and torch.allclose(weights, outputs[0][1], atol=1e-6)
    # control: changing a real instance does change the answer
    x = torch.zeros(2, 3, 8, 40)
    x[0], x[1, :2] = bag + 1.0, other
    mask = torch.tensor([[True] * 3, [True, True, False]])
    torch.manual_seed(1)
    assert not torch.allclose(model(x, instance_mask=mask)[0], outputs[0][0])


def test_a_model_without_embed_is_refused():
    with pytest.raises(ConfigError, match="patient_model needs a model with embed"):
        build_model(CONSTANT_MODEL, n_mels=8, patient=True)


def test_patient_model_with_demographics_or_augmentation_is_refused():
    with pytest.raises(ConfigError, match="demographics"):
        TrainConfig(patient_model=True, demographics=True).validate()
    with pytest.raises(ConfigError, match="augmentation"):
        TrainConfig().updated({"patient_model": True, "augment_gain_prob": 0.5})


# ---------------------------------------------------------------------------------------------- the bags
def test_bags_are_the_window_datasets_crops_and_windows_with_the_patients_labels(data, tmp_path):
    config = tiny_config(data, tmp_path, patient_model=True)
    prepared = prepare_data(config)
    cache = prepared.feature_cache()
    train_windows = TrainWindows(prepared.train, cache, config.window_seconds, seed=5)
    bags = TrainBags(prepared.train, cache, config.window_seconds, seed=5)
    groups = patient_groups(prepared.train)
    assert len(bags) == len(groups) < len(prepared.train)
    for patient in range(len(bags)):
        x, y, mask, index = bags[(2, patient)]
        assert int(index) == patient and x.shape[0] == len(groups[patient])
        for k, r in enumerate(groups[patient]):
            assert torch.equal(x[k], train_windows[(2, r)][0])  # crop_start(seed, epoch, recording index)
        labels, present, _ = patient_labels([prepared.train[r] for r in groups[patient]])
        assert mask.tolist() == [float(m) for m in present]
        assert [v for v, m in zip(y.tolist(), present) if m] == [v for v, m in zip(labels, present) if m]
    assert not torch.equal(bags[(2, 0)][0], bags[(3, 0)][0])  # a fresh crop each epoch

    windows = EvalWindows(prepared.val, cache, config.window_seconds)
    eval_bags = EvalBags(windows)
    assert sum(len(i) for i in eval_bags.instances) == len(windows)
    x, *_ = eval_bags[1]
    assert torch.equal(x, torch.stack([windows[i][0] for i in eval_bags.instances[1]]))
    x, y, mask, index, extra = collate_bags([eval_bags[0], eval_bags[1]])
    sizes = [len(eval_bags.instances[0]), len(eval_bags.instances[1])]
    assert x.shape[:2] == (2, max(sizes)) and extra["instance_mask"].sum(dim=1).tolist() == sizes


# ---------------------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    a = Path(train(tiny_config(data, base, name="w0", seed=3, patient_model=True))["run_dir"])
    b = Path(train(tiny_config(data, base, name="w2", seed=3, num_workers=2, patient_model=True))["run_dir"])
    return base, a, b


def _stop_after_epoch_1(trainer, evaluator):
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())


def test_a_run_trains_validates_on_patients_and_is_the_same_with_workers_and_after_a_resume(data, runs):
    base, a, b = runs
    rows_a = _rows(a)
    assert [r["epoch"] for r in rows_a] == [1, 2] and all(np.isfinite(r["val_loss"]) for r in rows_a)
    assert rows_a == _rows(b)
    weights_a = _weights(a)
    assert any(k.startswith("bag_attention.") for k in weights_a) and any(k.startswith("base.") for k in weights_a)
    assert all(torch.equal(weights_a[k], v) for k, v in _weights(b).items())

    cut = Path(train(tiny_config(data, base, name="cut", seed=3, patient_model=True),
                     setup=_stop_after_epoch_1)["run_dir"])
    assert not (cut / "checkpoints" / "last_checkpoint_2.pt").exists()
    train(TrainConfig(), resume=cut)
    assert _rows(cut) == rows_a
    assert all(torch.equal(weights_a[k], v) for k, v in _weights(cut).items())

    # validation scored patients: the stored thresholds are those tuned on the validation patients' probabilities
    best = load_checkpoint(find_best_checkpoint(a))
    patients = _patients_of(evaluate(a, figures=False))
    tuned = tune_thresholds(patients["probs"], patients["targets"], patients["mask"], "f1")
    assert tuned == pytest.approx(best["thresholds"], abs=1e-5)
    assert best["decision"] is not None


def _patients_of(result: dict) -> dict:
    with open(result["files"]["patients"], newline="") as f:
        rows = list(csv.DictReader(f))
    labels = ("heart", "murmur")
    return {"ids": [r["patient_id"] for r in rows],
            "probs": np.array([[float(r[f"{label}_prob"]) for label in labels] for r in rows]),
            "targets": np.array([[float(r[f"{label}_true"] or 0) for label in labels] for r in rows]),
            "mask": np.array([[r[f"{label}_true"] != "" for label in labels] for r in rows])}


def test_evaluate_predict_predictor_and_ensembles_answer_per_patient(data, runs, tmp_path):
    _, run, _ = runs
    result = evaluate(run, figures=False)
    assert result["patient_model"] is True
    assert result["counts"]["patient"] == 4 and result["counts"]["window"] > result["counts"]["recording"]
    assert result["challenge"]["murmur_weighted_accuracy"] is not None and result["challenge"]["outcome_cost"] is not None
    evaluated = _patients_of(result)

    predicted = predict(run, [str(data)])
    out = tmp_path / "predictions.csv"
    write_predictions_csv(predicted, out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    recordings = [r for r in rows if r["level"] == "recording"]
    patients = {r["id"]: r for r in rows if r["level"] == "patient"}
    assert len(patients) == 12 and all(r["attention"] == "" for r in patients.values())
    share: dict[str, float] = {}
    for r in recordings:  # every recording carries its patient's probability and a share of its attention
        assert r["murmur_prob"] == patients[r["patient_id"]]["murmur_prob"]
        share[r["patient_id"]] = share.get(r["patient_id"], 0.0) + float(r["attention"])
    assert share == pytest.approx({p: 1.0 for p in patients})
    for i, pid in enumerate(evaluated["ids"]):  # the same patient probabilities as evaluate's
        assert float(patients[pid]["murmur_prob"]) == pytest.approx(evaluated["probs"][i, 1], abs=1e-6)

    predictor = Predictor.load(run)  # the Challenge entry point: one patient's arrays in memory
    labels, probs = predicted.challenge_outputs()
    by_id = {pid: i for i, pid in enumerate(predicted.patients.ids)}
    for pid, text, recordings in challenge_patients(data):
        answer = predictor.predict_patient(recordings, text)
        i = by_id[pid]
        assert answer.per_label_probs["murmur"] == pytest.approx(predicted.patients.probs[i, 1], abs=1e-6)
        np.testing.assert_allclose(answer.probabilities, probs[i], rtol=0, atol=1e-6)
        assert answer.labels == tuple(labels[i].tolist())

    ensemble = evaluate([run, run], data=str(data), out_dir=tmp_path / "ens", figures=False)
    assert ensemble["counts"]["patient"] == 12
    single = evaluate(run, data=str(data), out_dir=tmp_path / "one", figures=False)
    assert _patients_of(ensemble)["probs"] == pytest.approx(_patients_of(single)["probs"], abs=1e-9)


# ---------------------------------------------------------------------------------------------- bad inputs
def _train_args(tmp_path, data, *extra, name="r"):
    args = ["train", "--data", str(data), "--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu",
            "--output-dir", str(tmp_path / "runs"), "--name", name, "--patience", "0",
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    for item in ["n_mels=8", "sample_rate=1000", "hop_ms=20.0", "n_fft=64", "window_seconds=4.0", "val_fraction=0.34"]:
        args += ["--set", item]
    return args + list(extra)


def _expect_error(capsys, args, *needles, root: Path):
    before = sorted(str(p) for p in root.rglob("*")) if root.exists() else []
    code = cli.main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert sorted(str(p) for p in root.rglob("*")) == before, "something was written"


@pytest.mark.parametrize("extra, needles", [
    (["--model", CONSTANT_MODEL], ["patient_model needs a model with embed", CONSTANT_MODEL]),
    (["--demographics"], ["patient_model cannot be combined with demographics"]),
    (["--set", "augment_gain_prob=0.5"], ["patient_model cannot be combined with augmentation"]),
    (["--batch-size", "12"], ["batch_size=12", "8 patients"]),
])
def test_bad_combinations_are_one_error_line_and_write_nothing(data, tmp_path, capsys, extra, needles):
    root = tmp_path / "runs"
    _expect_error(capsys, _train_args(tmp_path, data, "--patient-model", *extra), *needles, root=root)


def test_resuming_with_another_patient_model_setting_is_refused(data, tmp_path, capsys):
    assert cli.main(_train_args(tmp_path, data, name="plain")) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "plain"
    _expect_error(capsys, ["train", "--resume", str(run), "--patient-model"], "patient_model", root=run)
