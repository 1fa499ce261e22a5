"""What a model with auxiliary heads adds to evaluate and predict: descriptor and heart-cycle scores, per-patient
descriptor predictions, and a figure of one recording's predicted heart-cycle states.

The scores are `ignite_trainer.scoring.head_scores`'; this module only arranges them for ``metrics.json``,
``report.md``, ``attributes.csv`` and ``figures/heart_cycle.png``.

Example::

    run = run_windows(trained, recordings)
    section = heads_section(run, recordings_level)            # -> results["heads"]
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ignite_trainer.core.vocabulary import HEART_STATES, MURMUR_ATTRIBUTES
from ignite_trainer.scoring.head_scores import attribute_scores, patient_probabilities, recording_probabilities, \
    segmentation_scores
from ignite_trainer.scoring.predictions import LevelPredictions
from ignite_trainer.data.annotations import frame_states, read_states
from ignite_trainer.data.datasets import EvalWindows
from ignite_trainer.training.head_metrics import WindowHeads

__all__ = ["heads_section", "heads_report_lines", "write_attributes_csv", "plot_heart_cycle"]

#: Colours of the four states in the figure.
STATE_COLOURS = ("tab:red", "tab:orange", "tab:blue", "tab:green")


def _murmur_prob(dataset: EvalWindows, recordings_level: LevelPredictions) -> np.ndarray:
    prob = dict(zip(recordings_level.ids, recordings_level.probs[:, 1]))
    return np.array([prob[r.recording_id] for r in dataset.recordings])


def heads_section(heads: WindowHeads, dataset: EvalWindows, recordings_level: LevelPredictions) -> dict[str, Any]:
    """``{"attributes": {head: scores}, "segmentation": scores}`` for the heads the model has."""
    section: dict[str, Any] = {}
    murmur = _murmur_prob(dataset, recordings_level)
    if heads.attributes:
        section["attributes"] = {head: attribute_scores(probs, dataset.window_recording, dataset.recordings, murmur, head)
                                 for head, probs in heads.attributes.items()}
    if heads.state_confusion is not None:
        section["segmentation"] = segmentation_scores(heads.state_confusion)
    return section


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def heads_report_lines(section: Mapping[str, Any]) -> list[str]:
    """The ``report.md`` part: descriptor balanced accuracies and confusion matrices, heart-cycle F1."""
    lines: list[str] = []
    attributes = section.get("attributes") or {}
    if attributes:
        lines += ["## Murmur descriptors", "",
                  "Balanced accuracy (mean recall over the classes present) on the patients (and recordings) each "
                  "descriptor is known for: Present patients, at their murmur locations. A patient's prediction is "
                  "the murmur-probability-weighted mean of its recordings'.", "",
                  "| descriptor | patients | balanced accuracy | recordings | balanced accuracy |", "|---|---|---|---|---|"]
        for head, s in attributes.items():
            p, r = s["patient"], s["recording"]
            lines.append(f"| {head} | {p['support']} | {_number(p['balanced_accuracy'])} | {r['support']} | "
                         f"{_number(r['balanced_accuracy'])} |")
        lines.append("")
        for head, s in attributes.items():
            classes = s["patient"]["classes"]
            lines += [f"### {head}: patients, true (rows) x predicted", "", "| | " + " | ".join(classes) + " |",
                      "|---" * (len(classes) + 1) + "|"]
            lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |"
                      for c, row in zip(classes, s["patient"]["confusion"])]
            lines.append("")
    seg = section.get("segmentation")
    if seg:
        lines += ["## Heart-cycle segmentation", "",
                  f"Over {seg['frames']} annotated frames: accuracy {_number(seg['frame_accuracy'])}, "
                  f"macro F1 {_number(seg['macro_f1'])}.", "", "| state | F1 |", "|---|---|"]
        lines += [f"| {state} | {_number(v)} |" for state, v in seg["f1"].items()]
        lines.append("")
    return lines


def write_attributes_csv(heads: WindowHeads, dataset: EvalWindows, recordings_level: LevelPredictions,
                         path: str | Path) -> Path:
    """``attributes.csv``: per patient and descriptor, the predicted class and every class's probability."""
    murmur = _murmur_prob(dataset, recordings_level)
    rows = []
    for head, probs in heads.attributes.items():
        classes = MURMUR_ATTRIBUTES[head][1]
        rec = recording_probabilities(probs, dataset.window_recording, len(dataset.recordings))
        patients, pat = patient_probabilities(rec, dataset.recordings, murmur)
        for pid, p in zip(patients, pat):
            rows.append([pid, head, classes[int(p.argmax())],
                         ";".join(f"{c}={v:.4f}" for c, v in zip(classes, p))])
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["patient_id", "descriptor", "prediction", "probabilities"])
        writer.writerows(rows)
    return path


@torch.inference_mode()
def plot_heart_cycle(model: torch.nn.Module, dataset: EvalWindows, path: str | Path, recording: int | None = None) -> Path:
    """One window of one recording (the first with a ``.tsv``, else the first): its log-mel, the predicted
    heart-cycle states under it (the annotated ones beneath where there is a ``.tsv``), the attention weights."""
    if recording is None:
        recording = next((i for i, r in enumerate(dataset.recordings) if r.segmentation_path is not None), 0)
    window = dataset.window_recording.index(recording)
    x = dataset[window][0].unsqueeze(0)
    model = model.eval()
    device = next(model.parameters()).device
    _, attention, outputs = model(x.to(device), auxiliary=True)
    predicted = outputs["segmentation"].argmax(dim=1)[0].cpu().numpy()
    attention = attention[0].float().cpu().numpy()
    rec = dataset.recordings[recording]
    fps = dataset.cache.settings.frames_per_second
    seconds = x.shape[-1] / fps
    fig = Figure(figsize=(9, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_mel, ax_states, ax_att = fig.subplots(3, 1, sharex=True, height_ratios=(4, 1, 1.4))
    ax_mel.imshow(x[0].numpy(), origin="lower", aspect="auto", extent=(0, seconds, 0, x.shape[1]), cmap="magma")
    ax_mel.set_ylabel("mel band")
    ax_mel.set_title(f"{rec.recording_id}: log-mel, heart-cycle states, attention")
    rows = [("predicted", np.repeat(predicted, int(np.ceil(x.shape[-1] / len(predicted))))[:x.shape[-1]])]
    if rec.segmentation_path is not None:
        start = dataset.window_start[window]
        truth = frame_states(read_states(rec.segmentation_path), dataset.n_frames[recording], fps)
        rows.append(("annotated", truth[start:start + x.shape[-1]]))
    for k, (name, states) in enumerate(rows):
        for s, colour in enumerate(STATE_COLOURS):
            on = np.flatnonzero(np.asarray(states) == s)
            ax_states.bar(on / fps, 0.8, width=1 / fps, bottom=len(rows) - 1 - k, color=colour, align="edge")
    ax_states.set_yticks([len(rows) - 1 - k + 0.4 for k in range(len(rows))], [name for name, _ in rows])
    ax_states.legend(handles=[Patch(color=c, label=n) for c, n in zip(STATE_COLOURS, HEART_STATES)],
                     loc="upper right", ncol=4, fontsize=7)
    ax_att.plot((np.arange(len(attention)) + 0.5) * seconds / len(attention), attention, color="black")
    ax_att.set_ylabel("attention")
    ax_att.set_xlabel("time in window (s)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
