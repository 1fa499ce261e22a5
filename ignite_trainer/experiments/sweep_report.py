"""``SWEEP_DIR/report/``: the trials table, the best trial, two figures and a config that re-runs the best trial.

Written from the study in storage alone (plus each trial's ``config.yaml``), so any worker, or a later
``sweep`` call with the budget spent, writes the same report. Figures use matplotlib; parameter
importances come from Optuna's evaluator, which needs at least two complete trials that differ.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.experiments.space import SweepSpace
from ignite_trainer.experiments.workers import counted_trials

REPORT_DIR = "report"
BEST_RUNS_DIR = "best"


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, never touching pyplot's global state (as `ignite_trainer.use.report` does)."""
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path)
    return path


def reported_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials less surplus ones (claimed after the budget was full; they never trained)."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


def write_sweep_report(study: optuna.Study, space: SweepSpace, sweep_dir: str | Path) -> dict[str, Any]:
    """Write trials.csv, summary.json, history.png, importance.png (when computable) and best.yaml.

    Returns the summary: the trials (``counted``: those using the budget, less dead ones replaced by
    a retry), counts per state, the objective, the best trial (number, score, params,
    run_dir) or None, the importances (or why there are none) and the files written.

    Example::

        summary = write_sweep_report(optuna.load_study(study_name="lr", storage=url), space, "sweeps/lr")
    """
    out = Path(sweep_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    trials = reported_trials(study)
    files = {"trials": str(write_trials_csv(trials, space, out / "trials.csv"))}
    history = plot_history(trials, space, out / "history.png")
    if history is not None:
        files["history"] = str(history)
    importances, why = param_importances(study, space)
    if importances:
        files["importance"] = str(plot_importances(importances, out / "importance.png"))

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        pick = max if space.direction == "maximize" else min
        trial = pick(complete, key=lambda t: (t.value, -t.number) if space.direction == "maximize" else (t.value, t.number))
        best = {"number": trial.number, "score": trial.value, "params": trial.params,
                "run_dir": trial.user_attrs.get("run_dir")}
        best_yaml = write_best_config(trial, Path(sweep_dir), out / "best.yaml")
        if best_yaml is not None:
            files["best_config"] = str(best_yaml)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    summary = {
        "study": study.study_name, "objective": {"metric": space.metric, "direction": space.direction},
        "trials": len(trials), "counted": len(counted_trials(trials)), "states": counts, "best": best,
        "importances": importances or None, "importances_note": why, "files": files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def write_trials_csv(trials: list[FrozenTrial], space: SweepSpace, path: Path) -> Path:
    names = [p.name for p in space.params]
    columns = ["number", "state", "score", "epochs", "seconds", "run_dir", "retry_of", "reason"] + names
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for t in trials:
            reason = t.user_attrs.get("fail_reason", "")
            if t.number in retried_as:
                reason = f"{reason or 'its worker stopped'}; retried as trial {retried_as[t.number]}"
            score = t.value if t.state == TrialState.COMPLETE else t.user_attrs.get("score")
            writer.writerow({
                "number": t.number, "state": t.state.name.lower(), "score": "" if score is None else score,
                "epochs": t.user_attrs.get("epochs", ""), "seconds": t.user_attrs.get("seconds", ""),
                "run_dir": t.user_attrs.get("run_dir", ""), "retry_of": t.user_attrs.get("retry_of", ""),
                "reason": reason, **{n: t.params.get(n, "") for n in names},
            })
    return path


def plot_history(trials: list[FrozenTrial], space: SweepSpace, path: Path) -> Path | None:
    """Each finished trial's score by trial number (pruned ones hollow), and the best so far as a step line."""
    scored = [(t.number, t.value if t.state == TrialState.COMPLETE else t.user_attrs.get("score"), t.state)
              for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    scored = [(n, v, s) for n, v, s in scored if v is not None and math.isfinite(v)]
    if not scored:
        return None
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    for state, style in ((TrialState.COMPLETE, dict(color="C0")), (TrialState.PRUNED, dict(facecolors="none", edgecolors="C1"))):
        points = [(n, v) for n, v, s in scored if s == state]
        if points:
            ax.scatter(*zip(*points), label=state.name.lower(), **style)
    complete = [(n, v) for n, v, s in scored if s == TrialState.COMPLETE]
    if complete:
        pick = max if space.direction == "maximize" else min
        best, xs, ys = None, [], []
        for n, v in complete:
            best = v if best is None else pick(best, v)
            xs.append(n)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C2", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{space.metric} (best epoch)")
    ax.set_title(f"optimisation history ({space.direction})")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def param_importances(study: optuna.Study, space: SweepSpace) -> tuple[dict[str, float], str | None]:
    """Optuna's fANOVA importances (seeded), or ``({}, why)`` when too few complete trials differ."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(complete) < 2:
        return {}, f"needs at least 2 complete trials, the study has {len(complete)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=space.seed))
    except (RuntimeError, ValueError) as e:
        return {}, str(e).strip().splitlines()[0]
    values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    if not values:
        return {}, "no parameter varied among the complete trials"
    return values, None


def plot_importances(importances: dict[str, float], path: Path) -> Path:
    names = list(importances)[::-1]
    fig = _figure(6, 1 + 0.4 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("parameter importances")
    return _save(fig, path)


def write_best_config(trial: FrozenTrial, sweep_dir: Path, path: Path) -> Path | None:
    """The best trial's own ``config.yaml`` under a fresh run name (``SWEEP_DIR/best/trial_NNNN``):
    ``train --config best.yaml`` trains it again from scratch, to the same score."""
    run_dir = trial.user_attrs.get("run_dir")
    source = RunDirectory(Path(run_dir)).config_file if run_dir else None
    if source is None or not source.is_file():
        return None
    config = TrainConfig.from_yaml(source).updated(
        {"output_dir": str(sweep_dir / BEST_RUNS_DIR), "name": f"trial_{trial.number:04d}"}, source=str(source))
    path.write_text(config.to_yaml())
    return path
