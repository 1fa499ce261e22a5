"""Every file a model's predictions are written to: prediction CSV, evaluation CSVs and JSON, Challenge files.

`predict` and `evaluate` describe the same things (a probability and a decision per label, per recording
or patient), so one module writes them: the same cells (`label_cells`: full-precision probabilities, so
re-thresholding a file reproduces its decisions exactly), the same CSV dialect, the same one-line error
when a file cannot be written, and files replaced whole (`atomic.atomic_write`), never left half-written.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, TextIO

from ignite_trainer.core.atomic import atomic_write
from ignite_trainer.scoring.challenge import CHALLENGE_OUTPUT_CLASSES, format_challenge_output
from ignite_trainer.core.errors import DataError
from ignite_trainer.scoring.predictions import LevelPredictions
from ignite_trainer.core.vocabulary import LABELS

if TYPE_CHECKING:
    from ignite_trainer.use.inference import PredictionResult

__all__ = [
    "CHALLENGE_CLASSES", "PREDICTION_COLUMNS", "PATIENT_COLUMNS", "RECORDING_COLUMNS", "label_cells", "write_csv",
    "write_json", "write_predictions_csv", "write_challenge_outputs", "write_patients_csv", "write_recordings_csv",
]

#: The 2022 Challenge's class order in its per-patient output files.
CHALLENGE_CLASSES = CHALLENGE_OUTPUT_CLASSES
PREDICTION_COLUMNS = ("level", "id", "patient_id", "windows", "heart_prob", "heart_pred", "murmur_prob",
                      "murmur_pred", "murmur_class", "outcome_class")
PATIENT_COLUMNS = ("patient_id", "heart_true", "heart_prob", "heart_pred", "murmur_true", "murmur_prob", "murmur_pred")
RECORDING_COLUMNS = ("recording_id", "patient_id", "windows", "heart_true", "heart_prob", "heart_pred",
                     "murmur_true", "murmur_prob", "murmur_pred")


def label_cells(level: LevelPredictions, i: int, thresholds: Mapping[str, float], truth: bool = True) -> dict[str, Any]:
    """``<label>_prob`` (``repr``: full precision), ``<label>_pred`` and, with ``truth``, ``<label>_true``
    (empty where the label is missing) of item ``i``."""
    cells: dict[str, Any] = {}
    for j, label in enumerate(LABELS):
        if truth:
            cells[f"{label}_true"] = int(level.targets[i, j]) if level.mask[i, j] else ""
        cells[f"{label}_prob"] = repr(float(level.probs[i, j]))
        cells[f"{label}_pred"] = int(level.probs[i, j] >= thresholds[label])
    return cells


def write_csv(out: str | Path | TextIO | None, columns: Sequence[str], rows: Iterable[Mapping[str, Any]],
              what: str = "rows") -> None:
    """Rows to a CSV file (replaced whole), an open stream, or stdout (``out`` None)."""
    if out is None or hasattr(out, "write"):
        _csv_rows(sys.stdout if out is None else out, columns, rows)  # type: ignore[arg-type]
        return
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w", durable=False, newline="") as f:
            _csv_rows(f, columns, rows)
    except OSError as e:
        raise DataError(f"{path}: cannot write {what} ({e.strerror or e})") from None


def _csv_rows(stream: TextIO, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def write_json(path: str | Path, value: Any) -> None:
    """``value`` as indented JSON; a non-finite float (JSON has none) becomes null."""
    path = Path(path)
    try:
        with atomic_write(path, "w", durable=False) as f:
            f.write(json.dumps(_finite(value), indent=2) + "\n")
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror or e})") from None


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------- predict
def write_predictions_csv(result: "PredictionResult", out: str | Path | TextIO | None = None) -> None:
    """One row per recording, then per patient (``level`` column); stdout when ``out`` is None.

    Probabilities are written with full precision (``repr``) so that re-thresholding the CSV gives exactly
    the ``*_pred`` columns (the project's per-label decisions at the tuned thresholds); ``murmur_class``
    and ``outcome_class`` are the Challenge decision layer's calls, the ones the Challenge files hold.

    Example::

        write_predictions_csv(predict("runs/quick", ["new/"]), "predictions.csv")

    A patient model's file has one more column, ``attention``: each recording's share of its patient's
    attention (the recording that drove the patient's call has the largest; a patient's shares sum to 1),
    empty on patient rows.
    """
    rows = []
    attention = getattr(result, "attention", None)
    for level in (result.recordings, result.patients):
        classes, outcomes = result.murmur_classes(level), result.outcome_classes(level)
        for i, item in enumerate(level.ids):
            row = {"level": level.level, "id": item, "patient_id": level.patient_ids[i],
                   "windows": int(level.n_windows[i]), **label_cells(level, i, result.thresholds, truth=False),
                   "murmur_class": classes[i], "outcome_class": outcomes[i]}
            if attention is not None:
                row["attention"] = repr(float(attention[item])) if level.level == "recording" else ""
            rows.append(row)
    columns = PREDICTION_COLUMNS if attention is None else PREDICTION_COLUMNS + ("attention",)
    write_csv(out, columns, rows, what="predictions")


def write_challenge_outputs(result: "PredictionResult", out_dir: str | Path) -> list[Path]:
    """The 2022 Challenge's per-patient output files, ``<out_dir>/<patient id>.csv``::

        #<patient id>
        Present,Unknown,Absent,Abnormal,Normal
        <five 0/1 labels>
        <five probabilities>

    Calls and probabilities are the decision layer's (`inference.PredictionResult.challenge_outputs`), the
    same ones `evaluation.evaluate` scores, and probabilities are written at full precision (the shortest
    text that reads back as the same float64), so the official evaluator sees exactly what was scored.

    Example::

        write_challenge_outputs(predict("runs/quick", ["test_data/"]), "outputs/")
    """
    labels, probs = result.challenge_outputs()
    texts = [format_challenge_output(pid, CHALLENGE_OUTPUT_CLASSES, labels[i].tolist(), probs[i].tolist())
             for i, pid in enumerate(result.patients.ids)]
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from None
    written = []
    for pid, text in zip(result.patients.ids, texts):
        path = out_dir / f"{pid}.csv"
        try:
            with atomic_write(path, "w", durable=False) as f:
                f.write(text)
        except OSError as e:
            raise DataError(f"{path}: cannot write ({e.strerror or e})") from None
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- evaluate
def write_patients_csv(patients: LevelPredictions, thresholds: Mapping[str, float], path: str | Path) -> None:
    """``patients.csv``: one row per patient; ``*_true`` empty where the label is missing, probabilities in
    full precision so that thresholding them reproduces ``*_pred`` and every patient score exactly."""
    write_csv(path, PATIENT_COLUMNS, ({"patient_id": pid, **label_cells(patients, i, thresholds)}
                                      for i, pid in enumerate(patients.ids)), what="patients")


def write_recordings_csv(recs: LevelPredictions, thresholds: Mapping[str, float], path: str | Path) -> None:
    """``recordings.csv``: the same per recording (its location-level murmur label), with its window count."""
    write_csv(path, RECORDING_COLUMNS, ({"recording_id": rid, "patient_id": recs.patient_ids[i],
                                         "windows": int(recs.n_windows[i]), **label_cells(recs, i, thresholds)}
                                        for i, rid in enumerate(recs.ids)), what="recordings")
