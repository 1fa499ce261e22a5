"""report: PNG figures that hold something, and report.md tables and links that match the results."""

import json
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.image import imread

from ignite_trainer.scoring.decision import DecisionLayer
from ignite_trainer.use.evaluation import challenge_section, level_scores
from conftest import level_predictions
from ignite_trainer.use.report import (
    plot_confusion_matrices, plot_roc_pr, plot_training_curves, read_metrics_log, write_report,
)


def level(name, probs, targets, mask=None, classes=None):
    return level_predictions(probs, targets, mask, classes, level=name, id_prefix=name)


def _levels():
    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("window", 60), ("recording", 20), ("patient", 8)):
        y = (np.arange(n) % 2).astype(float)
        p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, n), 0, 1)
        out[name] = level(name, np.stack([p, p[::-1]], 1), np.stack([y, y[::-1]], 1))
    return out


def _drawn(path: Path) -> np.ndarray:
    """The image as an array, checked to be a real PNG with more than a blank canvas."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # not a blank page
    return image


def test_confusion_matrices_figure(tmp_path):
    scores = {"recording": {"tp": 3, "fp": 1, "fn": 2, "tn": 4, "threshold": 0.4},
              "patient": {"tp": 0, "fp": 0, "fn": 0, "tn": 0, "threshold": 0.4}}  # an empty level must not crash
    image = _drawn(plot_confusion_matrices(scores, "heart", tmp_path / "cm.png"))
    assert image.shape[1] > image.shape[0]  # panels side by side


def test_roc_pr_figure_handles_single_class_levels(tmp_path):
    levels = _levels()
    levels["patient"] = level("patient", [[0.2, 0.2], [0.7, 0.7]], [[1, 1], [1, 1]])  # one class: no curve
    _drawn(plot_roc_pr(levels, "murmur", tmp_path / "roc.png"))


def test_training_curves_from_metrics_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "lr": 1e-3 / e, "macro_f1": 0.1 * e,
                         "heart": {"f1": 0.1 * e}, "murmur": {"f1": None}}) for e in range(1, 5)]
    log.write_text("\n".join(lines) + '\n{"epoch": 5, "train_lo')  # a line cut by a kill
    assert [r["epoch"] for r in read_metrics_log(log)] == [1, 2, 3, 4]
    _drawn(plot_training_curves(log, tmp_path / "curves.png"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_training_curves(empty, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_report_does_not_touch_the_global_backend(tmp_path):
    before = matplotlib.get_backend()
    plot_roc_pr(_levels(), "heart", tmp_path / "roc.png")
    assert matplotlib.get_backend() == before


def _results(levels, thresholds):
    return {
        "model": "m.pt", "epoch": 3, "data": "d", "format": "circor2022", "split": "val", "aggregation": "mean",
        "thresholds": thresholds, "thresholds_tuned": True, "threshold_objective": "f1", "unknown_margin": 0.1,
        "counts": {k: len(v) for k, v in levels.items()},
        "levels": {k: level_scores(v, thresholds) for k, v in levels.items()},
        "challenge": {**challenge_section(levels["patient"], levels["recording"],
                                          DecisionLayer.legacy(thresholds["murmur"], thresholds["heart"], 0.1))[0],
                      "decision": "legacy rule"},
        "project": {"heart_macc": 0.5},
        "warnings": ["x.wav: 1.00 s is shorter than one 4 s window; zero-padded to one window"],
    }


def test_report_md_tables_and_links(tmp_path):
    levels = _levels()
    thresholds = {"heart": 0.45, "murmur": 0.55}
    results = _results(levels, thresholds)
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "lr": 1e-3, "macro_f1": 0.2,
                               "heart": {"f1": 0.3}, "murmur": {"f1": 0.1}}) + "\n")
    figures = write_report(tmp_path, results, levels, log)
    text = (tmp_path / "report.md").read_text()

    assert {p.name for p in figures} == {"confusion_heart.png", "confusion_murmur.png", "roc_pr_heart.png",
                                         "roc_pr_murmur.png", "training_curves.png"}
    for link in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (tmp_path / link).is_file()
    patient_section = text.split("## Patients")[1].split("##")[0]
    heart_row = next(line for line in patient_section.splitlines() if line.startswith("| heart"))
    cells = [c.strip() for c in heart_row.strip("|").split("|")]
    s = results["levels"]["patient"]["heart"]
    assert cells[1] == str(s["support"]) and cells[7] == f"{s['f1']:.3f}" and cells[8] == f"{s['auroc']:.3f}"
    assert cells[10] == f"{s['macc']:.3f}"
    assert "heart 0.450, murmur 0.550 (tuned on the validation recordings (f1))" in text
    assert "No patient holds both a murmur class" in text  # _levels() has no CirCor murmur classes
    assert "| 2016 MAcc, heart, per recording | 0.500 |" in text.split("## The project's own figures")[1]
    assert "zero-padded" in text.split("## Warnings")[1]


def test_report_without_figures_writes_only_markdown(tmp_path):
    levels = _levels()
    write_report(tmp_path, _results(levels, {"heart": 0.5, "murmur": 0.5}), levels, None, figures=False)
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "figures").exists()
    assert "![" not in (tmp_path / "report.md").read_text()


def test_report_shows_the_official_scores_per_task_and_class(tmp_path):
    classes = ["Present", "Unknown", "Absent", "Absent"]
    levels = _levels()
    levels["patient"] = level("patient", [[0.5, 0.9]] * 4, [[1, 1], [0, 0], [0, 0], [1, 0]],
                              [[True, True], [True, False], [True, True], [True, True]], classes)
    results = _results(levels, {"heart": 0.5, "murmur": 0.3})
    write_report(tmp_path, results, levels, figures=False)
    text = (tmp_path / "report.md").read_text()
    section = text.split("## 2022 Challenge scores (official definitions)")[1].split("## The project's")[0]
    murmur = results["challenge"]["murmur"]
    row = next(line for line in section.splitlines() if line.startswith("| murmur |"))
    assert row.split("|")[6].strip() == f"{murmur['weighted_accuracy']:.3f}"
    assert next(line for line in section.splitlines() if line.startswith("| Unknown |"))
    assert "challenge_scores.csv" in section


# ---------------------------------------------------------------------------------------------- what figures say
def _captured(monkeypatch):
    """The `Figure` objects the report draws, kept instead of only written, so their content can be read."""
    import ignite_trainer.use.report as report

    figures = []
    real_save = report._save

    def keep(fig, path):
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return figures


def _texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in ax.texts] + ([t.get_text() for t in legend.get_texts()] if legend else [])


def test_best_epoch_follows_the_monitor_and_keeps_the_first_of_equals():
    from ignite_trainer.use.report import best_epoch

    records = [{"epoch": 1, "val_loss": 0.7, "macro_f1": 0.2, "murmur": {"f1": 0.1}},
               {"epoch": 2, "val_loss": 0.5, "macro_f1": 0.4, "murmur": {"f1": None}},
               {"epoch": 3, "val_loss": 0.5, "macro_f1": 0.6, "murmur": {"f1": 0.3}},
               {"epoch": 4, "val_loss": 0.9, "macro_f1": 0.6, "murmur": {"f1": 0.2}}]
    assert best_epoch(records, "val_loss") == 2
    assert best_epoch(records, "macro_f1") == 3
    assert best_epoch(records, "murmur.f1") == 3
    assert best_epoch(records, "heart.f1") is None


def test_training_curves_mark_the_best_epoch_the_checkpoint_and_say_what_f1_is(tmp_path, monkeypatch):
    figures = _captured(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("monitor: macro_f1\n")
    scores = {1: 0.1, 2: 0.5, 3: 0.3, 4: 0.2}
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "lr": 1e-3, "macro_f1": f,
                    "heart": {"f1": f}, "murmur": {"f1": f}}) + "\n" for e, f in scores.items()))

    _drawn(plot_training_curves(run / "metrics.jsonl", tmp_path / "a.png", checkpoint_epoch=2,
                                tuned_f1={"heart": 0.8, "murmur": None}))
    loss_ax, f1_ax, lr_ax = figures[-1].axes
    for ax in (loss_ax, f1_ax, lr_ax):
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"
                and len(set(line.get_xdata())) == 1] == [2]  # one vertical line, at the best epoch
    assert "best macro_f1: epoch 2 = checkpoint used" in _texts(loss_ax)
    assert "windows at threshold 0.5" in f1_ax.get_title()
    stars = [line for line in f1_ax.get_lines() if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in stars] == [([2], [0.8])]  # murmur: none measured

    _drawn(plot_training_curves(run / "metrics.jsonl", tmp_path / "b.png", checkpoint_epoch=4))
    texts = _texts(figures[-1].axes[0])
    assert "best macro_f1: epoch 2" in texts and "checkpoint used: epoch 4" in texts


def test_training_curves_draw_the_tuned_threshold_f1_of_each_epoch(tmp_path, monkeypatch):
    figures = _captured(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("monitor: val_loss\n")
    tuned = {1: 0.4, 2: None, 3: 0.7}  # epoch 2: undefined on the split, a gap and never a 0
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "train_loss": 1.0, "val_loss": 1 / e, "lr": 1e-3, "macro_f1": 0.0,
                    "heart": {"f1": 0.0, "at_threshold": {"f1": f}}, "murmur": {"f1": 0.0}}) + "\n"
        for e, f in tuned.items()))
    _drawn(plot_training_curves(run / "metrics.jsonl", tmp_path / "t.png"))
    f1_ax = figures[-1].axes[1]
    [curve] = [line for line in f1_ax.get_lines() if line.get_label() == "heart (recordings, tuned threshold)"]
    ys = list(curve.get_ydata())
    assert ys[0] == 0.4 and math.isnan(ys[1]) and ys[2] == 0.7
    assert "solid: recordings, the epoch's tuned thresholds; dotted: windows at 0.5" in f1_ax.get_title()
    assert not any("murmur (recordings" in line.get_label() for line in f1_ax.get_lines())  # none logged


def test_confusion_matrices_name_the_classes(tmp_path, monkeypatch):
    figures = _captured(monkeypatch)
    scores = {"patient": {"tp": 3, "fp": 1, "fn": 2, "tn": 4, "threshold": 0.4}}
    for label, names in (("murmur", ["Absent", "Present"]), ("heart", ["Normal", "Abnormal"])):
        plot_confusion_matrices(scores, label, tmp_path / f"{label}.png")
        ax = figures[-1].axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert [t.get_text() for t in ax.get_yticklabels()] == names


def test_a_pr_panel_with_one_class_explains_itself(tmp_path, monkeypatch):
    figures = _captured(monkeypatch)
    levels = {"patient": level("patient", [[0.2, 0.2], [0.7, 0.7], [0.4, 0.4]], [[1, 0], [1, 0], [1, 0]])}
    _drawn(plot_roc_pr(levels, "murmur", tmp_path / "one.png"))
    roc_ax, pr_ax = figures[-1].axes
    for ax in (roc_ax, pr_ax):
        note = " ".join(t.get_text() for t in ax.texts)
        assert "no curve: one class only" in note and "patients: all 3 Absent" in note
    assert "patients: all 3 Absent, no curve" in _texts(pr_ax)

    _drawn(plot_roc_pr(_levels(), "murmur", tmp_path / "both.png"))  # both classes: curves and no note
    assert len(figures[-1].axes[1].texts) == 0 and len(figures[-1].axes[1].get_lines()) >= 3
