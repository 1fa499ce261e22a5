"""Compare runs: one row per run directory, read from the files every run leaves, and config differences.

Nothing here trains or scores; it reads what training and ``evaluate`` wrote:

- ``config.yaml``: model, data, maximum epochs, the monitored score;
- ``metrics.jsonl``: epochs run, the monitored score of each epoch, training and validation seconds;
- ``checkpoints/best_checkpoint_<epoch>_*.pt``: the best epoch (the file ``evaluate`` and ``predict`` use);
- ``checkpoints/last_checkpoint_<epoch>.pt``: its ``finished`` flag (the newest readable one);
- ``report/metrics.json``: the Challenge scores, where the run was evaluated;
- ``train.log`` and ``.lock`` (`run_lock`): whether it failed or is training now.

A run's state, decided in this order:

- **running**: a process holds the run's lock now (`run_lock.is_running`);
- **finished**: the newest checkpoint says ``finished`` and reached the configured epochs;
- **stopped early**: it says ``finished`` before them (early stopping ended it);
- **failed**: otherwise, when the last record of ``train.log`` is an ERROR or CRITICAL one (training logs the
  error that stopped it as its last word; a resume logs on, so an old error no longer counts);
- **interrupted**: anything else: killed, stopped by Ctrl-C or by a hook, or ended before its first
  checkpoint. It resumes with ``train --resume`` from its last checkpoint, if it has one;
- **unreadable**: its ``config.yaml`` is not a readable YAML mapping in UTF-8, or its ``metrics.jsonl``
  is not UTF-8 text: the row's ``note`` names the file and why, and the other runs are listed as usual.

A ``metrics.jsonl`` whose last line is cut short (a kill during the write), or with other lines that are
not epoch records, is read from its whole lines and the row's ``note`` says what is damaged. The epochs a
run trained are the most of its whole log lines and its newest readable last checkpoint, so a cut log line
never turns a finished run into one that stopped early.

Directories without ``config.yaml`` (``mlruns``, ``tb``, stray folders) are not runs and are left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ignite_trainer.core.config import read_yaml_mapping
from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.core.vocabulary import score_sign
from ignite_trainer.runs.checkpoint import (best_checkpoint_file, checkpoint_epoch, last_checkpoint_files,
                                            load_checkpoint)
from ignite_trainer.runs.lock import is_running
from ignite_trainer.runs.logs import last_error
from ignite_trainer.runs.rundir import RunDirectory

__all__ = ["RunRow", "STATES", "is_run_dir", "read_run", "read_runs", "format_table", "rows_as_json", "config_diff",
           "format_diff"]

STATES = ("running", "finished", "stopped early", "failed", "interrupted", "unreadable")
CHALLENGE_KEYS = ("murmur_weighted_accuracy", "outcome_cost", "heart_macc")


@dataclass
class RunRow:
    """What the ``runs`` table shows about one run directory (None: not known or not measured).

    Example::

        row = read_run("runs/quick")
        print(row.state, row.best_epoch, row.monitor, row.best_score)
    """

    name: str
    path: str
    state: str
    model: str | None = None
    data: str | None = None
    epochs_run: int | None = None
    max_epochs: int | None = None
    best_epoch: int | None = None
    monitor: str | None = None
    best_score: float | None = None
    seconds: float | None = None
    challenge: dict[str, Any] | None = None
    error: str | None = None
    #: What could not be read: the reason of an ``unreadable`` row, or the damaged part of a listed run's files.
    note: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------------------------- reading
def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        return read_yaml_mapping(RunDirectory(run_dir).config_file)
    except ConfigError as e:
        raise CheckpointError(f"cannot read the run's config ({e})") from None


def _note(error: Exception, path: Path) -> str:
    """An error about ``path`` as a short note: the file's name instead of its whole path."""
    return str(error).replace(str(path), path.name, 1)


def _score(record: Mapping[str, Any], monitor: str) -> float | None:
    """``val_loss``, ``macro_f1`` or ``<label>.<metric>`` of one metrics.jsonl record."""
    value: Any = record.get(monitor)
    if value is None and "." in monitor:
        label, _, metric = monitor.partition(".")
        group = record.get(label)
        value = group.get(metric) if isinstance(group, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _best(ckpt_dir: Path, monitor: str, records: list[dict[str, Any]]) -> tuple[int | None, float | None]:
    """Epoch of the best checkpoint (the file ``evaluate`` picks: `checkpoint.find_best_checkpoint`'s rule)
    and the monitored score of that epoch (exact from metrics.jsonl, else the name's rounded one)."""
    best = best_checkpoint_file(ckpt_dir)
    if best is None:
        return None, None
    epoch, named_score, _ = best
    exact = next((_score(r, monitor) for r in records if r["epoch"] == epoch), None)
    if exact is not None:
        return epoch, exact
    return epoch, score_sign(monitor) * named_score


def _newest_last(ckpt_dir: Path) -> tuple[bool, int] | None:
    """The ``finished`` flag and epoch of the newest readable last checkpoint; None when there is none.

    Read without touching the folder (a running save's temporary file must stay where it is).
    """
    for path in last_checkpoint_files(ckpt_dir):
        try:
            return bool(load_checkpoint(path).get("finished")), checkpoint_epoch(path)
        except CheckpointError:
            continue  # cut short by a kill: the older one tells
    return None


def _challenge(run_dir: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((RunDirectory(run_dir).report / "metrics.json").read_text())
    except (OSError, ValueError):  # missing, not UTF-8 or not JSON: the run shows as never evaluated
        return None
    scores = report.get("challenge") if isinstance(report, dict) else None
    if not isinstance(scores, dict):
        return None
    # heart_macc is the project's own figure, kept apart from the Challenge's in metrics.json
    project = report.get("project") if isinstance(report.get("project"), dict) else {}
    values = {k: scores.get(k, project.get(k)) for k in CHALLENGE_KEYS}
    return {"split": report.get("split"), "data": report.get("data"), **values}


def _data_name(config: Mapping[str, Any]) -> str:
    if config.get("data"):
        return Path(str(config["data"])).name or str(config["data"])
    return f"synthetic ({config.get('synthetic_patients')} patients)"


def is_run_dir(path: Path) -> bool:
    """A run directory is one that holds ``config.yaml`` (written before anything else of a run)."""
    return path.is_dir() and RunDirectory(path).config_file.is_file()


def read_run(run_dir: str | Path) -> RunRow:
    """One run directory as a `RunRow` (module docstring: where each value and the state come from).

    Example::

        read_run("runs/quick").state   # 'finished', 'stopped early', 'failed', 'interrupted' or 'running'
    """
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir}: not a run directory (no config.yaml)")
    directory = RunDirectory(run_dir)
    try:
        config = read_yaml_mapping(directory.config_file)
    except ConfigError as e:
        return RunRow(name=run_dir.name, path=str(run_dir), state="unreadable", note=_note(e, directory.config_file))
    monitor = str(config.get("monitor") or "val_loss")
    max_epochs = config.get("epochs") if isinstance(config.get("epochs"), int) else None
    try:
        log = directory.metrics_log.read()
    except CheckpointError as e:
        return RunRow(name=run_dir.name, path=str(run_dir), state="unreadable", model=config.get("model"),
                      data=_data_name(config), max_epochs=max_epochs, monitor=monitor,
                      note=_note(e, directory.metrics_file), config=config)
    records = [r for r in log.records if isinstance(r.get("epoch"), int)]
    ckpt_dir = directory.checkpoints
    best_epoch, best_score = _best(ckpt_dir, monitor, records)
    seconds = [float(r.get("seconds") or 0.0) + float(r.get("val_seconds") or 0.0) for r in records]
    newest = _newest_last(ckpt_dir)
    epochs_run = max([r["epoch"] for r in records] + ([newest[1]] if newest else []), default=0)

    error = None
    if is_running(run_dir):
        state = "running"
    elif newest is not None and newest[0]:
        state = "finished" if max_epochs is None or epochs_run >= max_epochs else "stopped early"
    else:
        error = last_error(directory.train_log)
        state = "failed" if error is not None else "interrupted"
    note = f"{directory.metrics_file.name}: {log.damage}" if log.damage else None
    return RunRow(
        name=run_dir.name, path=str(run_dir), state=state, model=config.get("model"), data=_data_name(config),
        epochs_run=epochs_run, max_epochs=max_epochs, best_epoch=best_epoch,
        monitor=monitor, best_score=best_score, seconds=round(sum(seconds), 3) if records else None,
        challenge=_challenge(run_dir), error=error, note=note, config=config,
    )


def read_runs(folder: str | Path) -> list[RunRow]:
    """Every run directory directly inside ``folder`` (or ``folder`` itself if it is one), sorted by name.

    Example::

        for row in read_runs("runs"):
            print(row.name, row.state, row.best_score)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder of runs")
    if is_run_dir(folder):
        return [read_run(folder)]
    return [read_run(p) for p in sorted(folder.iterdir(), key=lambda p: p.name) if is_run_dir(p)]


# ---------------------------------------------------------------------------------------------- showing
def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_table(rows: list[RunRow]) -> str:
    """The runs as an aligned text table; Challenge columns are n/a for runs never evaluated, and the last
    column is the row's ``note`` (why a run is unreadable, or which part of its files is damaged).

    Example::

        print(format_table(read_runs("runs")))
    """
    header = ["run", "state", "model", "data", "epochs", "best", "monitored score", "murmur WA", "outcome cost",
              "heart MAcc", "time", "note"]
    lines = [header]
    for r in rows:
        ch = r.challenge or {}
        lines.append([
            r.name, r.state, r.model or "?", r.data or "?",
            "?" if r.epochs_run is None else f"{r.epochs_run}/{r.max_epochs if r.max_epochs is not None else '?'}",
            "n/a" if r.best_epoch is None else str(r.best_epoch),
            "n/a" if r.best_score is None else f"{r.monitor} {r.best_score:.4f}",
            _num(ch.get("murmur_weighted_accuracy")), _num(ch.get("outcome_cost"), 1), _num(ch.get("heart_macc")),
            _duration(r.seconds), r.note or "",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.append("time: training + validation seconds summed over epochs; Challenge scores from report/metrics.json "
                "(python cli.py evaluate RUN)")
    return "\n".join(text)


def rows_as_json(rows: list[RunRow]) -> str:
    """The rows as a JSON array (every field, the run's config included; unknown values are null)."""
    return json.dumps([asdict(r) for r in rows], indent=2)


def config_diff(run_a: str | Path, run_b: str | Path) -> list[tuple[str, Any, Any]]:
    """``(field, value in A, value in B)`` for every config field whose values differ (``name`` aside).

    Example::

        for key, a, b in config_diff("runs/base", "runs/lr3e-4"):
            print(key, a, b)   # learning_rate 0.001 0.0003
    """
    configs = []
    for run in (run_a, run_b):
        run = Path(run)
        if not is_run_dir(run):
            raise CheckpointError(f"{run}: not a run directory (no config.yaml)")
        configs.append(_read_config(run))
    a, b = configs
    missing = object()
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k), b.get(k)) for k in keys
            if k != "name" and a.get(k, missing) != b.get(k, missing)]


def format_diff(run_a: str | Path, run_b: str | Path, differences: list[tuple[str, Any, Any]]) -> str:
    """The differences as three aligned columns: field, A's value, B's value."""
    if not differences:
        return f"{run_a} and {run_b}: no config differences (name aside)"
    lines = [["field", str(run_a), str(run_b)]] + [[k, _yaml_value(x), _yaml_value(y)] for k, x, y in differences]
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _yaml_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
