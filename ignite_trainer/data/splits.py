"""Patient folds for cross-validation: deal them, write them, read a published one back, and check it.

A cross-validated score is only comparable when everyone knows which patients were held out together, so
the folds are data of their own: `assign_folds` deals patients into k folds stratified by the combination
of both labels (heart x murmur, a masked label being a stratum value of its own) from an explicit
``split_seed``, so that changing the training ``seed`` moves the initialisation and the crops but never
the folds. `write_split_file` / `read_split_file` store them as patient ids per fold (JSON, or a
``patient_id,fold`` CSV for published splits), and `check_folds` refuses a split that names unknown
patients, puts one patient in two folds or leaves one out.

The dealing is the one `data.datasets.split_patients` has always used for ``n_folds >= 2`` (strata in
sorted order, each shuffled with ``random.Random(seed)``, dealt round-robin across strata), so a config
written before ``split_seed`` existed gets exactly its old folds back.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ignite_trainer.core.config import read_text_file
from ignite_trainer.data.records import Recording
from ignite_trainer.core.errors import ConfigError, DataError
from ignite_trainer.core.vocabulary import LABELS

__all__ = ["SPLIT_FORMAT", "patient_labels", "patient_stratum", "patient_strata", "split_patients",
           "assign_folds", "check_folds", "read_split_file", "write_split_file",
           "fold_split", "labelled_patients", "keep_label_fraction"]

SPLIT_FORMAT = "ignite_trainer/splits/1"

log = logging.getLogger(__name__)


def patient_labels(recordings: Sequence[Recording]) -> tuple[tuple[float, float], tuple[bool, bool], str | None]:
    """A patient's own labels ``(labels, mask, murmur_class)`` from its recordings.

    The heart outcome is per patient, so any recording carries it. The murmur is per patient too in
    CirCor (``murmur_class``): a patient is Present even if some locations are not, Unknown stays masked
    unless the recordings count it positive (``unknown_murmur: positive``). Without a class (other
    formats) a label is the maximum over the recordings where it is present, masked if none has it.
    """
    labels, mask = [0.0, 0.0], [False, False]
    for i in range(2):
        known = [r.labels[i] for r in recordings if r.mask[i]]
        if known:
            labels[i], mask[i] = float(max(known) > 0.5), True
    classes = {r.murmur_class for r in recordings if r.murmur_class is not None}
    murmur_class = classes.pop() if len(classes) == 1 else None
    if murmur_class == "Present":
        labels[1], mask[1] = 1.0, True
    elif murmur_class == "Absent":
        labels[1], mask[1] = 0.0, True
    elif murmur_class == "Unknown":
        positive = any(r.mask[1] and r.labels[1] > 0.5 for r in recordings)
        labels[1], mask[1] = (1.0, True) if positive else (0.0, False)
    return (labels[0], labels[1]), (mask[0], mask[1]), murmur_class


def patient_stratum(recordings: Sequence[Recording]) -> tuple[str, str]:
    """A patient's label combination, e.g. ``("1", "?")``: per label its `patient_labels` value, ``"0"`` or
    ``"1"``, or ``"?"`` where the patient's label is missing (so masked is a stratum of its own)."""
    labels, mask, _ = patient_labels(recordings)
    heart, murmur = (str(int(v > 0.5)) if known else "?" for v, known in zip(labels, mask))
    return heart, murmur


def patient_strata(recordings: Sequence[Recording]) -> dict[tuple[str, str], list[str]]:
    """Sorted patient ids per stratum ``(heart, murmur)``, each value ``"0"``, ``"1"`` or ``"?"`` (masked).

    Example::

        strata = patient_strata(read_recordings(root, "circor2022"))
        print({k: len(v) for k, v in strata.items()})   # {('0', '0'): 138, ('1', '?'): 15, ...}
    """
    by_patient: dict[str, list[Recording]] = defaultdict(list)
    for r in recordings:
        by_patient[r.patient_id].append(r)
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for pid in sorted(by_patient):
        strata[patient_stratum(by_patient[pid])].append(pid)
    return {s: strata[s] for s in sorted(strata)}


def _shuffled_strata(strata: dict[tuple[str, str], list[str]], seed: int) -> list[list[str]]:
    """Each stratum's patients (`patient_strata`: strata in sorted order) shuffled by one ``random.Random(seed)``
    in turn: the order both the folds and the ``val_fraction`` split deal patients from."""
    rng = random.Random(seed)
    ordered = []
    for pids in strata.values():
        pids = list(pids)
        rng.shuffle(pids)
        ordered.append(pids)
    return ordered


def assign_folds(recordings: Sequence[Recording], n_folds: int, split_seed: int) -> list[list[str]]:
    """Patient ids per fold (k lists, each sorted), stratified by both labels; a function of the patients
    and ``split_seed`` only (not of the recordings' order).

    A stratum with fewer patients than folds is dealt over as many folds as it fills, with one warning naming
    it (as scikit-learn's ``StratifiedKFold`` does): small data sets have such strata, and its folds are still
    usable. Refused, with a `DataError`, only where a fold would hold no patient at all of a class the data
    has for a label (heart or murmur 0 or 1): that fold's scores for the label would be undefined.

    Example::

        folds = assign_folds(recordings, n_folds=5, split_seed=0)
        write_split_file(folds, "splits.json", split_seed=0)
    """
    if n_folds < 2:
        raise ConfigError(f"n_folds={n_folds}: cross-validation needs at least 2 folds")
    strata = patient_strata(recordings)
    if not strata:
        raise DataError("no patients to split into folds")
    n_patients = sum(len(pids) for pids in strata.values())
    if n_patients < n_folds:
        raise DataError(f"n_folds={n_folds} needs at least {n_folds} patients, the data has {n_patients}")
    ordered = [pid for pids in _shuffled_strata(strata, split_seed) for pid in pids]
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for i, pid in enumerate(ordered):  # round-robin across strata: fold sizes differ by at most one
        folds[i % n_folds].append(pid)
    _check_classes_in_every_fold(strata, folds)
    small = [f"heart={h}, murmur={m} ({len(pids)})" for (h, m), pids in strata.items() if len(pids) < n_folds]
    if small:
        _warn_once(f"n_folds={n_folds}: " + ("1 stratum holds" if len(small) == 1 else f"{len(small)} strata hold")
                   + f" fewer patients than folds, dealt over the folds they fill: {'; '.join(small)} "
                   "('?' = label missing)")
    return [sorted(f) for f in folds]


def _check_classes_in_every_fold(strata: dict[tuple[str, str], list[str]], folds: list[list[str]]) -> None:
    """Refuse folds where a label's class that the data has is missing from a fold's validation patients."""
    for i, label in enumerate(LABELS):
        for value in ("0", "1"):
            members = {pid for stratum, pids in strata.items() if stratum[i] == value for pid in pids}
            if not members:
                continue  # the data has no such class: nothing any fold could hold
            empty = [k for k, fold in enumerate(folds) if not members.intersection(fold)]
            if empty:
                raise DataError(f"n_folds={len(folds)}: fold {empty[0]} would hold no patient with {label}={value} "
                                f"(the data has {len(members)}), so its {label} scores would be undefined; "
                                f"use at most {len(members)} folds")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per process for the same data and fold count (every cv member deals the same folds)."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def split_patients(
    recordings: Sequence[Recording], val_fraction: float, seed: int, n_folds: int = 0, fold: int = 0
) -> tuple[list[Recording], list[Recording]]:
    """``(train, validation)`` recordings, split by patient and stratified by the patient's label combination.

    With ``n_folds >= 2`` the patients are dealt into k folds and fold ``fold`` is validation; otherwise
    ``val_fraction`` of the patients are (at least one, from each stratum its rounded share). The result
    depends only on the recordings and ``seed``, not on their order; both sides keep the input order.

    Example::

        train, val = split_patients(recordings, val_fraction=0.2, seed=0)
        train, val = split_patients(recordings, 0.0, seed=0, n_folds=5, fold=2)  # fold 2 of 5 is validation
    """
    patients = {r.patient_id for r in recordings}
    n_patients = len(patients)
    if n_folds >= 2:
        if not 0 <= fold < n_folds:
            raise ConfigError(f"fold={fold} must be in 0..{n_folds - 1} for n_folds={n_folds}")
        val_patients = set(assign_folds(recordings, n_folds, seed)[fold])
    else:
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction} leaves one side of the patient split empty")
        if n_patients < 2:
            raise DataError(f"cannot split {n_patients} patient(s) into training and validation; need at least 2")
        n_val = min(n_patients - 1, max(1, round(n_patients * val_fraction)))
        ordered = _shuffled_strata(patient_strata(recordings), seed)
        counts = _largest_remainder([len(p) for p in ordered], n_val)
        val_patients = {pid for pids, k in zip(ordered, counts) for pid in pids[:k]}

    train = [r for r in recordings if r.patient_id not in val_patients]
    val = [r for r in recordings if r.patient_id in val_patients]
    if not train or not val:
        side = "training" if not train else "validation"
        raise DataError(f"the patient split leaves the {side} set empty ({n_patients} patients)")
    return train, val


def labelled_patients(recordings: Sequence[Recording], fraction: float, seed: int) -> set[str]:
    """The patients of ``recordings`` that keep their labels under ``label_fraction`` = ``fraction``.

    Per stratum (`patient_strata`: heart x murmur, masked a value of its own) ``max(1, floor(n * fraction + 0.5))``
    of its ``n`` patients (never more than ``n``), drawn by shuffling each stratum's sorted ids with one
    ``random.Random(f"label_fraction/{seed}")``, strata in sorted order: a function of the patients and
    ``seed`` only, and never a stratum left without a labelled patient. ``fraction`` 1.0 keeps every patient.

    Example::

        keep = labelled_patients(train, fraction=0.25, seed=0)
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"label_fraction={fraction} must be > 0 and <= 1")
    strata = patient_strata(recordings)
    if fraction == 1:
        return {pid for pids in strata.values() for pid in pids}
    rng = random.Random(f"label_fraction/{seed}")
    keep: set[str] = set()
    for pids in strata.values():
        pids = list(pids)
        rng.shuffle(pids)
        keep.update(pids[:min(len(pids), max(1, math.floor(len(pids) * fraction + 0.5)))])
    return keep


def keep_label_fraction(train: Sequence[Recording], fraction: float, seed: int) -> list[Recording]:
    """``train`` with every label of the patients outside `labelled_patients` masked (mask False, label 0.0,
    ``murmur_class`` None), so they add nothing to the supervised loss; order and everything else kept.
    ``fraction`` 1.0 returns the recordings unchanged. Validation recordings must never pass through here.

    Example::

        train, val = split_patients(recordings, 0.2, seed=0)
        train = keep_label_fraction(train, 0.1, seed=0)   # 10 % of the training patients keep their labels
    """
    if fraction == 1:
        return list(train)
    keep = labelled_patients(train, fraction, seed)
    return [r if r.patient_id in keep else replace(r, labels=(0.0, 0.0), mask=(False, False), murmur_class=None,
                                                        murmur_attributes=(), segmentation_path=None)
            for r in train]


def _largest_remainder(sizes: list[int], total: int) -> list[int]:
    """Integer shares of ``total`` proportional to ``sizes`` that add up to exactly ``total``."""
    n = sum(sizes)
    exact = [s * total / n for s in sizes]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def check_folds(folds: Sequence[Sequence[str]], patients: Sequence[str], source: str = "split") -> None:
    """Refuse folds that cannot be a k-fold split of ``patients``: fewer than 2 folds, an empty fold, a
    patient in two folds, a patient the data does not hold, or a patient of the data in no fold.

    Example::

        check_folds(read_split_file("published.json"), sorted({r.patient_id for r in recordings}), "published.json")
    """
    if len(folds) < 2:
        raise DataError(f"{source}: {len(folds)} fold(s); a k-fold split needs at least 2")
    seen: dict[str, int] = {}
    for k, fold in enumerate(folds):
        if not fold:
            raise DataError(f"{source}: fold {k} is empty")
        for pid in fold:
            if pid in seen:
                where = f"folds {seen[pid]} and {k}" if seen[pid] != k else f"fold {k} twice"
                raise DataError(f"{source}: patient {pid} is in {where} (folds must not overlap)")
            seen[pid] = k
    known = set(patients)
    unknown = sorted(set(seen) - known)
    if unknown:
        raise DataError(f"{source}: {len(unknown)} patient id(s) not in the data, e.g. {', '.join(unknown[:3])}")
    missing = sorted(known - set(seen))
    if missing:
        raise DataError(f"{source}: {len(missing)} patient(s) of the data are in no fold, e.g. {', '.join(missing[:3])}")


def read_split_file(path: str | Path) -> list[list[str]]:
    """Patient ids per fold from a split file (not yet checked against any data; see `check_folds`).

    Two layouts: JSON, either a list of lists of ids or an object whose ``"folds"`` is one (what
    `write_split_file` writes); or CSV with a header holding ``patient_id`` and ``fold`` columns, folds
    numbered by integers (renumbered 0..k-1 in ascending order, so 1-based files work as they are).

    Example::

        folds = read_split_file("published_5fold.csv")
    """
    path = Path(path)
    text = read_text_file(path, "the split file", DataError)
    if path.suffix.lower() == ".csv":
        return _folds_from_csv(text, path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); expected patient ids per fold") from None
    if isinstance(value, dict):
        if "folds" not in value:
            raise DataError(f"{path}: a JSON object split file needs a 'folds' list of patient-id lists")
        value = value["folds"]
    if not isinstance(value, list) or not all(isinstance(f, list) for f in value):
        raise DataError(f"{path}: expected a list of folds, each a list of patient ids")
    folds = []
    for k, fold in enumerate(value):
        ids = []
        for pid in fold:
            if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
                raise DataError(f"{path}: fold {k} holds {pid!r}, which is not a patient id")
            ids.append(str(pid).strip())
        folds.append(ids)
    return folds


def _folds_from_csv(text: str, path: Path) -> list[list[str]]:
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"patient_id", "fold"} <= set(rows[0]):
        raise DataError(f"{path}: a CSV split file needs a header with 'patient_id' and 'fold' columns and one row "
                        "per patient")
    by_fold: dict[int, list[str]] = defaultdict(list)
    for line, row in enumerate(rows, start=2):
        pid, fold = (row.get("patient_id") or "").strip(), (row.get("fold") or "").strip()
        try:
            number = int(fold)
        except ValueError:
            raise DataError(f"{path}: line {line}: fold {fold!r} is not an integer") from None
        if not pid:
            raise DataError(f"{path}: line {line}: empty patient_id")
        by_fold[number].append(pid)
    return [by_fold[k] for k in sorted(by_fold)]


def write_split_file(folds: Sequence[Sequence[str]], path: str | Path, split_seed: int | None = None,
                     **info: Any) -> Path:
    """Write patient ids per fold as JSON (atomically: a reader never sees half a file).

    ``split_seed`` is None for a split that was given rather than dealt; ``info`` adds fields (such as
    the stratum sizes) for the reader's benefit.

    Example::

        write_split_file(assign_folds(recordings, 5, 0), "exp/splits.json", split_seed=0)
    """
    path = Path(path)
    body = {"format": SPLIT_FORMAT, "n_folds": len(folds), "split_seed": split_seed,
            "stratified_by": ["heart", "murmur"], **info, "folds": [sorted(map(str, f)) for f in folds]}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"{path}: cannot write the split file ({e.strerror or e})") from None
    return path


def fold_split(recordings: Sequence[Recording], n_folds: int, fold: int, split_seed: int,
               split_file: str | Path | None = None) -> tuple[list[Recording], list[Recording]]:
    """``(train, validation)`` recordings with fold ``fold`` as validation: from ``split_file`` when given
    (``n_folds`` 0 takes its fold count, any other value must match it), else `assign_folds`.

    Example::

        train, val = fold_split(recordings, n_folds=5, fold=2, split_seed=0)
    """
    if split_file is not None:
        folds = read_split_file(split_file)
        check_folds(folds, sorted({r.patient_id for r in recordings}), str(split_file))
        if n_folds not in (0, len(folds)):
            raise ConfigError(f"n_folds={n_folds} but {split_file} holds {len(folds)} folds")
    else:
        folds = assign_folds(recordings, n_folds, split_seed)
    if not 0 <= fold < len(folds):
        raise ConfigError(f"fold={fold} does not exist: the split has folds 0..{len(folds) - 1}")
    val_patients = set(folds[fold])
    train = [r for r in recordings if r.patient_id not in val_patients]
    val = [r for r in recordings if r.patient_id in val_patients]
    return train, val
