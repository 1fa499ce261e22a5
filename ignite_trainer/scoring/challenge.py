"""The PhysioNet/CinC 2022 Challenge scores, defined exactly as the official evaluator defines them.

A figure called a "Challenge" score must be the number the official ``evaluate_model.py`` prints for the
same output files, so this module reproduces its definitions (not scikit-learn's, not the project's own
per-label metrics in `scores`), patient by patient:

- Classes are ``("Present", "Unknown", "Absent")`` for the murmur and ``("Abnormal", "Normal")`` for the
  outcome, in that order. A row of binary outputs that does not hold exactly one positive is read as
  Present (murmur) or Abnormal (outcome), as the official evaluator does.
- AUROC per class: trapezoids over the (sensitivity, specificity) points at every distinct output value
  (tied outputs move together), starting from "nothing positive". AUPRC per class: the sum of each recall
  step times the precision reached there. A class with no true patient has neither; a class that every
  patient holds has no AUROC but an AUPRC of 1.
- F-measure per class ``2·TP / (2·TP + FP + FN)`` (one class against the rest); accuracy; per-class
  accuracy = the share of the class's true patients called that class (its recall).
- Weighted accuracy: correct calls weighted by the *true* class, 5/3/1 (murmur) and 5/1 (outcome).
- Cost: the mean cost per patient of screening with the algorithm, referring its positive calls (Present
  or Unknown; Abnormal) to an expert, treating the true Abnormal patients it referred and missing the rest.
  The murmur cost scores the murmur calls against the *outcome* truth, as the official evaluator does.
- Macro values are the mean over the classes where the value is defined.

Where the official evaluator produces ``nan`` (undefined), this module gives None (the project's rule:
undefined is n/a, never a number), and `write_scores_csv` writes ``nan`` in that cell, exactly like the
official scores file. Values are written at full precision (the shortest text that reads back as the same
float64) instead of the official file's three decimals.

The per-patient output files (what a Challenge entry writes and the evaluator reads) are::

    #<patient id>
    Present,Unknown,Absent,Abnormal,Normal
    0,1,0,1,0
    0.25,0.5,0.25,0.75,0.25

`format_challenge_output` writes one at full precision; `read_challenge_output(s)` reads them back, so a
test can recompute the scores from the written files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from ignite_trainer.core.errors import DataError
from ignite_trainer.core.vocabulary import CHALLENGE_OUTPUT_CLASSES, CLASS_WEIGHTS, MURMUR_CLASSES, OUTCOME_CLASSES

__all__ = [
    "MURMUR_CLASSES",
    "OUTCOME_CLASSES",
    "CHALLENGE_OUTPUT_CLASSES",
    "TaskScores",
    "ChallengeScores",
    "ChallengeOutput",
    "class_auc",
    "challenge_cost",
    "score_task",
    "challenge_scores",
    "scores_from_outputs",
    "format_scores_csv",
    "write_scores_csv",
    "format_challenge_output",
    "read_challenge_output",
    "read_challenge_outputs",
]

#: Calls that send a patient to an expert, and the true class that needs treatment.
_REFERRED = {"Present", "Unknown", "Abnormal"}


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TaskScores:
    """One task's scores (murmur or outcome); None where the official evaluator gives nan.

    Per-class tuples follow ``classes``.

    Example::

        murmur = scores.murmur
        dict(zip(murmur.classes, murmur.accuracy_classes))  # recall of Present, Unknown, Absent
    """

    classes: tuple[str, ...]
    auroc: float | None
    auprc: float | None
    f_measure: float | None
    accuracy: float | None
    weighted_accuracy: float | None
    cost: float | None
    auroc_classes: tuple[float | None, ...]
    auprc_classes: tuple[float | None, ...]
    f_measure_classes: tuple[float | None, ...]
    accuracy_classes: tuple[float | None, ...]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: per-class values keyed by class name (null where undefined)."""
        d = asdict(self)
        for key in ("auroc_classes", "auprc_classes", "f_measure_classes", "accuracy_classes"):
            d[key] = dict(zip(self.classes, d[key]))
        d["classes"] = list(self.classes)
        return d


@dataclass(frozen=True)
class ChallengeScores:
    """Both tasks' scores over the same patients.

    Example::

        scores = challenge_scores(murmur_truth, outcome_truth, murmur_binary, murmur_probs,
                                  outcome_binary, outcome_probs)
        print(scores.murmur.weighted_accuracy, scores.outcome.cost)
        json.dumps(scores.as_dict())  # undefined values are null
    """

    murmur: TaskScores
    outcome: TaskScores
    n_patients: int

    def as_dict(self) -> dict[str, object]:
        return {"murmur": self.murmur.as_dict(), "outcome": self.outcome.as_dict(), "patients": self.n_patients}


# ---------------------------------------------------------------------------------------------- metrics
def _undefined(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def class_auc(truth: ArrayLike, scores: ArrayLike) -> tuple[float | None, float | None]:
    """``(AUROC, AUPRC)`` of one class against the rest, the official way (None where it gives nan).

    The curve has one point per distinct score, from the highest down, plus the starting point where
    nothing is positive; tied scores enter together. AUROC is the trapezoid area under specificity over
    sensitivity; AUPRC adds each sensitivity step times the precision at the step's end. With no true
    patient both are undefined; with no other patient AUROC is undefined and AUPRC is 1.

    Example:

        >>> class_auc([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1])
        (0.875, 0.8333333333333333)
    """
    t = np.asarray(truth, dtype=bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if t.shape != s.shape:
        raise ValueError(f"truth and scores differ in length: {t.size} vs {s.size}")
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0:
        return None, None
    distinct, inverse = np.unique(s, return_inverse=True)
    # Counts of true and other patients at each distinct score, highest score first, accumulated.
    tp = np.concatenate([[0], np.cumsum(np.bincount(inverse, weights=t, minlength=distinct.size)[::-1])])
    fp = np.concatenate([[0], np.cumsum(np.bincount(inverse, weights=~t, minlength=distinct.size)[::-1])])
    tpr = tp / n_pos
    precision = tp[1:] / (tp[1:] + fp[1:])  # every point after the start holds at least one patient
    auprc = float(np.sum(np.diff(tpr) * precision))
    if n_neg == 0:
        return None, auprc
    tnr = (n_neg - fp) / n_neg
    auroc = float(np.sum(0.5 * np.diff(tpr) * (tnr[1:] + tnr[:-1])))
    return auroc, auprc


def challenge_cost(tp: float, fp: float, fn: float, tn: float) -> float | None:
    """Mean cost per patient of algorithmic pre-screening; positives are the referrals (None with no patient).

    Counts may be expected (fractional) counts: the cost is linear in them once the referrals are fixed.

    Per patient screened 10; expert screening of the ``m = TP + FP`` referred out of ``n`` costs
    ``(25 + 397·r − 1718·r² + 11296·r⁴)·n`` with ``r = m / n``; each treated (true positive) patient
    10000; each missed (false negative) patient 50000.

    Example:

        >>> challenge_cost(tp=1, fp=0, fn=0, tn=1)  # (20 + (25 + 198.5 - 429.5 + 706)*2 + 10000) / 2
        5510.0
    """
    n = tp + fp + fn + tn
    if n == 0:
        return None
    r = (tp + fp) / n
    expert = (25.0 + 397.0 * r - 1718.0 * r**2 + 11296.0 * r**4) * n
    return (10.0 * n + expert + 10000.0 * tp + 50000.0 * fn) / n


def _one_hot_truth(truth: Sequence[str], classes: tuple[str, ...], what: str) -> np.ndarray:
    """[N, C] bool from class names (compared like the official evaluator: stripped, case-insensitive)."""
    folded = [c.casefold() for c in classes]
    out = np.zeros((len(truth), len(classes)), dtype=bool)
    for i, name in enumerate(truth):
        key = str(name).strip().casefold()
        if key not in folded:
            raise DataError(f"{what}: true class {name!r} of patient #{i} is not one of {', '.join(classes)}")
        out[i, folded.index(key)] = True
    return out


def _enforce_one_positive(binary: np.ndarray, first: int = 0) -> np.ndarray:
    """Rows without exactly one positive become the first class (Present / Abnormal), as officially."""
    out = binary.copy()
    bad = out.sum(axis=1) != 1
    out[bad] = False
    out[bad, first] = True
    return out


def _as_matrix(values: ArrayLike, n: int, k: int, name: str, dtype: type) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n, k):
        raise ValueError(f"{name} must have shape ({n}, {k}), got {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not hold NaN")
    if dtype is bool:
        if not np.isin(arr, (0.0, 1.0)).all():
            raise ValueError(f"{name} must hold only 0 and 1")
        return arr.astype(bool)
    return arr


def score_task(truth: Sequence[str], binary: ArrayLike, probabilities: ArrayLike, classes: tuple[str, ...],
               outcome_truth: Sequence[str]) -> TaskScores:
    """One task's official scores from the true classes, the binary calls [N, C] and the scalar outputs [N, C].

    ``outcome_truth`` (Abnormal/Normal per patient) is what the cost is scored against, for both tasks.

    Example::

        score_task(["Present"], [[1, 0, 0]], [[0.7, 0.2, 0.1]], MURMUR_CLASSES, ["Abnormal"]).weighted_accuracy
    """
    if classes not in CLASS_WEIGHTS:
        raise ValueError(f"classes must be {MURMUR_CLASSES} or {OUTCOME_CLASSES}, got {classes}")
    n, k = len(truth), len(classes)
    if n == 0:
        raise DataError("no patients to score")
    if len(outcome_truth) != n:
        raise ValueError(f"outcome_truth has {len(outcome_truth)} patients, truth has {n}")
    labels = _one_hot_truth(truth, classes, "truth")
    outcome_labels = _one_hot_truth(outcome_truth, OUTCOME_CLASSES, "outcome truth")
    calls = _enforce_one_positive(_as_matrix(binary, n, k, "binary", bool))
    scalars = _as_matrix(probabilities, n, k, "probabilities", float)

    aucs = [class_auc(labels[:, j], scalars[:, j]) for j in range(k)]
    auroc_classes = tuple(a for a, _ in aucs)
    auprc_classes = tuple(p for _, p in aucs)

    tp = (labels & calls).sum(axis=0)
    fp = (~labels & calls).sum(axis=0)
    fn = (labels & ~calls).sum(axis=0)
    f_measure_classes = tuple(float(2 * tp[j] / (2 * tp[j] + fp[j] + fn[j])) if 2 * tp[j] + fp[j] + fn[j] else None
                              for j in range(k))
    n_true = labels.sum(axis=0)
    accuracy_classes = tuple(float(tp[j] / n_true[j]) if n_true[j] else None for j in range(k))
    accuracy = float(tp.sum() / n)

    weights = np.asarray(CLASS_WEIGHTS[classes], dtype=np.float64)
    weighted_accuracy = float(np.sum(weights * tp) / np.sum(weights * n_true))

    referred = calls[:, [c in _REFERRED for c in classes]].any(axis=1)
    needs = outcome_labels[:, 0]
    cost = challenge_cost(int(np.sum(referred & needs)), int(np.sum(referred & ~needs)),
                          int(np.sum(~referred & needs)), int(np.sum(~referred & ~needs)))

    return TaskScores(
        classes=classes,
        auroc=_mean_defined(auroc_classes),
        auprc=_mean_defined(auprc_classes),
        f_measure=_mean_defined(f_measure_classes),
        accuracy=accuracy,
        weighted_accuracy=weighted_accuracy,
        cost=cost,
        auroc_classes=auroc_classes,
        auprc_classes=auprc_classes,
        f_measure_classes=f_measure_classes,
        accuracy_classes=accuracy_classes,
    )


def challenge_scores(murmur_truth: Sequence[str], outcome_truth: Sequence[str],
                     murmur_binary: ArrayLike, murmur_probabilities: ArrayLike,
                     outcome_binary: ArrayLike, outcome_probabilities: ArrayLike) -> ChallengeScores:
    """Every official score of both tasks, one row per patient.

    ``murmur_*`` arrays are [N, 3] in the order Present, Unknown, Absent; ``outcome_*`` arrays are [N, 2]
    in the order Abnormal, Normal: exactly the binary and scalar lines of the patients' output files.

    Example:

        >>> s = challenge_scores(["Present", "Absent"], ["Abnormal", "Normal"],
        ...                      [[1, 0, 0], [0, 0, 1]], [[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]],
        ...                      [[1, 0], [0, 1]], [[0.8, 0.2], [0.3, 0.7]])
        >>> s.murmur.weighted_accuracy, s.murmur.auroc_classes
        (1.0, (1.0, None, 1.0))
    """
    murmur = score_task(murmur_truth, murmur_binary, murmur_probabilities, MURMUR_CLASSES, outcome_truth)
    outcome = score_task(outcome_truth, outcome_binary, outcome_probabilities, OUTCOME_CLASSES, outcome_truth)
    return ChallengeScores(murmur=murmur, outcome=outcome, n_patients=len(murmur_truth))


# ---------------------------------------------------------------------------------------------- output files
@dataclass(frozen=True)
class ChallengeOutput:
    """One patient's output file: its id line, class names, binary calls and scalar outputs.

    Example::

        out = read_challenge_output("outputs/50001.csv")
        binary, probs = out.columns(MURMUR_CLASSES)
    """

    patient_id: str
    classes: tuple[str, ...]
    labels: tuple[int, ...]
    probabilities: tuple[float, ...]

    def columns(self, classes: Sequence[str]) -> tuple[list[int], list[float]]:
        """Binary calls and scalars in the order of ``classes`` (names matched stripped, case-insensitive).

        A class the file does not name reads as 0 and 0.0, as in the official evaluator.
        """
        folded = [c.strip().casefold() for c in self.classes]
        binary, scalar = [], []
        for c in classes:
            key = c.strip().casefold()
            j = folded.index(key) if key in folded else None
            binary.append(self.labels[j] if j is not None else 0)
            scalar.append(self.probabilities[j] if j is not None else 0.0)
        return binary, scalar


def _full(x: float) -> str:
    """Shortest text that reads back as the same float64 (``nan`` for undefined)."""
    return "nan" if x is None else repr(float(x))


def format_challenge_output(patient_id: str, classes: Sequence[str], labels: Sequence[int],
                            probabilities: Sequence[float]) -> str:
    """The text of one per-patient output file, probabilities at full precision.

    Example:

        >>> print(format_challenge_output("1", ["Present", "Absent"], [1, 0], [2 / 3, 1 / 3]), end="")
        #1
        Present,Absent
        1,0
        0.6666666666666666,0.3333333333333333
    """
    if not (len(classes) == len(labels) == len(probabilities)):
        raise ValueError(f"{len(classes)} classes, {len(labels)} labels, {len(probabilities)} probabilities")
    bad = [x for x in labels if x not in (0, 1)]
    if bad:
        raise ValueError(f"labels must be 0 or 1, got {bad[0]!r}")
    if any(math.isnan(float(p)) for p in probabilities):
        raise ValueError("probabilities must not be NaN")
    return (f"#{patient_id}\n{','.join(str(c) for c in classes)}\n{','.join(str(int(x)) for x in labels)}\n"
            f"{','.join(_full(p) for p in probabilities)}\n")


def _parse_binary(text: str, where: str) -> int:
    value = text.strip().strip("'\"")
    if value in ("True", "true", "T", "t"):
        return 1
    if value in ("False", "false", "F", "f"):
        return 0
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number in (0.0, 1.0):
        return int(number)
    raise DataError(f"{where}: binary output {text.strip()!r} is not 0 or 1")


def _parse_scalar(text: str, where: str) -> float:
    value = text.strip().strip("'\"")
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{where}: output {text.strip()!r} is not a number") from None
    if math.isnan(number):
        raise DataError(f"{where}: output {text.strip()!r} is not a number")
    return number


def read_challenge_output(path: str | Path) -> ChallengeOutput:
    """Read one per-patient output file; a malformed one is a `DataError` naming the file, line and value.

    Stricter than the official reader, which reads an unparseable value as 0: a file the project cannot
    read exactly is refused rather than scored as something it does not say.

    Example::

        read_challenge_output("outputs/50001.csv").probabilities  # (0.61..., 0.05..., ...)
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if len(lines) < 4:
        raise DataError(f"{path}: {len(lines)} lines; an output file has 4 (id, classes, binary, probabilities)")
    if not lines[0].startswith("#"):
        raise DataError(f"{path}: line 1 {lines[0]!r} does not start with '#<patient id>'")
    patient_id = lines[0][1:].strip()
    classes = tuple(c.strip() for c in lines[1].split(","))
    folded = [c.casefold() for c in classes]
    if "" in classes or len(set(folded)) != len(folded):
        raise DataError(f"{path}: line 2 {lines[1]!r} must name each class once")
    labels = tuple(_parse_binary(x, f"{path}: line 3") for x in lines[2].split(","))
    probabilities = tuple(_parse_scalar(x, f"{path}: line 4") for x in lines[3].split(","))
    for line, values in ((3, labels), (4, probabilities)):
        if len(values) != len(classes):
            raise DataError(f"{path}: line {line} has {len(values)} values for {len(classes)} classes")
    return ChallengeOutput(patient_id, classes, labels, probabilities)


def read_challenge_outputs(folder: str | Path) -> dict[str, ChallengeOutput]:
    """Every ``*.csv`` output file of ``folder`` (hidden files skipped), keyed by file name without ``.csv``.

    The official evaluator pairs ``<name>.txt`` (labels) with ``<name>.csv`` (outputs) by file name, so the
    key is the file name, not the ``#`` line inside.

    Example::

        outputs = read_challenge_outputs("outputs/")
        scores = scores_from_outputs({"50001": ("Present", "Abnormal")}, outputs)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: output folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".csv" and not p.name.startswith(".") and p.is_file())
    return {p.stem: read_challenge_output(p) for p in files}


def scores_from_outputs(truth: Mapping[str, tuple[str, str]], outputs: Mapping[str, ChallengeOutput]
                        ) -> ChallengeScores:
    """Official scores of ``outputs`` for the patients of ``truth`` (patient -> (murmur class, outcome)).

    Every patient of ``truth`` needs an output (as officially, a missing one is an error); outputs of other
    patients are ignored.

    Example::

        truth = {"50001": ("Present", "Abnormal"), "50002": ("Absent", "Normal")}
        write_scores_csv(scores_from_outputs(truth, read_challenge_outputs("outputs/")), "challenge_scores.csv")
    """
    missing = sorted(set(truth) - set(outputs))
    if missing:
        raise DataError(f"no output for patient(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    ids = sorted(truth)
    murmur = [outputs[p].columns(MURMUR_CLASSES) for p in ids]
    outcome = [outputs[p].columns(OUTCOME_CLASSES) for p in ids]
    return challenge_scores(
        [truth[p][0] for p in ids], [truth[p][1] for p in ids],
        np.array([b for b, _ in murmur], dtype=np.float64).reshape(-1, 3),
        np.array([s for _, s in murmur], dtype=np.float64).reshape(-1, 3),
        np.array([b for b, _ in outcome], dtype=np.float64).reshape(-1, 2),
        np.array([s for _, s in outcome], dtype=np.float64).reshape(-1, 2),
    )


# ---------------------------------------------------------------------------------------------- scores file
_SUMMARY_HEADER = "AUROC,AUPRC,F-measure,Accuracy,Weighted Accuracy,Cost"


def _summary(task: TaskScores) -> str:
    values = (task.auroc, task.auprc, task.f_measure, task.accuracy, task.weighted_accuracy, task.cost)
    return f"{_SUMMARY_HEADER}\n{','.join(_full(v) for v in values)}\n"


def _per_class(task: TaskScores) -> str:
    rows = [f"Classes,{','.join(task.classes)}"]
    for name, values in (("AUROC", task.auroc_classes), ("AUPRC", task.auprc_classes),
                         ("F-measure", task.f_measure_classes), ("Accuracy", task.accuracy_classes)):
        rows.append(f"{name},{','.join(_full(v) for v in values)}")
    return "\n".join(rows) + "\n"


def format_scores_csv(scores: ChallengeScores) -> str:
    """The official scores file's text: four ``#`` sections in its order, undefined values as ``nan``.

    Example::

        print(format_scores_csv(scores))  # "#Murmur scores\nAUROC,AUPRC,...\n0.83...,..."
    """
    return ("#Murmur scores\n" + _summary(scores.murmur) + "\n#Outcome scores\n" + _summary(scores.outcome)
            + "\n#Murmur scores (per class)\n" + _per_class(scores.murmur)
            + "\n#Outcome scores (per class)\n" + _per_class(scores.outcome))


def write_scores_csv(scores: ChallengeScores, path: str | Path) -> Path:
    """Write `format_scores_csv` to ``path`` (the text is built before the file is opened).

    Example::

        write_scores_csv(scores, "runs/quick/report/challenge_scores.csv")
    """
    path = Path(path)
    text = format_scores_csv(scores)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror or e})") from None
    return path
