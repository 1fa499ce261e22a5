"""The project's shared words: label, score, format, aggregation and objective names, declared once.

Config validation, the CLI's choices, the metrics, the logs and the readers all speak these names; keeping
them in one leaf module (no imports) means a new format or score is added in one place and every check,
``--help`` text and log key follows.
"""

from __future__ import annotations

#: Label order everywhere: model outputs, targets, masks, metrics, files.
LABELS: tuple[str, ...] = ("heart", "murmur")

#: Per-label decision scores logged per epoch and accepted by ``monitor`` as ``<label>.<stat>``.
STATS: tuple[str, ...] = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1")

#: Scores that are not per label; ``val_loss`` is the only one minimised.
RUN_SCORES: tuple[str, ...] = ("val_loss", "macro_f1")

#: On-disk dataset layouts a folder can be read in.
FORMATS: tuple[str, ...] = ("circor2022", "physionet2016")

#: Recordings -> patients: mean probability, or the maximum ("any recording positive").
AGGREGATIONS: tuple[str, ...] = ("mean", "any")

#: How per-label thresholds are chosen on validation.
OBJECTIVES: tuple[str, ...] = ("f1", "challenge", "fixed")

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
    """``"min"`` for the loss, ``"max"`` for every other score."""
    return "min" if name == VAL_LOSS else "max"


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
