"""The rules of ``cli.py cv``'s flags: which combinations start, resume or only collect an experiment, and the
cross-validation call each makes.

The command line only parses; this module decides. A flag or a combination that is not allowed is a
`FlagCombinationError` or a `FlagValueError` (both `ConfigError`s, so one ``error:`` line and exit code 2),
raised before any work: ``--resume`` and ``--collect`` use the experiment's own settings, so every flag that
would set up an experiment is refused with them.

Example::

    from ignite_trainer.experiments.cv_flags import CvFlags, run_cv
    run_cv(CvFlags(config_flags=(("--epochs", "epochs", 30),), seeds="0,1", jobs=2))
    run_cv(CvFlags(resume_dir="runs/cv-a", jobs=2))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import ConfigError, UserError
from ignite_trainer.core.vocabulary import HEARTBEAT_INTERVAL
from ignite_trainer.experiments.cv import collect_experiment, cross_validate, resume_cross_validation
from ignite_trainer.experiments.layout import parse_member
from ignite_trainer.experiments.member_queue import check_queue_for_collect, queue_cross_validation, resume_from_queue

#: Folds of a new experiment when neither --folds, a split file nor the config's n_folds (>= 2) gives them.
DEFAULT_FOLDS = 5


class FlagCombinationError(ConfigError):
    """Flags that cannot be given together (the command line shows it as a usage error of ``cv``)."""


class FlagValueError(ConfigError):
    """A flag's value that the command cannot take (the command line shows it as an invalid value)."""


@dataclass(frozen=True)
class CvFlags:
    """What ``cli.py cv`` was given; a flag not given keeps its default here.

    ``config_flags`` holds the config-field flags typed, each ``(flag as documented, field, value)``, e.g.
    ``("--lr", "learning_rate", 0.01)``; ``seeds`` and ``only`` are as typed (``"0,1,2"``, ``("2:0",)``).
    """

    config_file: str | None = None
    config_flags: tuple[tuple[str, str, Any], ...] = ()
    assignments: tuple[str, ...] = ()
    folds: int | None = None
    seeds: str = "0"
    split_seed: int | None = None
    splits_file: str | None = None
    jobs: int = 1
    only: tuple[str, ...] = ()
    resume_dir: str | None = None
    collect_dir: str | None = None
    overwrite: bool = False
    bootstrap: int = 1000
    figures: bool = True
    storage: str | None = None
    study_name: str | None = None
    heartbeat: int | None = None

    def experiment_flags(self) -> list[str]:
        """The flags given that set up a new experiment (refused with --resume/--collect), as spelled in help."""
        given = ["--config"] if self.config_file else []
        given += [flag for flag, _, _ in self.config_flags]
        given += [flag for flag, value in (("--set", self.assignments), ("--folds", self.folds),
                                           ("--split-seed", self.split_seed), ("--splits", self.splits_file))
                  if value not in (None, ())]
        return given + (["--seeds"] if self.seeds != "0" else [])

    def config(self) -> TrainConfig:
        """The base config of a new experiment: --config FILE, then the config-field flags, then --set."""
        config = TrainConfig.from_yaml(self.config_file) if self.config_file else TrainConfig()
        config = config.updated({field: value for _, field, value in self.config_flags}, source="command line")
        return config.with_overrides(list(self.assignments))

    def seed_list(self) -> list[int]:
        try:
            return [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            raise FlagValueError(f"--seeds={self.seeds!r}: expected integers separated by commas, e.g. 0,1,2") from None


def run_cv(flags: CvFlags, *, echo: Callable[[str], None] = print,
           report: Callable[[dict[str, Any]], None] = lambda summary: None) -> dict[str, Any]:
    """Check ``flags``, then start (`cross_validate`), resume (`resume_cross_validation`) or only collect
    (`collect_experiment`) the experiment they name; ``report`` is called with the summary when the
    experiment was collected. Members that failed (the others finished) are one `UserError` at the end.

    Example::

        run_cv(CvFlags(collect_dir="runs/cv-a", bootstrap=0, figures=False), report=print)
    """
    if flags.bootstrap < 0:
        raise FlagValueError(f"--bootstrap={flags.bootstrap} must be >= 0")
    if flags.jobs < 1:
        raise FlagValueError(f"--jobs={flags.jobs} must be >= 1")
    members = [parse_member(o) for o in flags.only]  # a malformed FOLD:SEED fails before any work
    given = flags.experiment_flags()
    if flags.resume_dir and flags.collect_dir:
        raise FlagCombinationError("--resume and --collect cannot be combined")
    queue = _queue_args(flags)
    if (flags.resume_dir or flags.collect_dir) and given:
        raise FlagCombinationError(f"{', '.join(given)} cannot be combined with --resume/--collect "
                                   "(the experiment's own settings are used)")
    if flags.collect_dir:
        if members or flags.overwrite:
            raise FlagCombinationError("--collect takes no --only or --overwrite")
        if queue:
            check_queue_for_collect(flags.collect_dir, **queue)
        summary = {**collect_experiment(flags.collect_dir, bootstrap=flags.bootstrap, figures=flags.figures),
                   "collected": True}
    elif flags.resume_dir:
        if flags.overwrite:
            raise FlagCombinationError("--overwrite cannot be combined with --resume")
        if queue:
            summary = resume_from_queue(flags.resume_dir, **queue, bootstrap=flags.bootstrap, figures=flags.figures,
                                        echo=echo)
        else:
            summary = resume_cross_validation(flags.resume_dir, jobs=flags.jobs, only=members,
                                              bootstrap=flags.bootstrap, figures=flags.figures, echo=echo)
    else:
        seeds = flags.seed_list()
        config = flags.config()
        folds = flags.folds
        if folds is None and not flags.splits_file:
            folds = config.n_folds if config.n_folds >= 2 else DEFAULT_FOLDS
        if queue:
            summary = queue_cross_validation(config, folds, seeds, **queue, split_seed=flags.split_seed,
                                             splits=flags.splits_file, bootstrap=flags.bootstrap,
                                             figures=flags.figures, echo=echo)
        else:
            summary = cross_validate(config, folds, seeds, split_seed=flags.split_seed, splits=flags.splits_file,
                                     jobs=flags.jobs, only=members, overwrite=flags.overwrite,
                                     bootstrap=flags.bootstrap, figures=flags.figures, echo=echo)
    if summary.get("collected"):
        report(summary)
    failed = summary.get("failed") or {}
    if failed:
        listing = "; ".join(f"{name} ({message})" for name, message in failed.items())
        where = summary["exp_dir"] if "exp_dir" in summary else summary["experiment"]
        retry = summary.get("retry", "rerun them with cv --resume")
        raise UserError(f"{len(failed)} run(s) of {where} failed: {listing}; the others finished; {retry}")
    return summary


def _queue_args(flags: CvFlags) -> dict[str, Any] | None:
    """``--storage``'s arguments of the queue calls (None without it), after its combination rules."""
    if flags.storage is None:
        if flags.study_name is not None or flags.heartbeat is not None:
            raise FlagCombinationError("--study and --heartbeat go with --storage (the members' queue)")
        return None
    if flags.only:
        raise FlagCombinationError("--only cannot be combined with --storage (the queue hands out every member; "
                                   "--only runs the members named, without one)")
    if flags.overwrite:
        raise FlagCombinationError("--overwrite cannot be combined with --storage (the queue remembers which "
                                   "members are done; give another --study to start over)")
    if flags.jobs > 1:
        raise FlagCombinationError("--jobs cannot be combined with --storage: each cv --storage command claims one "
                                   "member at a time; start one command per member to run at once")
    return {"storage": flags.storage, "study_name": flags.study_name,
            "heartbeat": HEARTBEAT_INTERVAL if flags.heartbeat is None else flags.heartbeat}
