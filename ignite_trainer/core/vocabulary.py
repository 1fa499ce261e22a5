"""The project's shared words: label, score, format, aggregation and objective names, declared once.

Config validation, the CLI's choices, the metrics, the logs and the readers all speak these names; keeping
them in one leaf module (no imports) means a new format or score is added in one place and every check,
``--help`` text and log key follows.
"""

from __future__ import annotations

import math
from typing import Iterable

#: Label order everywhere: model outputs, targets, masks, metrics, files.
LABELS: tuple[str, ...] = ("heart", "murmur")

#: Per-label decision scores logged per epoch and accepted by ``monitor`` as ``<label>.<stat>``.
STATS: tuple[str, ...] = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1")

#: Scores that are not per label; ``val_loss`` is the only one minimised.
RUN_SCORES: tuple[str, ...] = ("val_loss", "macro_f1")

#: On-disk dataset layouts a folder can be read in.
FORMATS: tuple[str, ...] = ("circor2022", "physionet2016")
#: The labels each format's readers fill (the others are masked on every recording): what a model trained on
#: that format learned. PhysioNet 2016 labels the heart (outcome) only, so its models' murmur output is untrained.
FORMAT_LABELS: dict[str, tuple[str, ...]] = {"circor2022": LABELS, "physionet2016": ("heart",)}

#: Recordings -> patients: mean probability, or the maximum ("any recording positive").
AGGREGATIONS: tuple[str, ...] = ("mean", "any")

#: How per-label thresholds are chosen on validation.
OBJECTIVES: tuple[str, ...] = ("f1", "challenge", "fixed")

#: The 2022 Challenge's patient classes, in the order of its output files: murmur, then outcome.
MURMUR_CLASSES: tuple[str, str, str] = ("Present", "Unknown", "Absent")
OUTCOME_CLASSES: tuple[str, str] = ("Abnormal", "Normal")
CHALLENGE_OUTPUT_CLASSES: tuple[str, ...] = MURMUR_CLASSES + OUTCOME_CLASSES

#: The Challenge's weight of a correct call, by the patient's *true* class: missing a murmur costs most.
CLASS_WEIGHTS: dict[tuple[str, ...], tuple[int, ...]] = {MURMUR_CLASSES: (5, 3, 1), OUTCOME_CLASSES: (5, 1)}

#: Where a model may run.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def is_score(name: str) -> bool:
    """Whether ``name`` is a validation score: ``val_loss``, ``macro_f1`` or ``<label>.<stat>``.

    Example:

        >>> is_score("murmur.f1"), is_score("murmur.auc")
        (True, False)
    """
    if name in RUN_SCORES:
        return True
    label, _, stat = name.partition(".")
    return label in LABELS and stat in STATS


def score_mode(name: str) -> str:
    """``"min"`` for the loss, ``"max"`` for every other score: the one rule of which direction is better."""
    return "min" if name == VAL_LOSS else "max"


#: ``score_mode`` -> the factor that makes a score larger-is-better.
_MODE_SIGN = {"min": -1.0, "max": 1.0}


def score_sign(name: str) -> float:
    """``-1.0`` for the loss, ``1.0`` otherwise: ``score_sign(name) * value`` is larger-is-better.

    Example:

        >>> score_sign("val_loss") * 0.4 > score_sign("val_loss") * 0.5
        True
    """
    return _MODE_SIGN[score_mode(name)]


def best_epoch(scores: Iterable[tuple[int, float | None]], mode: str = "max") -> int | None:
    """The epoch of the best score among ``(epoch, score)`` pairs, ``mode`` being `score_mode` of the score.

    On a tie the **earliest** epoch wins: Ignite's `Checkpoint` replaces its best file only on a strictly
    better score (so with one file kept, the default, the file holds the first of equal epochs), and its
    `EarlyStopping` counts a tie as no improvement. Reports, the runs table, TensorBoard's best epoch and the
    file ``evaluate`` loads all follow this one rule. Undefined scores (None, NaN) are skipped; None when no
    epoch has a score.

    Example:

        >>> best_epoch([(1, 0.7), (2, 0.6), (3, 0.6)], "min")
        2
    """
    sign = _MODE_SIGN[mode]
    scored = [(sign * float(s), int(e)) for e, s in scores if s is not None and math.isfinite(s)]
    if not scored:
        return None
    top = max(s for s, _ in scored)
    return min(e for s, e in scored if s == top)


# ------------------------------------------------------------------------------------------------------------
# Metric and output names.
#
# The names a run is composed with: the evaluator metrics are attached under them (``create_evaluator``), the
# handlers are told them (``monitor=``, ``attach_threshold_tuning``), and handlers read them back from
# ``engine.state.metrics`` and ``trainer.state.validation_metrics``. The engines' output dicts use the keys
# below. Each name is written here once; the library and scripts refer to the constant.
# ------------------------------------------------------------------------------------------------------------

#: The evaluator's epoch loss (`MaskedLoss`), the one score that is minimised.
VAL_LOSS = "val_loss"
#: Mean of the labels' defined F1 scores (`PerLabelMetrics`).
MACRO_F1 = "macro_f1"
#: The trainer's mean loss over an epoch, in ``trainer.state.metrics``.
TRAIN_LOSS = "train_loss"
#: The evaluator's `PredictionCollector` (every window's probability): threshold tuning, the decision layer
#: and the PR curves read the validation predictions under this name.
PREDICTIONS = "predictions"
#: The name `PerLabelMetrics` is attached under; its scores are flattened into ``engine.state.metrics`` as
#: `label_score` keys and ``MACRO_F1``, so nothing reads this name back.
PER_LABEL = "labels"

#: The trainer's ``engine.state.output`` keys: the step's loss, the gradient norm before clipping (NaN on an
#: accumulation micro-step), whether the step was finite (a non-finite step is skipped).
LOSS = "loss"
GRAD_NORM = "grad_norm"
FINITE = "finite"
#: The evaluator's ``engine.state.output`` keys: logits ``[B, L]``, targets ``[B, L]``, label mask ``[B, L]``
#: and the window index ``[B]``; every metric reads these.
LOGITS = "logits"
TARGETS = "y"
MASK = "mask"
INDEX = "index"
#: With auxiliary heads, the evaluator's output also holds their outputs and targets under these keys.
HEADS = "heads"
HEAD_TARGETS = "head_targets"


def label_score(label: str, stat: str) -> str:
    """The name of one label's score, ``"<label>.<stat>"``, as `PerLabelMetrics` reports it and ``monitor`` takes it.

    ``label`` is one of `LABELS` (or of the labels a `PerLabelMetrics` was given); ``stat`` one of `STATS`
    or ``"support"``.

    Example:

        >>> label_score("murmur", "f1")
        'murmur.f1'
        >>> is_score(label_score("heart", "specificity"))
        True
    """
    if not label or "." in label:
        raise ValueError(f"label {label!r} must be a non-empty name without a dot")
    if stat not in (*STATS, "support"):
        raise ValueError(f"unknown statistic {stat!r}; one of {', '.join((*STATS, 'support'))}")
    return f"{label}.{stat}"


#: The ``format`` metadata of a one-model safetensors file (`cli.py export`, a pretraining run's ``trunk.safetensors``).
SAFETENSORS_FORMAT = "ignite_trainer/1"

# ---------------------------------------------------------------------------------------------- auxiliary heads
#: CirCor's murmur descriptors, each an optional classification head (``heads``): head name -> (the field as the
#: patient file writes it, its classes in order). A patient's value is compared case-insensitively.
MURMUR_ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "systolic_timing": ("Systolic murmur timing", ("Early-systolic", "Mid-systolic", "Late-systolic", "Holosystolic")),
    "systolic_shape": ("Systolic murmur shape", ("Crescendo", "Decrescendo", "Diamond", "Plateau")),
    "systolic_grading": ("Systolic murmur grading", ("I/VI", "II/VI", "III/VI")),
    "systolic_pitch": ("Systolic murmur pitch", ("Low", "Medium", "High")),
    "systolic_quality": ("Systolic murmur quality", ("Blowing", "Harsh", "Musical")),
    "diastolic_timing": ("Diastolic murmur timing", ("Early-diastolic", "Mid-diastolic", "Holodiastolic")),
    "diastolic_shape": ("Diastolic murmur shape", ("Crescendo", "Decrescendo", "Diamond", "Plateau")),
    "diastolic_grading": ("Diastolic murmur grading", ("I/IV", "II/IV", "III/IV")),
    "diastolic_pitch": ("Diastolic murmur pitch", ("Low", "Medium", "High")),
    "diastolic_quality": ("Diastolic murmur quality", ("Blowing", "Harsh", "Musical")),
}
#: The frame-level heart-cycle head, trained from a recording's ``.tsv`` (state 1-4; 0, unannotated, is left out).
SEGMENTATION = "segmentation"
#: The heart-cycle states in the ``.tsv``'s numbering from 1.
HEART_STATES = ("S1", "systole", "S2", "diastole")
#: Every head ``heads`` may name; ``attributes`` stands for all of `MURMUR_ATTRIBUTES`.
HEAD_NAMES = (*MURMUR_ATTRIBUTES, SEGMENTATION)
ALL_ATTRIBUTES = "attributes"
#: Names ``heads`` also takes for several descriptors at once (diastolic murmurs are rare: a set without one
#: can still train every systolic descriptor with ``systolic``).
HEAD_GROUPS: dict[str, tuple[str, ...]] = {
    ALL_ATTRIBUTES: tuple(MURMUR_ATTRIBUTES),
    "systolic": tuple(h for h in MURMUR_ATTRIBUTES if h.startswith("systolic_")),
    "diastolic": tuple(h for h in MURMUR_ATTRIBUTES if h.startswith("diastolic_")),
}

# ---------------------------------------------------------------------------------------------- shared storages
#: Default seconds between a running trial's (or cv member's) heartbeats in a database storage (``--heartbeat``).
#: The heartbeat runs in its own thread, so a training epoch of minutes does not delay it.
HEARTBEAT_INTERVAL = 30
#: How many heartbeats may be missed before the trial counts as dead: a busy machine or a slow database may
#: delay one, not six.
GRACE_HEARTBEATS = 6
