"""The layout of a cross-validation experiment directory: its members, their names, run directories and status.

What `cv` writes and `cv_report` reads, and neither needs the other for it: `Experiment` (``experiment.yaml``,
``splits.json``, each member's config and run directory), `Member` (``fold<k>_seed<s>``, ``--only FOLD:SEED``)
and the status of a member, from its checkpoints (`member_status`) and its ``state/<member>.json``
(`write_state`, `read_states`).

Layout::

    EXP_DIR/experiment.yaml        base config, folds, seeds, split_seed (what `resume` needs)
    EXP_DIR/splits.json            patient ids per fold (reusable with --splits)
    EXP_DIR/runs/fold<k>_seed<s>/  normal run directories (+ oof/ : the member's out-of-fold predictions)
    EXP_DIR/state/<member>.json    finished / failed, seconds, error of each member
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ignite_trainer.core.config import TrainConfig, read_text_file
from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.data.splits import read_split_file
from ignite_trainer.runs.checkpoint import find_resume_checkpoint
from ignite_trainer.use.ensemble import EXPERIMENT_FILE

__all__ = ["Member", "Experiment", "parse_member", "member_status", "speaks_for_run", "write_state", "read_states",
           "EXPERIMENT_FORMAT"]

EXPERIMENT_FORMAT = "ignite_trainer/cv/1"


# ---------------------------------------------------------------------------------------------- the experiment
@dataclass(frozen=True, order=True)
class Member:
    """One fold/seed run of an experiment: fold ``fold`` is its validation, ``seed`` its training seed."""

    seed: int
    fold: int

    @property
    def name(self) -> str:
        return f"fold{self.fold}_seed{self.seed}"


def parse_member(text: str) -> Member:
    """``"FOLD:SEED"`` (as ``cv --only`` takes it) -> `Member`.

    Example::

        parse_member("2:0")  # Member(seed=0, fold=2)
    """
    fold, sep, seed = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return Member(seed=int(seed), fold=int(fold))
    except ValueError:
        raise ConfigError(f"--only {text!r}: expected FOLD:SEED, e.g. 2:0") from None


@dataclass
class Experiment:
    """What ``experiment.yaml`` holds: the base config, the fold count, the seeds and where the folds came from.

    ``split_seed`` is the seed the folds were dealt with, None when they were given as a split file
    (``splits_given`` names it); either way ``EXP_DIR/splits.json`` holds them.

    Example::

        exp = Experiment.load("runs/cv-a")
        print([m.name for m in exp.members()], exp.folds())
    """

    exp_dir: Path
    config: TrainConfig
    n_folds: int
    seeds: list[int]
    split_seed: int | None
    splits_given: str | None = None

    def members(self) -> list[Member]:
        """Every member, seed by seed, fold by fold."""
        return [Member(seed=s, fold=k) for s in self.seeds for k in range(self.n_folds)]

    @property
    def runs_dir(self) -> Path:
        """The members' run directories, one per member."""
        return self.exp_dir / "runs"

    def run_dir(self, member: Member) -> Path:
        return self.runs_dir / member.name

    @property
    def experiment_file(self) -> Path:
        return experiment_file(self.exp_dir)

    def state_file(self, member: Member) -> Path:
        """The member's ``state/<member>.json`` (status, seconds, error), written by `write_state`."""
        return self.exp_dir / "state" / f"{member.name}.json"

    @property
    def report_dir(self) -> Path:
        """The experiment's report (``summary.json``, tables, figures), written by `cv_report.build_report`."""
        return self.exp_dir / "report"

    @property
    def summary_file(self) -> Path:
        return self.report_dir / "summary.json"

    @property
    def calibration_file(self) -> Path:
        """The ensemble's temperatures, fitted on the members' out-of-fold predictions (`cv_report`)."""
        return self.exp_dir / "calibration.json"

    @property
    def splits_path(self) -> Path:
        return self.exp_dir / "splits.json"

    def folds(self) -> list[list[str]]:
        """Patient ids per fold, from ``splits.json``."""
        return read_split_file(self.splits_path)

    def member_config(self, member: Member) -> TrainConfig:
        """The base config with this member's seed, fold and place; the split comes from the experiment.

        Dealt folds are reproduced from ``n_folds``/``fold``/``split_seed`` (the run stays self-contained);
        given folds are read from the experiment's own copy of the split file.
        """
        values: dict[str, Any] = {
            "seed": member.seed, "n_folds": self.n_folds, "fold": member.fold, "name": member.name,
            "output_dir": str(self.runs_dir.resolve()),
            "split_seed": self.split_seed, "split_file": None,
        }
        if self.split_seed is None:
            values["split_file"] = str(self.splits_path.resolve())
        return self.config.updated(values, source=f"experiment member {member.name}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": EXPERIMENT_FORMAT, "folds": self.n_folds, "seeds": list(self.seeds),
                "split_seed": self.split_seed, "splits_given": self.splits_given, "config": self.config.to_dict()}

    @classmethod
    def load(cls, exp_dir: str | Path) -> "Experiment":
        exp_dir = Path(exp_dir)
        path = experiment_file(exp_dir)
        if not path.is_file():
            raise CheckpointError(f"{exp_dir}: not a cross-validation experiment (no experiment.yaml)")
        text = read_text_file(path, "the experiment file", CheckpointError)
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path}: cannot read the experiment ({e})") from None
        if not isinstance(values, dict) or values.get("format") != EXPERIMENT_FORMAT:
            raise CheckpointError(f"{path}: not an experiment file of this version ({EXPERIMENT_FORMAT})")
        config = TrainConfig.from_mapping(values.get("config") or {}, source=str(path))
        return cls(exp_dir, config, int(values["folds"]), [int(s) for s in values["seeds"]], values.get("split_seed"),
                   values.get("splits_given"))


def experiment_file(exp_dir: str | Path) -> Path:
    """``EXP_DIR/experiment.yaml``: what makes a folder an experiment (`Experiment.load` reads it)."""
    return Path(exp_dir) / EXPERIMENT_FILE


def oof_dir(run_dir: str | Path) -> Path:
    """A member run's out-of-fold evaluation (``patients.csv``, ``recordings.csv``, ``metrics.json``)."""
    return Path(run_dir) / "oof"


# ---------------------------------------------------------------------------------------------- member status
def member_status(run_dir: str | Path) -> str:
    """``"new"`` (no complete checkpoint), ``"partial"`` (resumable) or ``"trained"`` (its last checkpoint
    says finished); ``"done"`` once its out-of-fold predictions are written too.

    Example::

        member_status("runs/cv-a/runs/fold0_seed0")  # "done"
    """
    run_dir = Path(run_dir)
    try:
        _, ckpt = find_resume_checkpoint(run_dir)
    except CheckpointError:
        return "new"
    if not ckpt.get("finished"):
        return "partial"
    return "done" if (oof_dir(run_dir) / "metrics.json").is_file() else "trained"


def speaks_for_run() -> bool:
    """Under ``torchrun`` (one member over several processes) rank 0 alone predicts and records the member."""
    return int(os.environ.get("RANK", "0")) == 0


def write_state(exp: Experiment, member: Member, **values: Any) -> None:
    """Write the member's ``state/<member>.json`` (status, seconds, error) in one rename; rank 0 only."""
    if not speaks_for_run():
        return
    path = exp.state_file(member)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"member": member.name, "fold": member.fold, "seed": member.seed, **values}) + "\n")
    os.replace(tmp, path)


def read_states(exp: Experiment) -> dict[str, dict[str, Any]]:
    """The state file of every member that has one (members run elsewhere write their own)."""
    states = {}
    for m in exp.members():
        path = exp.state_file(m)
        try:
            states[m.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return states
