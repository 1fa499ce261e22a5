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
    return "min" if name == "val_loss" else "max"
