"""The run directory: its layout, the one way a run is opened (new, overwrite or resume), and its metrics log.

A run directory holds ``config.yaml``, ``checkpoints/``, ``tb/``, ``metrics.jsonl`` and ``train.log``.
`open_run` is the only code that creates, replaces or resumes one, for every launcher, and it works in
two phases so that a bad input never costs an earlier run: first *plan and validate* (work out the
directory and config, run every input check), then *create* (replace or create the folder, write the
config; on resume, cut the metrics log back to the checkpoint). Nothing on disk changes before the
second phase.

``metrics.jsonl`` (one JSON object per validated epoch, appended and fsynced) is read and written only
through `MetricsLog`, so that a line cut short by a kill is skipped the same way everywhere, and a file
that is not UTF-8 text (damaged, or re-saved by an editor) is one `CheckpointError` naming it everywhere.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, TypeVar

from ignite_trainer.core.atomic import atomic_write
from ignite_trainer.runs.checkpoint import CHECKPOINTS_DIR, find_resume_checkpoint, parse_checkpoint_name
from ignite_trainer.core.config import TrainConfig, config_conflicts, decode_utf8
from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.runs.record import ENVIRONMENT_FILE, SPLIT_FILE, identity_differences, recorded_threads

__all__ = ["RunDirectory", "OpenedRun", "open_run", "MetricsLog", "MetricsRead", "read_metrics_log",
           "run_dir_path"]

T = TypeVar("T")


@dataclass(frozen=True)
class RunDirectory:
    """The paths of one run; nothing else spells a file name of the run directory.

    Example::

        run = RunDirectory(Path("runs/quick"))
        print(run.checkpoints, run.metrics_log.last())
    """

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def resolved_file(self) -> Path:
        """What ``auto``/empty settings turned into on the machine that ran it (`runtime.resolved_settings`)."""
        return self.path / "resolved.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def train_log(self) -> Path:
        return self.path / "train.log"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_log(self) -> "MetricsLog":
        return MetricsLog(self.metrics_file)

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def environment_file(self) -> Path:
        return self.path / ENVIRONMENT_FILE

    @property
    def trunk_file(self) -> Path:
        """A pretraining run's model as safetensors (the model whose trunk pretraining learned)."""
        return self.path / "trunk.safetensors"

    @property
    def calibration_file(self) -> Path:
        """The per-label temperatures fitted on validation for the best checkpoint (`scoring.calibration`)."""
        return self.path / "calibration.json"

    @property
    def report(self) -> Path:
        """``evaluate``'s report folder (``report.md``, ``metrics.json``, figures)."""
        return self.path / "report"

    def is_used(self) -> bool:
        """Whether the folder exists and holds anything (an empty folder may be reused freely)."""
        return self.path.exists() and any(self.path.iterdir())


def run_dir_path(config: TrainConfig) -> Path:
    """``output_dir/name``, the name defaulting to the current time."""
    return Path(config.output_dir).expanduser() / (config.name or datetime.now().strftime("%Y%m%d-%H%M%S"))


@dataclass
class OpenedRun(Generic[T]):
    """A run ready to train: its directory, the config to train with, where to resume from and what the
    validation step returned (e.g. the prepared data). ``finished`` is a resume of a run that had already
    ended: nothing was changed and there is nothing to do. ``threads`` is the torch intra-op thread count the
    checkpoint resumed from was trained with (None: a new run, or a checkpoint from before it was recorded)."""

    directory: RunDirectory
    config: TrainConfig
    resume_from: Path | None
    finished: bool
    epoch: int | None
    checked: T | None
    threads: int | None = None


def open_run(config: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False,
             overrides: Mapping[str, Any] | None = None,
             validate: Callable[[TrainConfig], T] | None = None,
             identify: Callable[[TrainConfig, T], Mapping[str, Any]] | None = None) -> OpenedRun[T]:
    """Start a new run, replace one (``overwrite``) or reopen one (``resume``), in two phases.

    Phase 1 changes nothing on disk: it settles the directory and the config (on resume: the run's own
    ``config.yaml``, which must agree with the checkpoint's, with ``overrides`` that may only change how
    it runs, not its result) and then calls ``validate(config)``, the place for every input check
    (reading the data, batch arithmetic, ...). On resume, ``identify(config, checked)`` gives the run's
    identity as it is now; a checkpoint whose stored ``run_identity`` differs (another run's file, or
    other data) is refused, and the thread count it recorded is returned (``threads``). Phase 2 creates or
    replaces the directory and writes ``config.yaml``, or on resume cuts ``metrics.jsonl`` back to the
    checkpoint's epoch and records the resumed config.

    Example::

        run = open_run(config, overwrite=True, validate=checked_data)
        data = run.checked   # the PreparedData that validate returned
    """
    if resume is not None:
        directory = RunDirectory(Path(resume))
        config, path, ckpt = _resume_config(directory, overrides or {})
        epoch, finished, saved_identity = int(ckpt["epoch"]), bool(ckpt.get("finished")), ckpt.get("run_identity")
        threads = recorded_threads(ckpt, path) if path is not None else None
        del ckpt
        if finished:
            return OpenedRun(directory, config, path, True, epoch, None)
        checked = validate(config) if validate is not None else None
        if path is None:  # no checkpoint yet: the run starts again, in its own directory
            directory.metrics_log.truncate(0)
            shutil.rmtree(directory.tensorboard, ignore_errors=True)
            return OpenedRun(directory, config, None, False, 0, checked)
        if identify is not None:
            differences = identity_differences(saved_identity, identify(config, checked))  # type: ignore[arg-type]
            if differences:
                raise CheckpointError(f"{path}: not a checkpoint of this run as it is now: {'; '.join(differences)}; "
                                      "resume with the run's own data and config, or start a new run")
        directory.metrics_log.truncate(epoch)
        if directory.config_file.read_text() != config.to_yaml():
            with atomic_write(directory.config_file, durable=True) as f:
                f.write(config.to_yaml())  # the resumable fields (device, workers, ...) as this session runs
        return OpenedRun(directory, config, path, False, epoch, checked, threads)

    directory = RunDirectory(run_dir_path(config))
    _refuse_existing(directory, overwrite)
    checked = validate(config) if validate is not None else None
    _create(directory)
    with atomic_write(directory.config_file, durable=True) as f:
        f.write(config.to_yaml())
    return OpenedRun(directory, config, None, False, None, checked)


def _refuse_existing(directory: RunDirectory, overwrite: bool) -> None:
    """An existing non-empty run is never replaced without ``overwrite``."""
    if directory.is_used() and not overwrite:
        raise CheckpointError(f"{directory.path}: run directory already exists; pass --resume {directory.path} "
                              "to continue it or --overwrite to replace it")


def _create(directory: RunDirectory) -> None:
    """Create the folder (emptying a used one; the caller has checked ``overwrite``) and check it is writable."""
    if directory.is_used():
        shutil.rmtree(directory.path)
    try:
        directory.checkpoints.mkdir(parents=True, exist_ok=True)
        probe = directory.path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{directory.path}: cannot write the run directory ({e.strerror or e})") from None


def _resume_config(directory: RunDirectory,
                   overrides: Mapping[str, Any]) -> tuple[TrainConfig, Path | None, dict[str, Any]]:
    """The config to resume with (the run's config.yaml, which must agree with the checkpoint's, plus explicit
    overrides that must not change the math), the checkpoint and its contents; a run stopped before its first
    checkpoint has none (``None``, epoch 0) and starts again."""
    if not directory.path.is_dir():
        raise CheckpointError(f"{directory.path}: --resume needs an existing run directory")
    if directory.config_file.is_file() and not _has_resume_files(directory):
        # stopped before its first checkpoint: nothing was trained, so the run starts again from its config.yaml
        return _recorded_config(directory).updated(overrides, source="command line"), None, {"epoch": 0}
    path, ckpt = find_resume_checkpoint(directory.path)
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: checkpoint holds no config; cannot resume")
    if not directory.config_file.is_file():
        raise CheckpointError(f"{directory.config_file}: missing; a run directory without its config cannot be resumed")
    recorded = _recorded_config(directory)
    edited = config_conflicts(saved, recorded)
    if edited:
        raise CheckpointError(
            f"{path}: its config differs from the run's {directory.config_file.name} ({'; '.join(edited)}); "
            "a checkpoint of another run, or an edited config.yaml, cannot be resumed (config.yaml must stay "
            "what ran: start a new run to change it)")
    try:
        config = recorded.updated(overrides, source="command line")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    conflicts = config_conflicts(saved, config)
    if conflicts:
        raise CheckpointError(f"{directory.path}: resume refused, the config differs from the checkpoint's "
                              f"({'; '.join(conflicts)})")
    return config, path, ckpt


def _recorded_config(directory: RunDirectory) -> TrainConfig:
    try:
        return TrainConfig.from_yaml(directory.config_file)
    except ConfigError as e:
        raise CheckpointError(f"{directory.config_file}: cannot resume ({e})") from None


def _has_resume_files(directory: RunDirectory) -> bool:
    """Whether any ``last_checkpoint_*`` file is there (complete or not: a damaged one must be reported)."""
    folder = directory.checkpoints
    return folder.is_dir() and any(getattr(parse_checkpoint_name(p.name), "kind", None) == "last"
                                   for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------- metrics.jsonl
@dataclass(frozen=True)
class MetricsRead:
    """One read of ``metrics.jsonl``: its whole epoch records, and the lines that were not whole ones.

    ``bad_lines`` are 1-based line numbers; ``cut_last`` says the only bad line is the last one and it has
    no line end, which is what a kill during the append leaves (the epoch was being written when the
    process died: every epoch before it is whole).

    Example::

        read = MetricsLog(run_dir / "metrics.jsonl").read()
        print(len(read.records), read.damage)   # 3 None, or 1 'line 2 (the last) is cut short; ...'
    """

    records: list[dict[str, Any]]
    bad_lines: tuple[int, ...] = ()
    lines: int = 0
    cut_last: bool = False

    @property
    def damage(self) -> str | None:
        """What is not whole, in words (None: every line is an epoch record)."""
        if not self.bad_lines:
            return None
        whole = f"{len(self.records)} whole epoch record(s) read"
        if self.cut_last:
            return f"line {self.bad_lines[0]} (the last) is cut short, as a kill during a write leaves it; {whole}"
        numbers = ", ".join(str(n) for n in self.bad_lines[:5]) + (", ..." if len(self.bad_lines) > 5 else "")
        return f"{len(self.bad_lines)} of {self.lines} line(s) are not epoch records (line {numbers}); {whole}"


class MetricsLog:
    """``metrics.jsonl``: one JSON object per validated epoch, appended and fsynced line by line.

    A plain file that survives a kill line by line, for scripts and reports that should not need
    TensorBoard to read a run. A line cut short by a kill is skipped by every reader; a file that is not
    UTF-8 text is a `CheckpointError` naming it.

    Example::

        for record in MetricsLog(run_dir / "metrics.jsonl").records():
            print(record["epoch"], record["val_loss"])
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one epoch's line and make it durable before returning."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> MetricsRead:
        """The whole epoch records and which lines were not whole (nothing when the file does not exist)."""
        try:
            raw = self.path.read_bytes()
        except OSError:
            return MetricsRead([])
        lines = decode_utf8(raw, self.path, "; the run's epoch log is damaged", CheckpointError).splitlines()
        records, bad = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                bad.append(number)
            else:
                records.append(record)
        cut_last = bad == [len(lines)] and not raw.endswith(b"\n")
        return MetricsRead(records, tuple(bad), len(lines), cut_last)

    def records(self) -> list[dict[str, Any]]:
        """Every complete epoch record, in file order (none when the file does not exist)."""
        return self.read().records

    def last(self) -> dict[str, Any] | None:
        """The last complete record, or None before the first epoch."""
        records = self.records()
        return records[-1] if records else None

    def truncate(self, last_epoch: int) -> None:
        """Keep only complete records of epochs ``<= last_epoch`` (a resumed run rewrites what came after,
        and drops a line a kill cut short)."""
        if not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("epoch", math.inf) <= last_epoch]
        with atomic_write(self.path, durable=True) as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line cut by a kill
    return record if isinstance(record, dict) and "epoch" in record else None


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """The epochs of a run's ``metrics.jsonl`` (lines cut short by a kill are skipped; a file that is not
    UTF-8 text is a `CheckpointError` naming it)."""
    return MetricsLog(path).records()
