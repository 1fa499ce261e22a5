"""Auxiliary heads: CirCor's murmur descriptors and heart-cycle states as targets, the masked loss, the wrapper, a
whole train -> evaluate -> predict cycle, the signal carrying what the heads learn, and the bad inputs."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from conftest import tiny_config
from test_bad_inputs import SMALL, fresh_log_stream  # noqa: F401  (autouse: stderr handlers per test)
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import ConfigError, DataError
from ignite_trainer.core.vocabulary import MURMUR_ATTRIBUTES
from ignite_trainer.data.annotations import (MISSING, attribute_class, attribute_targets, check_head_labels,
                                             frame_states, read_states)
from ignite_trainer.data.circor import read_circor
from ignite_trainer.data.datasets import EvalWindows, TrainWindows
from ignite_trainer.data.features import FeatureCache, FeatureSettings, compute_features
from ignite_trainer.data.head_targets import ATTRIBUTES, STATES, HeadTargets
from ignite_trainer.data.synthetic import CIRCOR_RATE, patient_fields, sample_patient, synthesize_recording, \
    write_synthetic
from ignite_trainer.model.heads import AuxiliaryHeads
from ignite_trainer.model.registry import build_model
from ignite_trainer.training.head_loss import HeadLoss, step_states
from ignite_trainer.training.run import train
from ignite_trainer.use.evaluation import evaluate




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("heads") / "data", 24, 3)


@pytest.fixture(scope="module")
def recordings(data):
    return read_circor(data)


# ---------------------------------------------------------------------------------------------- targets
def test_a_descriptor_is_a_target_only_where_the_murmur_is(recordings):
    for rec in recordings:
        known = attribute_class(rec, "systolic_timing") != MISSING
        has_value = "systolic_timing" in dict(rec.murmur_attributes)
        assert known == (rec.murmur_class == "Present" and rec.labels[1] == 1.0 and has_value)
    present = [r for r in recordings if attribute_class(r, "systolic_timing") != MISSING]
    assert present, "the fixture set must hold a described systolic murmur"
    rec = present[0]
    value = dict(rec.murmur_attributes)["systolic_timing"]
    assert MURMUR_ATTRIBUTES["systolic_timing"][1][attribute_class(rec, "systolic_timing")] == value
    # the same patient at a location without the murmur, and an Unknown patient, are missing
    assert attribute_class(replace(rec, labels=(rec.labels[0], 0.0)), "systolic_timing") == MISSING
    assert attribute_class(replace(rec, murmur_class="Unknown", mask=(True, False)), "systolic_timing") == MISSING
    table = attribute_targets(recordings, ("systolic_timing", "diastolic_grading"))
    assert table.shape == (len(recordings), 2) and table.dtype == np.int64


def test_a_descriptor_value_outside_its_classes_names_the_file_and_field(recordings):
    rec = next(r for r in recordings if attribute_class(r, "systolic_timing") != MISSING)
    bad = replace(rec, murmur_attributes=(("systolic_timing", "Sometimes"),))
    with pytest.raises(DataError, match=r"\.txt: #Systolic murmur timing: 'Sometimes' is not one of"):
        attribute_class(bad, "systolic_timing")
    # case and spaces do not matter
    assert attribute_class(replace(rec, murmur_attributes=(("systolic_timing", " holosystolic "),)),
                           "systolic_timing") == 3


def test_states_are_taken_at_each_frame_centre_and_unannotated_frames_are_missing(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("0.0\t0.10\t0\n0.10\t0.25\t1\n0.25\t0.50\t2\n0.50\t0.60\t3\n0.60\t1.0\t4\n")
    states = frame_states(read_states(tsv), n_frames=12, frames_per_second=10.0)
    # frame t covers [t, t+1) / 10 s; its centre (t + 0.5) / 10 decides
    assert states.tolist() == [MISSING, 0, 1, 1, 1, 2, 3, 3, 3, 3, MISSING, MISSING]


@pytest.mark.parametrize("line", ["0.1\t0.2", "0.1\t0.2\t7", "0.3\t0.2\t1", "a\tb\t1", "0.1\t0.2\t1.5"])
def test_a_malformed_tsv_line_is_refused_with_its_line_number(tmp_path, line):
    tsv = tmp_path / "b.tsv"
    tsv.write_text("0\t0.1\t1\n" + line + "\n")
    with pytest.raises(DataError, match=r"b\.tsv: line 2:"):
        read_states(tsv)


def test_head_targets_follow_the_training_crop_and_the_evaluation_window(data, recordings, tmp_path):
    settings = FeatureSettings(n_mels=8, sample_rate=1000, hop_ms=20.0, n_fft=64)
    cache = FeatureCache(tmp_path / "features", settings)
    usable = cache.prepare(recordings, policy=None, workers=1)
    fps = settings.frames_per_second
    train = TrainWindows(usable, cache, 4.0, seed=5)
    targets = HeadTargets(train, ("systolic_timing", "segmentation"))
    index = torch.arange(len(usable))
    for epoch in (0, 3):
        found = targets.lookup(index, epoch)
        assert found[ATTRIBUTES][:, 0].tolist() == [attribute_class(r, "systolic_timing") for r in usable]
        for i in (0, 5, len(usable) - 1):
            start = train.crop_start(epoch, i)
            full = frame_states(read_states(usable[i].segmentation_path), train.n_frames[i], fps)
            want = full[start:start + train.window_frames]
            assert found[STATES][i, :len(want)].tolist() == want.tolist()
    windows = EvalWindows(usable, cache, 4.0)
    found = HeadTargets(windows, ("segmentation",)).lookup(torch.tensor([0, len(windows) - 1]))
    for row, w in enumerate((0, len(windows) - 1)):
        rec, start = windows.window_recording[w], windows.window_start[w]
        full = frame_states(read_states(usable[rec].segmentation_path), windows.n_frames[rec], fps)
        assert found[STATES][row].tolist() == full[start:start + windows.window_frames].tolist()


# ---------------------------------------------------------------------------------------------- loss and model
def test_missing_targets_neither_pull_the_loss_nor_get_gradient():
    loss_fn = HeadLoss(("systolic_grading", "segmentation"), attribute_weight=1.0, segmentation_weight=1.0)
    grading = torch.randn(4, 3, requires_grad=True)
    seg = torch.randn(4, 4, 10, requires_grad=True)
    targets = {ATTRIBUTES: torch.tensor([[0], [MISSING], [2], [MISSING]]),
               STATES: torch.full((4, 40), MISSING, dtype=torch.int64)}
    targets[STATES][0, :20] = 1
    loss = loss_fn({"systolic_grading": grading, "segmentation": seg}, targets)
    loss.backward()
    assert grading.grad[[1, 3]].abs().sum() == 0 and grading.grad[[0, 2]].abs().sum() > 0
    assert seg.grad[1:].abs().sum() == 0 and seg.grad[0, :, :5].abs().sum() > 0 and seg.grad[0, :, 5:].abs().sum() == 0
    # nothing present at all: a zero that still backpropagates
    none = {ATTRIBUTES: torch.full((4, 1), MISSING), STATES: torch.full((4, 40), MISSING)}
    zero = loss_fn({"systolic_grading": grading, "segmentation": seg}, none)
    assert zero.item() == 0.0 and zero.requires_grad


def test_step_states_takes_the_frame_at_each_steps_centre():
    states = torch.arange(12).reshape(1, 12)
    assert step_states(states, 3).tolist() == [[2, 6, 10]]
    assert step_states(states, 12).tolist() == [list(range(12))]


@pytest.mark.parametrize("name", ["attention_cnn", "mean_pool_cnn", "resnet_attention"])
def test_the_heads_leave_the_two_logits_exactly_the_wrapped_models(name):
    torch.manual_seed(0)
    plain = build_model(name, n_mels=16).eval()
    wrapped = AuxiliaryHeads(build_model(name, n_mels=16), ("systolic_pitch", "segmentation")).eval()
    missing, unexpected = wrapped.base.load_state_dict(plain.state_dict())
    assert not missing and not unexpected
    x = torch.randn(2, 16, 200)
    logits, attention = wrapped(x)
    assert torch.equal(logits, plain(x)[0]) and torch.equal(attention, plain(x)[1])
    logits2, _, outputs = wrapped(x, auxiliary=True)
    assert torch.equal(logits2, logits)
    assert outputs["systolic_pitch"].shape == (2, 3)
    assert outputs["segmentation"].shape == (2, 4, attention.shape[1])


def test_a_model_without_heads_keeps_its_state_dict_keys():
    keys = set(build_model("attention_cnn", n_mels=16).state_dict())
    assert not any(k.startswith(("base.", "aux.")) for k in keys)
    wrapped = set(build_model("attention_cnn", n_mels=16, heads=("segmentation",)).state_dict())
    assert {k for k in wrapped if k.startswith("base.")} == {"base." + k for k in keys}


# ---------------------------------------------------------------------------------------------- the signal carries them
def test_the_hard_synthetic_signal_carries_every_systolic_descriptor_and_the_heart_cycle():
    """A plain classifier on the log-mel of the murmur's own recording beats chance on each systolic descriptor,
    and one on each frame's spectrum (with its neighbours) on the heart-cycle state: the labels are in the sound."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import cross_val_predict

    settings = FeatureSettings(n_mels=32)
    rows, labels, frames, frame_labels = [], {h: [] for h in MURMUR_ATTRIBUTES if h.startswith("systolic")}, [], []
    index = 0
    while len(rows) < 120:
        patient = sample_patient(7, index, "hard")
        index += 1
        fields = patient_fields(patient)
        if patient.murmur != "Present" or fields["Systolic murmur timing"] == "nan":
            continue
        number = next(k for k, r in enumerate(patient.recordings) if r.location == patient.most_audible)
        samples, segments = synthesize_recording(patient, number, 7)
        features = compute_features(samples.astype(np.float32) / 32768, CIRCOR_RATE, settings)
        states = frame_states(segments, features.shape[1], settings.frames_per_second)
        systole, diastole = features[:, states == 1], features[:, states == 3]
        rows.append(np.concatenate([systole.mean(1), diastole.mean(1), systole.std(1), systole.mean(1) - diastole.mean(1)]))
        for head in labels:
            labels[head].append(fields[MURMUR_ATTRIBUTES[head][0]])
        if len(rows) <= 8:  # every 4th frame of the first recordings, each with two neighbours either side
            stacked = np.concatenate([np.roll(features, k, axis=1) for k in (-2, -1, 0, 1, 2)])
            known = (states != MISSING) & (np.arange(len(states)) % 4 == 0)
            frames.append(stacked[:, known].T)
            frame_labels.append(states[known])
    x = np.array(rows)
    for head, y in labels.items():
        y = np.array(y)
        predicted = cross_val_predict(LogisticRegression(max_iter=2000, C=0.5), x, y, cv=5)
        chance = 1 / len(set(y))
        assert balanced_accuracy_score(y, predicted) > chance + 0.15, head
    fx, fy = np.concatenate(frames), np.concatenate(frame_labels)
    predicted = cross_val_predict(LogisticRegression(max_iter=300, C=0.1), fx, fy, cv=3)
    assert balanced_accuracy_score(fy, predicted) > 0.25 + 0.2


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def head_run(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("head_run")
    config = tiny_config(data, base, heads=["systolic_timing", "systolic_quality", "segmentation"])
    return Path(train(config)["run_dir"])


def test_a_head_run_is_evaluated_with_descriptor_and_heart_cycle_scores(head_run, data):
    result = evaluate(head_run)
    heads = result["heads"]
    assert set(heads["attributes"]) == {"systolic_timing", "systolic_quality"}
    timing = heads["attributes"]["systolic_timing"]["patient"]
    assert len(timing["confusion"]) == 4 and sum(map(sum, timing["confusion"])) == timing["support"]
    seg = heads["segmentation"]
    assert seg["frames"] > 0 and 0.0 <= seg["frame_accuracy"] <= 1.0 and set(seg["f1"]) == {"S1", "systole", "S2", "diastole"}
    report = Path(result["files"]["report"]).read_text()
    assert "## Murmur descriptors" in report and "## Heart-cycle segmentation" in report
    assert any(p.endswith("heart_cycle.png") for p in result["files"]["figures"])
    saved = json.loads(Path(result["files"]["metrics"]).read_text())
    assert saved["heads"]["segmentation"]["confusion"] == seg["confusion"]


def test_predict_writes_the_descriptors_per_patient(head_run, data, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", str(head_run), str(data), "--output", str(out)]) == 0
    with open(tmp_path / "pred.attributes.csv") as f:
        rows = list(csv.DictReader(f))
    patients = {r["patient_id"] for r in rows}
    assert len(patients) == len({r.patient_id for r in read_circor(data)})
    for row in rows:
        classes = MURMUR_ATTRIBUTES[row["descriptor"]][1]
        probs = dict(part.split("=") for part in row["probabilities"].split(";"))
        assert list(probs) == list(classes) and row["prediction"] in classes
        assert abs(sum(map(float, probs.values())) - 1) < 1e-3


def test_a_model_without_heads_evaluates_as_before(trained_run):
    result = evaluate(trained_run.run_dir, out_dir=trained_run.base / "plain_report")
    assert "heads" not in result


# ---------------------------------------------------------------------------------------------- bad input
def expect_error(capsys, args, *needles, root: Path):
    before = sorted(str(p) for p in root.rglob("*"))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert sorted(str(p) for p in root.rglob("*")) == before, "something was written"


def _train_args(tmp_path, data, *extra):
    args = ["train", "--data", str(data), "--epochs", "1", "--device", "cpu", "--output-dir", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    for s in SMALL:
        args += ["--set", s]
    return args + list(extra)


def test_a_head_whose_labels_the_data_lacks_is_one_error(tmp_path, capsys):
    physionet = write_synthetic(tmp_path / "p2016", 12, 4, fmt="physionet2016")
    (tmp_path / "cache").mkdir()
    expect_error(capsys, _train_args(tmp_path, physionet, "--format", "physionet2016", "--heads", "systolic_grading"),
                 "heads: systolic_grading", "Systolic murmur grading", "physionet2016", root=tmp_path)
    expect_error(capsys, _train_args(tmp_path, physionet, "--format", "physionet2016", "--heads", "segmentation"),
                 "heads: segmentation", ".tsv", root=tmp_path)


def test_bad_head_settings_are_one_error_each(data, tmp_path, capsys):
    (tmp_path / "cache").mkdir()
    expect_error(capsys, _train_args(tmp_path, data, "--heads", "murmur_colour"), "'murmur_colour'", root=tmp_path)
    expect_error(capsys, _train_args(tmp_path, data, "--heads", "segmentation", "--set", "augment_shift_prob=0.5"),
                 "augment_shift_prob", root=tmp_path)
    expect_error(capsys, _train_args(tmp_path, data, "--heads", "systolic_pitch", "--set", "augment_mixup_prob=0.3"),
                 "augment_mixup_prob", root=tmp_path)


def test_a_malformed_tsv_or_descriptor_in_the_data_is_one_error(data, tmp_path, capsys):
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (tmp_path / "cache").mkdir()
    tsv = sorted((copy / "training_data").glob("*.tsv"))[0]
    tsv.write_text("0\t0.5\tS1\n")
    expect_error(capsys, _train_args(tmp_path, copy, "--heads", "segmentation"), tsv.name, "line 1", root=tmp_path)
    rec = next(r for r in read_circor(copy) if attribute_class(r, "systolic_timing") != MISSING)
    text = rec.label_file.read_text()
    value = dict(rec.murmur_attributes)["systolic_timing"]
    rec.label_file.write_text(text.replace(f"#Systolic murmur timing: {value}", "#Systolic murmur timing: Often"))
    expect_error(capsys, _train_args(tmp_path, copy, "--heads", "systolic_timing"), rec.label_file.name,
                 "Systolic murmur timing", "'Often'", root=tmp_path)


def test_attributes_of_a_model_without_descriptor_heads_is_one_error(trained_run, tmp_path, capsys):
    expect_error(capsys, ["predict", str(trained_run.run_dir), str(trained_run.data), "--attributes",
                          str(tmp_path / "a.csv")], "--attributes", "without murmur-descriptor heads", root=tmp_path)


def test_check_head_labels_names_the_config_source(recordings):
    no_tsv = [replace(r, segmentation_path=None) for r in recordings]
    with pytest.raises(ConfigError, match="my.yaml: heads: segmentation"):
        check_head_labels(no_tsv, ("segmentation",), "circor2022", source="my.yaml")
    assert TrainConfig(heads=["attributes"]).head_names == tuple(MURMUR_ATTRIBUTES)


def test_the_descriptor_groups_expand_and_a_set_without_diastolic_murmurs_is_pointed_to_systolic(recordings):
    systolic = tuple(h for h in MURMUR_ATTRIBUTES if h.startswith("systolic_"))
    assert TrainConfig(heads=["systolic", "segmentation"]).head_names == (*systolic, "segmentation")
    assert TrainConfig(heads=["diastolic", "systolic"]).head_names == tuple(MURMUR_ATTRIBUTES)
    no_diastolic = [replace(r, murmur_attributes=tuple((k, v) for k, v in r.murmur_attributes
                                                       if not k.startswith("diastolic_"))) for r in recordings]
    check_head_labels(no_diastolic, TrainConfig(heads=["systolic"]).head_names, "circor2022")
    with pytest.raises(ConfigError, match="heads: diastolic_timing .*'systolic' names the five systolic"):
        check_head_labels(no_diastolic, TrainConfig(heads=["attributes"]).head_names, "circor2022")
