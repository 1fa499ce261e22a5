"""The human-readable side of an evaluation: PNG figures and ``report.md`` linking them with the tables.

Figures are drawn on matplotlib `Figure` objects with the Agg canvas directly (no ``pyplot``), so making a
report never changes the caller's global backend, works on machines without a display, and is safe to
call from several threads. Nothing here computes a score: the numbers come from `evaluation`'s results,
the curves from scikit-learn's ``roc_curve`` / ``precision_recall_curve`` over the same predictions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from ignite_trainer.core.config import read_yaml_mapping
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.runs.rundir import RunDirectory, read_metrics_log
from ignite_trainer.scoring.predictions import LevelPredictions
from ignite_trainer.use.heads_output import heads_report_lines
from ignite_trainer.core.vocabulary import LABELS
from ignite_trainer.core import vocabulary
from ignite_trainer.core.vocabulary import score_mode

__all__ = ["plot_confusion_matrices", "plot_roc_pr", "plot_reliability", "plot_training_curves", "read_metrics_log", "best_epoch",
           "write_report", "CLASS_NAMES"]

LEVEL_TITLES = {"window": "windows", "recording": "recordings", "patient": "patients"}
#: What 0 and 1 mean for each label, in the field's words (CirCor's outcome and murmur classes).
CLASS_NAMES = {"heart": ("Normal", "Abnormal"), "murmur": ("Absent", "Present")}
LEVEL_COLOURS = {"window": "#9e9e9e", "recording": "#1f77b4", "patient": "#d62728"}
TABLE_COLUMNS = (("support", "n"), ("positives", "positives"), ("accuracy", "accuracy"), ("precision", "precision"),
                 ("recall", "recall"), ("specificity", "specificity"), ("f1", "F1"), ("auroc", "AUROC"),
                 ("auprc", "AUPRC"))


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------- figures
def plot_confusion_matrices(scores_by_level: Mapping[str, Mapping[str, Any]], label: str, path: str | Path) -> Path:
    """One confusion matrix per level (true rows, predicted columns) for ``label``, counts and row shares.

    ``scores_by_level[level]`` holds ``tp``, ``fp``, ``fn``, ``tn`` and ``threshold`` (`evaluation.label_scores`).

    Example::

        plot_confusion_matrices({lvl: results["levels"][lvl]["murmur"] for lvl in LEVELS}, "murmur", "cm.png")
    """
    levels = list(scores_by_level)
    fig = _figure(3.3 * len(levels), 3.4)
    axes = fig.subplots(1, len(levels), squeeze=False)[0]
    for ax, level in zip(axes, levels):
        s = scores_by_level[level]
        counts = np.array([[s["tn"], s["fp"]], [s["fn"], s["tp"]]], dtype=np.int64)
        rows = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{n}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=11,
                    color="white" if shares[i, j] > 0.6 else "black")
        ax.set_xticks([0, 1], list(CLASS_NAMES.get(label, ("negative", "positive"))))
        ax.set_yticks([0, 1], list(CLASS_NAMES.get(label, ("negative", "positive"))))
        ax.set_xlabel(f"predicted (p ≥ {s['threshold']:.3g})")
        ax.set_ylabel("true")
        ax.set_title(f"{LEVEL_TITLES.get(level, level)} (n={int(counts.sum())})")
    fig.suptitle(f"{label}: confusion matrices")
    return _save(fig, Path(path))


def plot_roc_pr(levels: Mapping[str, LevelPredictions], label: str, path: str | Path) -> Path:
    """ROC and precision-recall curves of ``label``, one line per level.

    A level whose items are all of one class has no curve (neither rate pair nor precision is defined for
    both sides): its legend entry says so, and a panel left without any curve carries a note in its middle
    naming the class every item has, so an empty panel is never mistaken for a drawing error.

    Example::

        plot_roc_pr({"recording": recordings, "patient": patients}, "murmur", "report/figures/roc_pr_murmur.png")
    """
    fig = _figure(9.0, 4.0)
    roc_ax, pr_ax = fig.subplots(1, 2)
    roc_ax.plot([0, 1], [0, 1], ls=":", color="black", lw=0.8)
    names = CLASS_NAMES.get(label, ("negative", "positive"))
    notes = []
    for level, preds in levels.items():
        y, p = preds.label(label)
        name = LEVEL_TITLES.get(level, level)
        colour = LEVEL_COLOURS.get(level)
        if y.size == 0 or y.min() == y.max():
            only = "no labelled item" if y.size == 0 else f"all {y.size} {names[int(y[0])]}"
            for ax in (roc_ax, pr_ax):
                ax.plot([], [], color=colour, label=f"{name}: {only}, no curve")
            notes.append(f"{name}: {only}")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        precision, recall, _ = precision_recall_curve(y, p)
        roc_ax.plot(fpr, tpr, color=colour, label=f"{name} (n={y.size})")
        pr_ax.step(recall, precision, where="post", color=colour, label=f"{name} (prevalence {y.mean():.2f})")
        pr_ax.axhline(y.mean(), color=colour, ls=":", lw=0.8)
    roc_ax.set(xlabel="false positive rate (1 − specificity)", ylabel="true positive rate (sensitivity)",
               xlim=(0, 1), ylim=(0, 1.02), title=f"{label}: ROC")
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
              title=f"{label}: precision-recall ({names[1]} is positive)")
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
        drawn = [line for line in ax.get_lines() if len(line.get_xdata()) > 0 and line.get_linestyle() != ":"]
        if not drawn and notes:
            ax.text(0.5, 0.5, "no curve: one class only\n" + "\n".join(notes)
                    + f"\n(a curve needs both {names[0]} and {names[1]})",
                    ha="center", va="center", fontsize=9, transform=ax.transAxes,
                    bbox={"boxstyle": "round", "facecolor": "#fff3cd", "edgecolor": "#c9a227"})
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize=8)
    return _save(fig, Path(path))


def plot_reliability(calibration: Mapping[str, Any], path: str | Path) -> Path:
    """The reliability diagram of each label, before and after temperature scaling, on one figure.

    ``calibration`` is the ``calibration`` section of `evaluation.evaluate`'s results: per label the bins
    (``reliability_before`` / ``reliability_after``: mean confidence, accuracy, count) and the ECE. Each
    point is a non-empty bin at (mean predicted probability, observed share of positives), its area
    growing with the bin's count; the diagonal is perfect calibration.

    Example::

        plot_reliability(results["calibration"], "report/figures/reliability.png")
    """
    fig = _figure(4.2 * len(LABELS), 4.0)
    axes = fig.subplots(1, len(LABELS), squeeze=False)[0]
    temps = calibration.get("temperatures", {})
    for ax, label in zip(axes, LABELS):
        ax.plot([0, 1], [0, 1], color="#9e9e9e", linestyle="--", linewidth=1, label="perfect")
        for key, colour, name in (("before", LEVEL_COLOURS["recording"], "before"),
                                  ("after", LEVEL_COLOURS["patient"], f"after (T={temps.get(label, 1.0):.3g})")):
            bins = [b for b in calibration.get(f"reliability_{key}", {}).get(label, []) if b["count"]]
            ece = calibration.get(f"ece_{key}", {}).get(label)
            if not bins:
                continue
            total = sum(b["count"] for b in bins)
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color=colour, marker="o",
                    markersize=3, linewidth=1.2, label=f"{name}, ECE {_number(ece)}")
            ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color=colour, alpha=0.3,
                       s=[400.0 * b["count"] / total for b in bins])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(f"{label}: {calibration.get('level', 'patient')}s")
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel(f"share {CLASS_NAMES[label][1]}")
        ax.legend(loc="upper left", fontsize=7)
    return _save(fig, Path(path))


def _series(records: Sequence[Mapping[str, Any]], *keys: str) -> list[float]:
    out = []
    for r in records:
        value: Any = r
        for k in keys:
            value = value.get(k) if isinstance(value, Mapping) else None
        out.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan)
    return out


def best_epoch(records: Sequence[Mapping[str, Any]], monitor: str) -> int | None:
    """The epoch the best checkpoint holds: the best ``monitor`` score in the log, by the project's one rule
    (`vocabulary.best_epoch`: the earliest of equal epochs). None when no epoch has it.

    Example:

        >>> best_epoch([{"epoch": 1, "val_loss": 0.7}, {"epoch": 2, "val_loss": 0.6}, {"epoch": 3, "val_loss": 0.6}],
        ...            "val_loss")
        2
    """
    keys = monitor.split(".")
    return vocabulary.best_epoch(((r["epoch"], _series([r], *keys)[0]) for r in records), score_mode(monitor))


def _run_monitor(metrics_log: Path) -> str:
    """The monitored score from the run's ``config.yaml`` beside its metrics log (``val_loss`` if unknown)."""
    try:
        config = read_yaml_mapping(RunDirectory(metrics_log.parent).config_file)
    except ConfigError:  # missing, not UTF-8 or not YAML: the curves mark the loss's best epoch
        return "val_loss"
    monitor = config.get("monitor")
    return monitor if isinstance(monitor, str) else "val_loss"


def plot_training_curves(metrics_log: str | Path, path: str | Path, checkpoint_epoch: int | None = None,
                         tuned_f1: Mapping[str, float | None] | None = None) -> Path | None:
    """Losses, per-label and macro F1, and the learning rate per epoch; None when the log has no epoch.

    Every panel marks the best epoch by the run's monitored score (from ``config.yaml`` beside the log) and,
    when given and different, ``checkpoint_epoch``, the epoch of the checkpoint the report evaluated. The
    F1 curves are what training logs each epoch: validation recordings at that epoch's tuned thresholds
    (solid, where the log holds them) and windows at threshold 0.5 (dotted), which stays flat at 0 on a
    small run whose probabilities never reach 0.5; the panel says so, and ``tuned_f1`` (per label, the
    evaluated recordings' F1 at the tuned thresholds) is drawn as stars at the checkpoint's epoch, the
    number the report's table holds. An undefined F1 (null) leaves a gap.

    Example::

        plot_training_curves("runs/quick/metrics.jsonl", "runs/quick/report/figures/training_curves.png",
                             checkpoint_epoch=7, tuned_f1={"heart": 0.71, "murmur": 0.64})
    """
    metrics_log = Path(metrics_log)
    records = read_metrics_log(metrics_log)
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    monitor = _run_monitor(metrics_log)
    best = best_epoch(records, monitor)
    fig = _figure(12.5, 3.9)
    loss_ax, f1_ax, lr_ax = fig.subplots(1, 3)
    marker = "o" if len(epochs) < 30 else None
    loss_ax.plot(epochs, _series(records, "train_loss"), marker=marker, label="train")
    loss_ax.plot(epochs, _series(records, "val_loss"), marker=marker, label="validation")
    loss_ax.set(title="loss", xlabel="epoch", ylabel="masked weighted BCE")
    colours = {}
    tuned_logged = False
    for label in LABELS:
        tuned_curve = _series(records, label, "at_threshold", "f1")
        has_tuned = any(math.isfinite(v) for v in tuned_curve)
        tuned_logged |= has_tuned
        (line,) = f1_ax.plot(epochs, _series(records, label, "f1"), marker=marker, label=f"{label} (windows, 0.5)",
                             ls=":" if has_tuned else "-", alpha=0.6 if has_tuned else 1.0)
        colours[label] = line.get_color()
        if has_tuned:
            f1_ax.plot(epochs, tuned_curve, marker=marker, color=colours[label],
                       label=f"{label} (recordings, tuned threshold)")
    f1_ax.plot(epochs, _series(records, "macro_f1"), ls="--", color="black", label="macro (windows, 0.5)")
    at = checkpoint_epoch if checkpoint_epoch is not None else best
    for label, value in (tuned_f1 or {}).items():
        if value is not None and at is not None:
            f1_ax.plot([at], [value], marker="*", ms=13, ls="none", color=colours.get(label, "black"),
                       markeredgecolor="black", label=f"{label}: recordings, tuned threshold")
    title = ("validation F1\nsolid: recordings, the epoch's tuned thresholds; dotted: windows at 0.5"
             if tuned_logged else "validation F1: windows at threshold 0.5")
    f1_ax.set(title=title, xlabel="epoch", ylabel="F1", ylim=(-0.02, 1.02))
    if tuned_logged:
        f1_ax.title.set_fontsize(9)
    lr_ax.plot(epochs, _series(records, "lr"), marker=marker, color="tab:green")
    lr_ax.set(title="learning rate", xlabel="epoch")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for i, ax in enumerate((loss_ax, f1_ax, lr_ax)):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best is not None:
            same = checkpoint_epoch is None or checkpoint_epoch == best
            text = f"best {monitor}: epoch {best}" + (" = checkpoint used" if same and checkpoint_epoch else "")
            ax.axvline(best, color="tab:red", ls="--", lw=1.2, label=text if i < 2 else None)
        if checkpoint_epoch is not None and checkpoint_epoch != best:
            ax.axvline(checkpoint_epoch, color="tab:purple", ls="-.", lw=1.2,
                       label=f"checkpoint used: epoch {checkpoint_epoch}" if i < 2 else None)
    loss_ax.legend(fontsize=8)
    f1_ax.legend(fontsize=7, loc="best")
    return _save(fig, Path(path))


# ---------------------------------------------------------------------------------------------- report.md
def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def _table(scores: Mapping[str, Mapping[str, Any]]) -> list[str]:
    header = ["label"] + [title for _, title in TABLE_COLUMNS] + ["MAcc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in (label for label in LABELS if label in scores):  # a label present nowhere has no row
        s = scores[label]
        cells = [label] + [_number(s.get(key)) for key, _ in TABLE_COLUMNS] + [_number(s.get("macc"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _challenge_lines(ch: dict[str, Any]) -> list[str]:
    """The official summary and per-class tables (``nan``-free: undefined is n/a), or why there are none."""
    if not ch.get("murmur"):
        return ["No patient holds both a murmur class (Present/Unknown/Absent) and an outcome: nothing to score.", ""]
    lines = [f"{ch['scored_patients']} patients; decisions: {ch.get('decision', 'decision layer')}. The same "
             "numbers, in the official scores file's layout: [challenge_scores.csv](challenge_scores.csv).", "",
             "| task | AUROC | AUPRC | F-measure | accuracy | weighted accuracy | cost |", "|---|---|---|---|---|---|---|"]
    for task in ("murmur", "outcome"):
        t = ch[task]
        lines.append(f"| {task} | " + " | ".join(_number(t[k]) for k in ("auroc", "auprc", "f_measure", "accuracy",
                                                                        "weighted_accuracy", "cost")) + " |")
    lines += ["", "| class | AUROC | AUPRC | F-measure | accuracy (recall) |", "|---|---|---|---|---|"]
    for task in ("murmur", "outcome"):
        t = ch[task]
        for c in t["classes"]:
            lines.append(f"| {c} | " + " | ".join(_number(t[k][c]) for k in ("auroc_classes", "auprc_classes",
                                                                             "f_measure_classes", "accuracy_classes"))
                         + " |")
    return lines + [""]


def write_report(out_dir: str | Path, results: Mapping[str, Any], levels: Mapping[str, LevelPredictions],
                 metrics_log: str | Path | None = None, figures: bool = True) -> list[Path]:
    """Write the figures (``out_dir/figures/*.png``) and ``out_dir/report.md``; returns the figure paths.

    ``results`` is `evaluation.evaluate`'s dictionary, ``levels`` the predictions behind it.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    made: dict[str, list[Path]] = {}
    if figures:
        for label in (label for label in LABELS if label in results["levels"].get("patient", {})):
            made[label] = [
                plot_confusion_matrices({lvl: results["levels"][lvl][label] for lvl in levels}, label,
                                        fig_dir / f"confusion_{label}.png"),
                plot_roc_pr(levels, label, fig_dir / f"roc_pr_{label}.png"),
            ]
        # The tuned-threshold F1 belongs on the training curves only when it was measured on the same split.
        tuned_f1 = ({label: results["levels"].get("recording", {}).get(label, {}).get("f1") for label in LABELS}
                    if results.get("split") == "val" else None)
        curves = plot_training_curves(metrics_log, fig_dir / "training_curves.png", results.get("epoch"),
                                      tuned_f1) if metrics_log else None
        if curves is not None:
            made["training"] = [curves]
        if results.get("calibration"):
            made["calibration"] = [plot_reliability(results["calibration"], fig_dir / "reliability.png")]

    t, ch = results["thresholds"], results["challenge"]
    patient_model = bool(results.get("patient_model"))
    how = (f"tuned on the validation {'patients' if patient_model else 'recordings'} ({results['threshold_objective']})"
           if results["thresholds_tuned"]
           else "default 0.5: the model file holds no tuned thresholds")
    counts = results["counts"]
    lines = [
        "# Evaluation report", "",
        f"- model: `{results['model']}`" + (f" (epoch {results['epoch']})" if results.get("epoch") is not None else ""),
        f"- data: `{results['data']}` ({results['format']}), split: {results['split']}",
        ("- a patient model: gated attention over every window of a patient's recordings gives the patient's "
         "probabilities; each recording row carries its patient's" if patient_model else
         f"- windows → recordings: mean probability; recordings → patients: {results['aggregation']}"),
        f"- thresholds: heart {t['heart']:.3f}, murmur {t['murmur']:.3f} ({how})",
        f"- evaluated: {counts['patient']} patients, {counts['recording']} recordings, {counts['window']} windows",
        "", "## 2022 Challenge scores (official definitions)", "",
        *_challenge_lines(ch),
        "## The project's own figures", "",
        "Per-label scores at the tuned thresholds (these are not Challenge scores: the murmur label is binary, "
        "its Unknown patients left out). Scores use only present labels; a label present nowhere has no row. A "
        "ratio with a zero denominator (e.g. recall without positives) and AUROC/AUPRC of a level holding one "
        "class only are n/a (null in metrics.json), never 0.0.", "",
        "| score | value |", "|---|---|",
        f"| 2016 MAcc, heart, per recording | {_number(results.get('project', {}).get('heart_macc'))} |", "",
    ]
    for level in ("patient", "recording", "window"):
        if level in results["levels"]:
            lines += [f"## {LEVEL_TITLES[level].capitalize()}", "", *_table(results["levels"][level]), ""]
    if results.get("heads"):
        lines += heads_report_lines(results["heads"])
        if figures and "segmentation" in results["heads"]:
            lines += ["![heart-cycle states](figures/heart_cycle.png)", "",
                      "One window of one recording: its log-mel, the predicted heart-cycle states (and the annotated "
                      "ones, where the recording has a .tsv), and the attention weights of the pooling.", ""]
    if made:
        lines += ["## Figures", ""]
        for label in LABELS:
            for p in made.get(label, []):
                lines += [f"![{label}: {p.stem.replace('_', ' ')}](figures/{p.name})", ""]
        for p in made.get("training", []):
            lines += ["### Training curves", "", f"![training curves](figures/{p.name})", "",
                      "Dashed line: the best epoch by the run's monitored score (the best checkpoint); dash-dotted, the "
                      "checkpoint evaluated here when it is another. The F1 curves are what training logs each epoch: "
                      "solid, validation recordings at that epoch's tuned thresholds; dotted, windows at threshold "
                      "0.5; the stars are this report's recording F1 at the tuned thresholds.",
                      ""]
    if results.get("calibration"):
        cal = results["calibration"]
        lines += ["## Calibration", "",
                  f"Expected calibration error per label on the {cal['level']}s ({cal['bins']} equal-width bins), "
                  f"before and after temperature scaling ({cal['source']}; "
                  f"{'used' if cal['applied'] else 'not used'} for the decisions above):", "",
                  "| label | T | ECE before | ECE after |", "|---|---|---|---|",
                  *[f"| {label} | {cal['temperatures'][label]:.4g} | {_number(cal['ece_before'].get(label))} | "
                    f"{_number(cal['ece_after'].get(label))} |" for label in LABELS], ""]
        for p in made.get("calibration", []):
            lines += [f"![reliability diagram](figures/{p.name})", "",
                      "Each point is a bin of predicted probabilities: x its mean, y the share of positives in it; "
                      "its shaded area grows with its count. On the diagonal a model is calibrated; below it "
                      "over-confident in the positive class.", ""]
    if results.get("warnings"):
        lines += ["## Warnings", "", *[f"- {w}" for w in results["warnings"]], ""]
    lines += ["Per-patient predictions: [patients.csv](patients.csv); per recording: [recordings.csv](recordings.csv); "
              "every number: [metrics.json](metrics.json).", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return [p for paths in made.values() for p in paths]
