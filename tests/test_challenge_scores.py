"""The official 2022 scores: hand-worked cases for every metric, ties, empty classes, the scores file layout,
and output files written and read back."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, recall_score, roc_auc_score

from ignite_trainer.scoring.challenge import (
    CHALLENGE_OUTPUT_CLASSES,
    MURMUR_CLASSES,
    OUTCOME_CLASSES,
    challenge_cost,
    challenge_scores,
    class_auc,
    format_challenge_output,
    format_scores_csv,
    read_challenge_output,
    read_challenge_outputs,
    scores_from_outputs,
    write_scores_csv,
)
from ignite_trainer.core.errors import DataError


def one_hot(names, classes):
    return np.array([[float(n == c) for c in classes] for n in names])


# Five patients, worked by hand below.
MURMUR_TRUTH = ["Present", "Present", "Unknown", "Absent", "Absent"]
OUTCOME_TRUTH = ["Abnormal", "Abnormal", "Normal", "Normal", "Abnormal"]
MURMUR_CALLS = ["Present", "Absent", "Unknown", "Absent", "Present"]
OUTCOME_CALLS = ["Abnormal", "Normal", "Normal", "Normal", "Abnormal"]
MURMUR_PROBS = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2], [0.1, 0.1, 0.8], [0.6, 0.1, 0.3]])
OUTCOME_PROBS = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])


def worked_scores():
    return challenge_scores(MURMUR_TRUTH, OUTCOME_TRUTH, one_hot(MURMUR_CALLS, MURMUR_CLASSES), MURMUR_PROBS,
                            one_hot(OUTCOME_CALLS, OUTCOME_CLASSES), OUTCOME_PROBS)


def test_murmur_counts_by_hand():
    m = worked_scores().murmur
    # Correct: patient 1 (Present), 3 (Unknown), 4 (Absent).
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.accuracy_classes == pytest.approx((1 / 2, 1.0, 1 / 2))
    assert m.weighted_accuracy == pytest.approx((5 * 1 + 3 * 1 + 1 * 1) / (5 * 2 + 3 * 1 + 1 * 2))
    # Present: TP 1, FP 1 (patient 5), FN 1 (patient 2); Unknown: TP 1; Absent: TP 1, FP 1, FN 1.
    assert m.f_measure_classes == pytest.approx((0.5, 1.0, 0.5))
    assert m.f_measure == pytest.approx(2 / 3)


def test_murmur_cost_scores_murmur_calls_against_the_outcome_truth():
    # Referred (Present or Unknown): patients 1, 3, 5; Abnormal: 1, 2, 5 -> TP 2, FP 1, FN 1, TN 1.
    expert = (25 + 397 * 0.6 - 1718 * 0.6**2 + 11296 * 0.6**4) * 5
    expected = (10 * 5 + expert + 10000 * 2 + 50000 * 1) / 5
    assert worked_scores().murmur.cost == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(15118.6816, rel=1e-12)


def test_outcome_scores_by_hand():
    o = worked_scores().outcome
    assert o.accuracy == pytest.approx(4 / 5)
    assert o.accuracy_classes == pytest.approx((2 / 3, 1.0))
    assert o.weighted_accuracy == pytest.approx((5 * 2 + 1 * 2) / (5 * 3 + 1 * 2))
    assert o.f_measure_classes == pytest.approx((0.8, 0.8))
    # Referred: 1, 5 (both Abnormal); missed: patient 2.
    expert = (25 + 397 * 0.4 - 1718 * 0.4**2 + 11296 * 0.4**4) * 5
    assert o.cost == pytest.approx((50 + expert + 20000 + 50000) / 5, rel=1e-12)
    # Abnormal column: 0.9, 0.6 and 0.4 are Abnormal, 0.3 and 0.2 are not -> perfectly ranked.
    assert o.auroc_classes == (1.0, 1.0)
    assert o.auprc_classes[0] == 1.0
    # Normal column: 0.8 and 0.7 are Normal, then 0.6 (Abnormal): precision 1 at recall 1.
    assert o.auprc_classes[1] == 1.0


def test_cost_constants():
    assert challenge_cost(0, 0, 0, 0) is None
    # Nobody referred: 10 per patient, expert base 25 per patient, every Abnormal missed.
    assert challenge_cost(0, 0, 3, 7) == pytest.approx(10 + 25 + 50000 * 3 / 10)
    # Everybody referred: r = 1.
    assert challenge_cost(3, 7, 0, 0) == pytest.approx(10 + (25 + 397 - 1718 + 11296) + 10000 * 3 / 10)


def test_auc_by_hand_with_a_tie():
    # Scores 0.9 (+), 0.8 (+ and -, tied), 0.1 (-).
    auroc, auprc = class_auc([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1])
    assert auroc == pytest.approx(0.5 * 0.5 * 2 + 0.5 * 0.5 * 1.5)
    assert auprc == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # A full tie counts half, not as a ranking in either direction.
    assert class_auc([1, 0], [0.5, 0.5]) == (0.5, 0.5)


def test_full_precision_keeps_a_near_tie_apart():
    # Two patients that %.6g would have written as the same 0.537694.
    abnormal, normal = 0.5376938, 0.5376944
    text = format_challenge_output("1", ["Abnormal"], [1], [abnormal])
    assert float(text.splitlines()[3]) == abnormal
    assert class_auc([1, 0], [abnormal, normal]) == (0.0, 0.5)
    assert class_auc([1, 0], [float(f"{abnormal:.6g}"), float(f"{normal:.6g}")]) == (0.5, 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_counts_agree_with_sklearn_where_definitions_coincide(seed):
    rng = np.random.default_rng(seed)
    n = 40
    truth = [MURMUR_CLASSES[i] for i in rng.integers(0, 3, n)]
    outcome = [OUTCOME_CLASSES[i] for i in rng.integers(0, 2, n)]
    probs = np.round(rng.random((n, 3)), 1)  # many ties
    calls = [MURMUR_CLASSES[i] for i in rng.integers(0, 3, n)]
    m = challenge_scores(truth, outcome, one_hot(calls, MURMUR_CLASSES), probs,
                         one_hot(outcome, OUTCOME_CLASSES), np.full((n, 2), 0.5)).murmur
    y = one_hot(truth, MURMUR_CLASSES).astype(int)
    for j in range(3):
        assert m.auroc_classes[j] == pytest.approx(roc_auc_score(y[:, j], probs[:, j]), abs=1e-12)
        assert m.auprc_classes[j] == pytest.approx(average_precision_score(y[:, j], probs[:, j]), abs=1e-12)
    classes = list(MURMUR_CLASSES)
    assert m.f_measure_classes == pytest.approx(tuple(f1_score(truth, calls, labels=classes, average=None)))
    assert m.accuracy_classes == pytest.approx(tuple(recall_score(truth, calls, labels=classes, average=None)))
    assert m.auroc == pytest.approx(np.mean(m.auroc_classes))


def test_rows_without_exactly_one_call_count_as_present_and_abnormal():
    s = challenge_scores(["Present", "Absent"], ["Abnormal", "Normal"], [[0, 0, 0], [0, 1, 1]], np.zeros((2, 3)),
                         [[0, 0], [1, 1]], np.zeros((2, 2)))
    assert s.murmur.accuracy_classes == (1.0, None, 0.0)
    assert s.outcome.accuracy_classes == (1.0, 0.0)


def test_class_absent_from_the_truth():
    # No Unknown patient, and Unknown is called once.
    s = challenge_scores(["Present", "Absent", "Absent"], ["Abnormal", "Normal", "Normal"],
                         one_hot(["Present", "Unknown", "Absent"], MURMUR_CLASSES),
                         [[0.8, 0.1, 0.1], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]],
                         one_hot(["Abnormal", "Normal", "Normal"], OUTCOME_CLASSES),
                         [[0.9, 0.1], [0.2, 0.8], [0.1, 0.9]])
    m = s.murmur
    assert m.auroc_classes[1] is None and m.auprc_classes[1] is None
    assert m.accuracy_classes == (1.0, None, 0.5)
    assert m.f_measure_classes == pytest.approx((1.0, 0.0, 2 / 3))  # Unknown: a false call, so F = 0, defined
    assert m.auroc == pytest.approx(1.0)  # mean of Present and Absent only
    assert m.weighted_accuracy == pytest.approx((5 + 1) / (5 + 2))
    # Never called and never true: F-measure undefined too.
    s2 = challenge_scores(["Present", "Absent"], ["Abnormal", "Normal"], one_hot(["Present", "Absent"], MURMUR_CLASSES),
                          np.eye(3)[[0, 2]], one_hot(["Abnormal", "Normal"], OUTCOME_CLASSES), np.eye(2))
    assert s2.murmur.f_measure_classes == (1.0, None, 1.0)
    assert s2.murmur.f_measure == 1.0


def test_all_unknown_truth():
    n = 4
    s = challenge_scores(["Unknown"] * n, ["Normal"] * n,
                         one_hot(["Unknown", "Unknown", "Absent", "Present"], MURMUR_CLASSES),
                         [[0.1, 0.9, 0.0], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.5, 0.2, 0.3]],
                         one_hot(["Normal"] * n, OUTCOME_CLASSES), [[0.1, 0.9]] * n)
    m = s.murmur
    assert m.auroc_classes == (None, None, None)
    assert m.auroc is None
    assert m.auprc_classes == (None, 1.0, None)  # every patient is Unknown: precision 1 everywhere
    assert m.auprc == 1.0
    assert m.weighted_accuracy == pytest.approx(2 / 4)
    assert m.accuracy_classes == (None, 0.5, None)
    assert m.f_measure_classes == pytest.approx((0.0, 2 / 3, 0.0))
    # Outcome all Normal and all called Normal: Abnormal has no patient, F undefined.
    assert s.outcome.f_measure_classes == (None, 1.0)
    assert s.outcome.cost == pytest.approx(10 + 25)
    csv_text = format_scores_csv(s)
    assert "\nAUROC,nan,nan,nan\n" in csv_text


def test_bad_truth_and_shapes_are_refused():
    with pytest.raises(DataError, match="'Maybe'"):
        challenge_scores(["Maybe"], ["Normal"], [[1, 0, 0]], [[1, 0, 0]], [[1, 0]], [[1, 0]])
    with pytest.raises(ValueError, match="shape"):
        challenge_scores(["Present"], ["Normal"], [[1, 0]], [[1, 0, 0]], [[1, 0]], [[1, 0]])
    with pytest.raises(DataError, match="no patients"):
        challenge_scores([], [], np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((0, 2)))


def test_scores_file_has_the_official_layout_at_full_precision(tmp_path):
    s = worked_scores()
    path = write_scores_csv(s, tmp_path / "report" / "challenge_scores.csv")
    lines = path.read_text().split("\n")
    assert lines[0] == "#Murmur scores"
    assert lines[1] == "AUROC,AUPRC,F-measure,Accuracy,Weighted Accuracy,Cost"
    assert [float(x) for x in lines[2].split(",")] == [s.murmur.auroc, s.murmur.auprc, s.murmur.f_measure,
                                                      s.murmur.accuracy, s.murmur.weighted_accuracy, s.murmur.cost]
    assert lines[3:6] == ["", "#Outcome scores", "AUROC,AUPRC,F-measure,Accuracy,Weighted Accuracy,Cost"]
    assert lines[7:10] == ["", "#Murmur scores (per class)", "Classes,Present,Unknown,Absent"]
    assert [line.split(",")[0] for line in lines[10:14]] == ["AUROC", "AUPRC", "F-measure", "Accuracy"]
    assert lines[14:17] == ["", "#Outcome scores (per class)", "Classes,Abnormal,Normal"]
    assert [line.split(",")[0] for line in lines[17:21]] == ["AUROC", "AUPRC", "F-measure", "Accuracy"]
    assert lines[21:] == [""]  # ends with one newline, like the official file
    assert lines[8 + 3] == "AUPRC," + ",".join(repr(v) for v in s.murmur.auprc_classes)
    assert float(lines[6].split(",")[5]) == s.outcome.cost  # round-trips exactly


def write_outputs(folder, ids, murmur_calls, murmur_probs, outcome_calls, outcome_probs):
    folder.mkdir()
    for i, pid in enumerate(ids):
        labels = ([int(murmur_calls[i] == c) for c in MURMUR_CLASSES]
                  + [int(outcome_calls[i] == c) for c in OUTCOME_CLASSES])
        probs = list(murmur_probs[i]) + list(outcome_probs[i])
        (folder / f"{pid}.csv").write_text(format_challenge_output(pid, CHALLENGE_OUTPUT_CLASSES, labels, probs))


def test_written_outputs_read_back_to_the_same_scores(tmp_path):
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(3), size=5)
    ids = [f"{50000 + i}" for i in range(5)]
    write_outputs(tmp_path / "out", ids, MURMUR_CALLS, probs, OUTCOME_CALLS, OUTCOME_PROBS)
    outputs = read_challenge_outputs(tmp_path / "out")
    assert sorted(outputs) == ids
    assert outputs[ids[2]].probabilities[:3] == tuple(probs[2])  # bit-exact
    assert outputs[ids[2]].classes == CHALLENGE_OUTPUT_CLASSES
    truth = {pid: (MURMUR_TRUTH[i], OUTCOME_TRUTH[i]) for i, pid in enumerate(ids)}
    from_files = scores_from_outputs(truth, outputs)
    direct = challenge_scores(MURMUR_TRUTH, OUTCOME_TRUTH, one_hot(MURMUR_CALLS, MURMUR_CLASSES), probs,
                              one_hot(OUTCOME_CALLS, OUTCOME_CLASSES), OUTCOME_PROBS)
    assert format_scores_csv(from_files) == format_scores_csv(direct)
    with pytest.raises(DataError, match="no output for patient"):
        scores_from_outputs({**truth, "99": ("Absent", "Normal")}, outputs)


def test_reordered_or_missing_columns_read_like_the_official_evaluator(tmp_path):
    f = tmp_path / "1.csv"
    f.write_text("#1\n normal , ABSENT,Abnormal\n1,1,0\n0.75,0.5,0.25\n")
    out = read_challenge_output(f)
    assert out.columns(OUTCOME_CLASSES) == ([0, 1], [0.25, 0.75])
    assert out.columns(MURMUR_CLASSES) == ([0, 0, 1], [0.0, 0.0, 0.5])


@pytest.mark.parametrize("text, message", [
    ("#1\nPresent\n1\n", "3 lines"),
    ("1\nPresent\n1\n0.5\n", "line 1"),
    ("#1\nPresent,Present\n1,0\n0.5,0.5\n", "line 2"),
    ("#1\nPresent,Absent\n1,2\n0.5,0.5\n", "line 3: binary output '2'"),
    ("#1\nPresent,Absent\n1,0\n0.5,abc\n", "line 4: output 'abc'"),
    ("#1\nPresent,Absent\n1,0\n0.5,nan\n", "line 4: output 'nan'"),
    ("#1\nPresent,Absent\n1,0\n0.5\n", "line 4 has 1 values for 2 classes"),
])
def test_malformed_output_files_are_refused_naming_file_and_line(tmp_path, text, message):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        read_challenge_output(f)
    assert str(f) in str(info.value)


def test_binary_spellings_the_official_reader_accepts(tmp_path):
    f = tmp_path / "1.csv"
    f.write_text("#1\nPresent,Unknown,Absent\nTrue,0.0,'0'\n1,0,0\n")
    assert read_challenge_output(f).labels == (1, 0, 0)


def test_challenge_cost_worked_examples():
    # n = 4, TP 1, FP 1, FN 1, TN 1: s/n = 0.5, c_expert = (25 + 198.5 - 429.5 + 706) * 4 = 2000,
    # cost = (10 * 4 + 2000 + 10000 + 50000) / 4
    assert challenge_cost(1, 1, 1, 1) == pytest.approx(15510.0)
    # everyone referred (TP 1, FP 1): s/n = 1, c_expert = (25 + 397 - 1718 + 11296) * 2 = 20000
    assert challenge_cost(1, 1, 0, 0) == pytest.approx(15010.0)
    # nobody referred (FN 1, TN 1): c_expert = 25 * 2, cost = (20 + 50 + 50000) / 2
    assert challenge_cost(0, 0, 1, 1) == pytest.approx(25035.0)
    assert challenge_cost(0, 0, 0, 0) is None
