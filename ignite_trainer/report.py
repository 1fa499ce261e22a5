"""The human-readable side of an evaluation: PNG figures and ``report.md`` linking them with the tables.

Figures are drawn on matplotlib `Figure` objects with the Agg canvas directly (no ``pyplot``), so making a
report never changes the caller's global backend, works on machines without a display, and is safe to
call from several threads. Nothing here computes a score: the numbers come from `evaluation`'s results,
the curves from scikit-learn's ``roc_curve`` / ``precision_recall_curve`` over the same predictions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from ignite_trainer.data.records import LABELS
from ignite_trainer.predictions import LevelPredictions

__all__ = ["plot_confusion_matrices", "plot_roc_pr", "plot_training_curves", "read_metrics_log", "write_report"]

LEVEL_TITLES = {"window": "windows", "recording": "recordings", "patient": "patients"}
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
        ax.set_xticks([0, 1], ["negative", "positive"])
        ax.set_yticks([0, 1], ["negative", "positive"])
        ax.set_xlabel(f"predicted (p ≥ {s['threshold']:.3g})")
        ax.set_ylabel("true")
        ax.set_title(f"{LEVEL_TITLES.get(level, level)} (n={int(counts.sum())})")
    fig.suptitle(f"{label}: confusion matrices")
    return _save(fig, Path(path))


def plot_roc_pr(levels: Mapping[str, LevelPredictions], label: str, path: str | Path) -> Path:
    """ROC and precision-recall curves of ``label``, one line per level; a single-class level gets none."""
    fig = _figure(9.0, 4.0)
    roc_ax, pr_ax = fig.subplots(1, 2)
    roc_ax.plot([0, 1], [0, 1], ls=":", color="black", lw=0.8)
    for level, preds in levels.items():
        y, p = preds.label(label)
        name = LEVEL_TITLES.get(level, level)
        if y.size == 0 or y.min() == y.max():
            roc_ax.plot([], [], color=LEVEL_COLOURS.get(level), label=f"{name}: one class only, no curve")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        precision, recall, _ = precision_recall_curve(y, p)
        colour = LEVEL_COLOURS.get(level)
        roc_ax.plot(fpr, tpr, color=colour, label=f"{name} (n={y.size})")
        pr_ax.step(recall, precision, where="post", color=colour, label=f"{name} (prevalence {y.mean():.2f})")
        pr_ax.axhline(y.mean(), color=colour, ls=":", lw=0.8)
    roc_ax.set(xlabel="false positive rate (1 − specificity)", ylabel="true positive rate (sensitivity)",
               xlim=(0, 1), ylim=(0, 1.02), title=f"{label}: ROC")
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
              title=f"{label}: precision-recall")
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if ax is roc_ax else "best", fontsize=8)
    return _save(fig, Path(path))


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """The epochs of a run's ``metrics.jsonl`` (lines cut short by a kill are skipped)."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "epoch" in record:
            records.append(record)
    return records


def _series(records: Sequence[Mapping[str, Any]], *keys: str) -> list[float]:
    out = []
    for r in records:
        value: Any = r
        for k in keys:
            value = value.get(k) if isinstance(value, Mapping) else None
        out.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan)
    return out


def plot_training_curves(metrics_log: str | Path, path: str | Path) -> Path | None:
    """Losses, per-label and macro F1, and the learning rate per epoch; None when the log has no epoch.

    Example::

        plot_training_curves("runs/quick/metrics.jsonl", "runs/quick/report/figures/training_curves.png")
    """
    records = read_metrics_log(metrics_log)
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig = _figure(12.0, 3.6)
    loss_ax, f1_ax, lr_ax = fig.subplots(1, 3)
    marker = "o" if len(epochs) < 30 else None
    loss_ax.plot(epochs, _series(records, "train_loss"), marker=marker, label="train")
    loss_ax.plot(epochs, _series(records, "val_loss"), marker=marker, label="validation")
    loss_ax.set(title="loss", xlabel="epoch", ylabel="masked weighted BCE")
    for label in LABELS:
        f1_ax.plot(epochs, _series(records, label, "f1"), marker=marker, label=label)
    f1_ax.plot(epochs, _series(records, "macro_f1"), ls="--", color="black", label="macro")
    f1_ax.set(title="validation F1 (threshold 0.5, windows)", xlabel="epoch", ylabel="F1", ylim=(-0.02, 1.02))
    lr_ax.plot(epochs, _series(records, "lr"), marker=marker, color="tab:green")
    lr_ax.set(title="learning rate", xlabel="epoch")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, f1_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.legend(fontsize=8)
    f1_ax.legend(fontsize=8)
    return _save(fig, Path(path))


# ---------------------------------------------------------------------------------------------- report.md
def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def _table(scores: Mapping[str, Mapping[str, Any]]) -> list[str]:
    header = ["label"] + [title for _, title in TABLE_COLUMNS] + ["MAcc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in LABELS:
        s = scores[label]
        cells = [label] + [_number(s.get(key)) for key, _ in TABLE_COLUMNS] + [_number(s.get("macc"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(out_dir: str | Path, results: Mapping[str, Any], levels: Mapping[str, LevelPredictions],
                 metrics_log: str | Path | None = None, figures: bool = True) -> list[Path]:
    """Write the figures (``out_dir/figures/*.png``) and ``out_dir/report.md``; returns the figure paths.

    ``results`` is `evaluation.evaluate`'s dictionary, ``levels`` the predictions behind it.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    made: dict[str, list[Path]] = {}
    if figures:
        for label in LABELS:
            made[label] = [
                plot_confusion_matrices({lvl: results["levels"][lvl][label] for lvl in levels}, label,
                                        fig_dir / f"confusion_{label}.png"),
                plot_roc_pr(levels, label, fig_dir / f"roc_pr_{label}.png"),
            ]
        curves = plot_training_curves(metrics_log, fig_dir / "training_curves.png") if metrics_log else None
        if curves is not None:
            made["training"] = [curves]

    t, ch = results["thresholds"], results["challenge"]
    how = (f"tuned on the validation recordings ({results['threshold_objective']})" if results["thresholds_tuned"]
           else "default 0.5: the model file holds no tuned thresholds")
    counts = results["counts"]
    lines = [
        "# Evaluation report", "",
        f"- model: `{results['model']}`" + (f" (epoch {results['epoch']})" if results.get("epoch") is not None else ""),
        f"- data: `{results['data']}` ({results['format']}), split: {results['split']}",
        f"- windows → recordings: mean probability; recordings → patients: {results['aggregation']}",
        f"- thresholds: heart {t['heart']:.3f}, murmur {t['murmur']:.3f} ({how})",
        f"- evaluated: {counts['patient']} patients, {counts['recording']} recordings, {counts['window']} windows",
        "", "## Challenge scores", "", "| score | value |", "|---|---|",
        f"| 2016 MAcc, heart, per recording | {_number(ch['heart_macc'])} |",
    ]
    if ch["murmur_scoring"] == "three_class":
        low, high = ch["murmur_unknown_band"]
        form = f"Present/Unknown/Absent 5/3/1; Unknown for murmur probability in [{low:.3f}, {high:.3f})"
    else:
        form = "binary 5/1: the truth holds no Unknown" if ch["murmur_scoring"] == "binary" else "no murmur labels"
    lines += [
        f"| 2022 murmur weighted accuracy, per patient ({form}) | {_number(ch['murmur_weighted_accuracy'])} |",
        f"| 2022 outcome cost per patient (lower is better) | {_number(ch['outcome_cost'])} |", "",
        "Scores use only present labels; a zero denominator gives 0.0, and AUROC/AUPRC are 0.0 when a level holds "
        "one class only.", "",
    ]
    for level in ("patient", "recording", "window"):
        if level in results["levels"]:
            lines += [f"## {LEVEL_TITLES[level].capitalize()}", "", *_table(results["levels"][level]), ""]
    if made:
        lines += ["## Figures", ""]
        for label in LABELS:
            for p in made.get(label, []):
                lines += [f"![{label}: {p.stem.replace('_', ' ')}](figures/{p.name})", ""]
        for p in made.get("training", []):
            lines += ["### Training curves", "", f"![training curves](figures/{p.name})", ""]
    if results.get("warnings"):
        lines += ["## Warnings", "", *[f"- {w}" for w in results["warnings"]], ""]
    lines += ["Per-patient predictions: [patients.csv](patients.csv); per recording: [recordings.csv](recordings.csv); "
              "every number: [metrics.json](metrics.json).", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return [p for paths in made.values() for p in paths]
