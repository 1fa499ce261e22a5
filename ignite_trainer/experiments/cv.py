"""Cross-validation as an experiment: k patient folds x S training seeds, each a normal run, one directory.

One split's score on CirCor's 942 patients moves by several points, so the field reports mean and spread
over folds and seeds, tunes decisions on out-of-fold predictions and submits the fold models as an
ensemble. `cross_validate` does all of it with the normal `train` and `evaluate`:

- the folds are dealt once (`splits.assign_folds`, stratified by both labels, from ``split_seed``) or read
  from a split file, and written to ``EXP_DIR/splits.json`` before any run starts; the training ``seed``
  varies initialisation and crops over the same folds;
- every fold/seed member is an ordinary run directory ``EXP_DIR/runs/fold<k>_seed<s>`` (resumable and
  exact like any run), and after training its best model predicts its own validation fold per patient
  (``runs/<member>/oof/patients.csv``): the model that never saw those patients;
- members run one after another in this process, or ``jobs`` at once as separate processes, each with
  its share of the cores; a failed member is reported by name and the others go on;
- `collect_experiment` pools the out-of-fold predictions, tunes the decision thresholds on them and writes the
  report (`cv_report`) and the ensemble's manifest (`ensemble`).

A killed experiment resumes with `resume_cross_validation`: finished members are skipped, an interrupted
one continues from its last checkpoint with ``train(..., resume=run_dir)``.

Layout (members, run directories and state files: `layout`)::

    EXP_DIR/experiment.yaml        base config, folds, seeds, split_seed (what `resume` needs)
    EXP_DIR/splits.json            patient ids per fold (reusable with --splits)
    EXP_DIR/runs/fold<k>_seed<s>/  normal run directories (+ oof/ : the member's out-of-fold predictions)
    EXP_DIR/state/<member>.json    finished / failed, seconds, error of each member
    EXP_DIR/logs/<member>.log      output of members run as separate processes
    EXP_DIR/oof_predictions.csv    every patient once per seed, full-precision probabilities
    EXP_DIR/thresholds.json        decision thresholds tuned on the out-of-fold predictions
    EXP_DIR/decision.json          the Challenge decision layer fitted on them (`DecisionLayer.to_json`)
    EXP_DIR/ensemble.json          the members and thresholds `ensemble.load_ensemble` reads
    EXP_DIR/report/                tables, figures and summary.json (`cv_report`)
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import CheckpointError, ConfigError, DataError, TrainingAborted, UserError
from ignite_trainer.data.prepare import PreparedData, prepare_data
from ignite_trainer.data.records import Recording
from ignite_trainer.data.splits import assign_folds, check_folds, patient_strata, read_split_file, write_split_file
from ignite_trainer.training.run import train
from ignite_trainer.training.runtime import intra_op_threads
from ignite_trainer.use.evaluation import evaluate
from ignite_trainer.experiments.cv_report import build_report
from ignite_trainer.experiments.layout import (Experiment, Member, experiment_file, member_status, oof_dir,
                                               parse_member, speaks_for_run, write_state)

__all__ = ["cross_validate", "resume_cross_validation", "collect_experiment", "run_member", "dataset_recordings",
           "whole_dataset", "plan_experiment", "open_experiment", "ExperimentPlan", "record_failure"]


# ---------------------------------------------------------------------------------------------- members
def run_member(exp: Experiment, member: Member, threads: int | None = None, progress: bool | None = None,
               setup: Callable | None = None) -> str:
    """Train one member (fresh, resumed or not at all when finished), then write its out-of-fold predictions.

    ``threads`` sets torch's intra-op threads for the member (restored afterwards; a resumed member trains
    with the count its checkpoint recorded, see `train`); ``progress`` overrides the progress bar. Returns
    what was done: ``"trained"``, ``"resumed"`` or ``"skipped"``.

    Example::

        run_member(Experiment.load("runs/cv-a"), Member(seed=0, fold=2), threads=1)
    """
    run_dir = exp.run_dir(member)
    with intra_op_threads(threads or None):
        return _run_member(exp, member, run_dir, progress, setup)


def _run_member(exp: Experiment, member: Member, run_dir: Path, progress: bool | None, setup: Callable | None) -> str:
    status = member_status(run_dir)
    overrides = {} if progress is None else {"progress": progress}
    if status == "partial":
        train(TrainConfig(), resume=run_dir, overrides=overrides, setup=setup)
        action = "resumed"
    elif status == "new":
        config = exp.member_config(member).updated(overrides, source="cv")
        # A directory without a complete checkpoint (killed during its first epoch) holds nothing to keep.
        train(config, overwrite=True, setup=setup)
        action = "trained"
    else:
        action = "skipped"
    if not speaks_for_run():
        return action
    if member_status(run_dir) == "trained":
        config = TrainConfig.from_yaml(RunDirectory(run_dir).config_file)
        result = evaluate(run_dir, out_dir=oof_dir(run_dir), figures=False, device=config.device)
        _check_oof_patients(exp, member, result["files"]["patients"])
    return action


def _check_oof_patients(exp: Experiment, member: Member, patients_csv: str | Path) -> None:
    """The member's predicted patients must be exactly its fold (the run reproduced the experiment's split)."""
    with open(patients_csv, newline="") as f:
        predicted = sorted(row["patient_id"] for row in csv.DictReader(f))
    expected = sorted(exp.folds()[member.fold])
    if predicted != expected:
        (Path(patients_csv).parent / "metrics.json").unlink(missing_ok=True)
        raise DataError(f"{exp.run_dir(member)}: validated {len(predicted)} patients, but fold {member.fold} of "
                        f"{exp.splits_path} holds {len(expected)}: the run did not reproduce the experiment's split")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_members(exp: Experiment, members: Sequence[Member], jobs: int, setup: Callable | None,
                 echo: Callable[[str], None], threads: int | None = None) -> dict[str, str]:
    """Run ``members``; returns the failures by member name (the message of each).

    With ``jobs == 1`` they run here, one after another, with this process's torch thread setting; with
    more, each runs as its own process (``python -m ignite_trainer.experiments.cv member ...``) with
    ``threads`` (default ``max(1, cores // jobs)``) threads, at most ``jobs`` at a time. A resumed member
    trains with the thread count its checkpoint recorded either way.
    """
    threads = threads or max(1, _cores() // jobs)
    failures: dict[str, str] = {}
    todo = [m for m in members if member_status(exp.run_dir(m)) != "done"]
    for m in members:
        if m not in todo:
            echo(f"{m.name}: finished earlier, skipped")
    if jobs == 1:
        for m in todo:
            echo(f"{m.name}: {'resuming' if member_status(exp.run_dir(m)) == 'partial' else 'starting'}")
            start = time.perf_counter()
            try:
                run_member(exp, m, setup=setup)  # this process keeps its own thread setting
            except Exception as e:  # noqa: BLE001 -- one failed member must not stop the others
                failures[m.name] = record_failure(exp, m, e, time.perf_counter() - start, echo)
                continue
            write_state(exp, m, status="finished", seconds=time.perf_counter() - start)
            echo(f"{m.name}: finished")
        return failures

    running: dict[Member, tuple[subprocess.Popen, float, Any]] = {}
    queue = list(todo)
    (exp.exp_dir / "logs").mkdir(exist_ok=True)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                m = queue.pop(0)
                log = open(exp.exp_dir / "logs" / f"{m.name}.log", "ab")
                running[m] = (subprocess.Popen(_member_command(exp, m, threads), stdout=log, stderr=subprocess.STDOUT,
                                               env=_member_env(threads)), time.perf_counter(), log)
                echo(f"{m.name}: started ({threads} thread{'s' if threads > 1 else ''})")
            time.sleep(0.2)
            for m, (proc, start, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[m]
                seconds = time.perf_counter() - start
                if code == 0:
                    write_state(exp, m, status="finished", seconds=seconds)
                    echo(f"{m.name}: finished")
                else:
                    message = _failure_line(exp.exp_dir / "logs" / f"{m.name}.log", code)
                    failures[m.name] = message
                    write_state(exp, m, status="failed", error=message, seconds=seconds)
                    echo(f"{m.name}: failed: {message}")
    finally:
        for proc, _, log in running.values():  # interrupted: stop the members still running (they resume later)
            proc.terminate()
            proc.wait()
            log.close()
    return failures


def record_failure(exp: Experiment, m: Member, error: Exception, seconds: float,
                   echo: Callable[[str], None]) -> str:
    """A member that raised ``error`` (call it in the ``except``): its traceback goes to
    ``EXP_DIR/logs/<member>.log``, its state file says failed; returns the one-line message it is reported by."""
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    _log_failure(exp, m, traceback.format_exc())
    write_state(exp, m, status="failed", error=message, seconds=seconds)
    echo(f"{m.name}: failed: {message}")
    return message


def _member_command(exp: Experiment, m: Member, threads: int) -> list[str]:
    return [sys.executable, "-m", "ignite_trainer.experiments.cv", "member", str(exp.exp_dir), str(m.fold), str(m.seed),
            str(threads)]


def _member_env(threads: int) -> dict[str, str]:
    """The child imports this very package, wherever the parent found it; its OpenMP pool is its share."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _failure_line(log: Path, code: int) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1]
    cause = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"{cause}" + (f" ({lines[-1]})" if lines else "") + f"; see {log}"


def _log_failure(exp: Experiment, m: Member, text: str) -> None:
    path = exp.exp_dir / "logs" / f"{m.name}.log"
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------- data
def whole_dataset(config: TrainConfig) -> PreparedData:
    """The config's whole dataset, read (and featurised into the cache) as training will; its two sides are
    a fixed half split, so that `runs.record.run_identity` of it fingerprints the data."""
    whole = dataclasses.replace(config, n_folds=0, fold=0, split_file=None, split_seed=None, val_fraction=0.5)
    return prepare_data(whole)


def dataset_recordings(config: TrainConfig) -> list[Recording]:
    """Every usable recording of the config's dataset, read (and featurised into the cache) as training will."""
    data = whole_dataset(config)
    return data.train + data.val


# ---------------------------------------------------------------------------------------------- entry points
def _check_args(seeds: Sequence[int], jobs: int, setup: Callable | None, threads: int | None = None) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("seeds: give at least one training seed")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds={seeds}: every seed must be an integer >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds}: a seed is repeated")
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} must be an integer >= 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be an integer >= 1")
    if setup is not None and jobs > 1:
        raise ConfigError("a setup hook runs in this process only; use jobs=1 with it")
    return seeds


def _check_only(exp: Experiment, only: Sequence[Member | str] | None) -> list[Member]:
    if not only:
        return exp.members()
    chosen = []
    for item in only:
        m = parse_member(item) if isinstance(item, str) else item
        if not 0 <= m.fold < exp.n_folds:
            raise ConfigError(f"--only {m.fold}:{m.seed}: fold {m.fold} does not exist (folds 0..{exp.n_folds - 1})")
        if m.seed not in exp.seeds:
            raise ConfigError(f"--only {m.fold}:{m.seed}: seed {m.seed} is not one of the experiment's seeds "
                              f"{exp.seeds}")
        chosen.append(m)
    return sorted(set(chosen))


def cross_validate(config: TrainConfig, folds: int | None = 5, seeds: Sequence[int] = (0,), *,
                   exp_dir: str | Path | None = None, split_seed: int | None = None, splits: str | Path | None = None,
                   jobs: int = 1, only: Sequence[Member | str] | None = None, overwrite: bool = False,
                   bootstrap: int = 1000, figures: bool = True, setup: Callable | None = None,
                   threads: int | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a k-fold x seeds experiment of ``config`` and report it; returns `collect_experiment`'s summary plus
    ``failed`` (member name -> message).

    ``folds`` patient folds stratified by both labels, dealt with ``split_seed`` (default: the config's
    ``split_seed``, else its ``seed``), or the folds of the split file ``splits`` (default: the config's
    ``split_file``; ``folds`` None or equal to its fold count). Each training seed of ``seeds`` trains one model per fold. ``exp_dir`` defaults to
    ``output_dir/name`` (name: ``cv-<timestamp>``); an existing one is refused unless ``overwrite``, or
    unless ``only`` is given and it holds this very experiment (members started on several machines).
    ``only`` runs just those members (``"FOLD:SEED"`` or `Member`) and does not collect. With ``jobs`` > 1
    members run as separate processes, each with ``threads`` torch threads (default ``cores // jobs``).
    Everything is checked (config, data, folds, members) before anything is written. Members handed out to
    several machines through a shared storage: `member_queue.queue_cross_validation`.

    Example::

        from ignite_trainer import TrainConfig
        from ignite_trainer.experiments.cv import cross_validate
        summary = cross_validate(TrainConfig(epochs=30), folds=5, seeds=[0, 1, 2], exp_dir="runs/cv-a", jobs=2)
        print(summary["pooled"]["murmur_weighted_accuracy"])
    """
    seeds = _check_args(seeds, jobs, setup, threads)
    plan = plan_experiment(config, folds, seeds, exp_dir=exp_dir, split_seed=split_seed, splits=splits,
                           overwrite=overwrite, join=bool(only))
    chosen = _check_only(plan.exp, only)
    open_experiment(plan, overwrite=overwrite, echo=echo)
    failures = _run_members(plan.exp, chosen, jobs, setup, echo, threads)
    if only:
        return {"exp_dir": str(plan.exp.exp_dir), "failed": failures, "collected": False}
    summary = collect_experiment(plan.exp.exp_dir, bootstrap=bootstrap, figures=figures)
    return {**summary, "failed": failures, "collected": True}


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """A new experiment checked in full and not yet written: its members, folds and dataset, and whether its
    folder already holds something (`open_experiment` creates it, or joins it when ``join``)."""

    exp: Experiment
    fold_ids: list[list[str]]
    data: PreparedData
    existing: bool
    join: bool

    @property
    def recordings(self) -> list[Recording]:
        return self.data.train + self.data.val


def plan_experiment(config: TrainConfig, folds: int | None, seeds: Sequence[int], *, exp_dir: str | Path | None,
                    split_seed: int | None = None, splits: str | Path | None = None, overwrite: bool = False,
                    join: bool = False) -> ExperimentPlan:
    """Check a new experiment (the arguments of `cross_validate`), read its data and deal or read its folds;
    writes nothing. An existing, non-empty ``exp_dir`` is refused unless ``overwrite`` or ``join`` (several
    processes or machines starting the same experiment)."""
    seeds = list(seeds)
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise ConfigError(f"folds={folds!r}: cross-validation needs an integer >= 2")
    if splits is None and config.split_file and split_seed is None:
        splits = config.split_file  # the base config names the folds already
    if splits is None and folds is None:
        raise ConfigError("give the number of folds or a split file")
    if splits is not None and split_seed is not None:
        raise ConfigError("split_seed deals folds; a split file gives them already (use one of the two)")
    if exp_dir is None:
        exp_dir = Path(config.output_dir).expanduser() / (config.name or datetime.now().strftime("cv-%Y%m%d-%H%M%S"))
    exp_dir = Path(exp_dir)
    existing = exp_dir.exists() and any(exp_dir.iterdir())
    if existing and not overwrite and not join:
        raise CheckpointError(f"{exp_dir}: experiment directory already exists; pass --resume {exp_dir} to continue "
                              f"it or --overwrite to replace it")

    data = whole_dataset(config)
    recordings = data.train + data.val
    patients = sorted({r.patient_id for r in recordings})
    if splits is not None:
        fold_ids = read_split_file(splits)
        check_folds(fold_ids, patients, str(splits))
        if folds is not None and folds != len(fold_ids):
            raise ConfigError(f"folds={folds} but {splits} holds {len(fold_ids)} folds")
        dealt_with = None
    else:
        dealt_with = config.effective_split_seed if split_seed is None else split_seed
        if isinstance(dealt_with, bool) or not isinstance(dealt_with, int) or dealt_with < 0:
            raise ConfigError(f"split_seed={dealt_with!r} must be an integer >= 0")
        fold_ids = assign_folds(recordings, int(folds), dealt_with)
    exp = Experiment(exp_dir, config, len(fold_ids), seeds, dealt_with, str(Path(splits).resolve()) if splits else None)
    for m in exp.members():
        exp.member_config(m)  # every member's config is valid before anything is written
    return ExperimentPlan(exp, fold_ids, data, existing, join)


def open_experiment(plan: ExperimentPlan, *, overwrite: bool = False, echo: Callable[[str], None] = print) -> None:
    """Write the planned experiment's folder, or join it when it exists and the plan may (the same experiment)."""
    if plan.existing and plan.join and not overwrite:
        _join_existing(plan.exp, plan.fold_ids)
    else:
        _create(plan.exp, plan.fold_ids, plan.recordings, overwrite)
    patients = len({r.patient_id for r in plan.recordings})
    echo(f"experiment {plan.exp.exp_dir}: {plan.exp.n_folds} folds x {len(plan.exp.seeds)} seed(s) = "
         f"{len(plan.exp.members())} runs, {patients} patients")


def _create(exp: Experiment, fold_ids: list[list[str]], recordings: Sequence[Recording], overwrite: bool) -> None:
    """Write ``experiment.yaml`` and ``splits.json`` into a fresh folder, then move it into place in one
    rename: a reader (or a second machine starting the same experiment) never sees half an experiment."""
    exp_dir = exp.exp_dir
    strata = {f"{h},{m}": len(p) for (h, m), p in patient_strata(recordings).items()}
    tmp = exp_dir.with_name(f".{exp_dir.name}.creating-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        staged = dataclasses.replace(exp, exp_dir=tmp)
        staged.runs_dir.mkdir()
        staged.experiment_file.write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))
        write_split_file(fold_ids, staged.splits_path, split_seed=exp.split_seed, strata=strata,
                         given=exp.splits_given)
        if overwrite and exp_dir.exists():
            shutil.rmtree(exp_dir)
        elif exp_dir.exists() and not any(exp_dir.iterdir()):
            exp_dir.rmdir()
        os.rename(tmp, exp_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if exp_dir.is_dir() and experiment_file(exp_dir).is_file():  # another machine created it first
            _join_existing(exp, fold_ids)
            return
        raise CheckpointError(f"{exp_dir}: cannot create the experiment directory ({e.strerror or e})") from None


def _join_existing(exp: Experiment, fold_ids: list[list[str]]) -> None:
    """``--only`` into an existing experiment: it must be this very experiment (same config, folds, seeds)."""
    saved = Experiment.load(exp.exp_dir)
    same = (saved.config.to_dict() == exp.config.to_dict() and saved.n_folds == exp.n_folds
            and saved.seeds == exp.seeds and saved.split_seed == exp.split_seed
            and [sorted(f) for f in saved.folds()] == [sorted(f) for f in fold_ids])
    if not same:
        raise CheckpointError(f"{exp.exp_dir}: holds a different experiment (config, folds or seeds differ); "
                              f"use --resume {exp.exp_dir} --only FOLD:SEED to run one of its members")


def resume_cross_validation(exp_dir: str | Path, *, jobs: int = 1, only: Sequence[Member | str] | None = None,
                            bootstrap: int = 1000, figures: bool = True, setup: Callable | None = None,
                            threads: int | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Continue an experiment: finished members are skipped, an interrupted one resumes from its last
    checkpoint, the rest start; then `collect_experiment` (not with ``only``).

    Example::

        resume_cross_validation("runs/cv-a", jobs=2)
    """
    _check_args([0], jobs, setup, threads)
    exp = Experiment.load(exp_dir)
    chosen = _check_only(exp, only)
    if not exp.splits_path.is_file():
        raise CheckpointError(f"{exp.splits_path}: the experiment's split file is missing")
    failures = _run_members(exp, chosen, jobs, setup, echo, threads)
    if only:
        return {"exp_dir": str(exp.exp_dir), "failed": failures, "collected": False}
    summary = collect_experiment(exp.exp_dir, bootstrap=bootstrap, figures=figures)
    return {**summary, "failed": failures, "collected": True}


def collect_experiment(exp_dir: str | Path, *, bootstrap: int = 1000, figures: bool = True) -> dict[str, Any]:
    """Pool what finished: write ``oof_predictions.csv``, ``thresholds.json``, ``ensemble.json`` and the
    report; returns the content of ``report/summary.json``. Members whose training finished but whose
    out-of-fold predictions are missing (run elsewhere with ``--only``) are predicted here first.

    Example::

        summary = collect_experiment("runs/cv-a")
        print(summary["missing"], summary["thresholds"])
    """
    exp = Experiment.load(exp_dir)
    for m in exp.members():
        if member_status(exp.run_dir(m)) == "trained":
            run_member(exp, m)
    done = [m for m in exp.members() if member_status(exp.run_dir(m)) == "done"]
    if not done:
        raise CheckpointError(f"{exp.exp_dir}: no member run has finished yet; nothing to collect "
                              f"(run cv --resume {exp.exp_dir})")
    return build_report(exp, done, dataset_recordings(exp.config), bootstrap=bootstrap, figures=figures)


# ---------------------------------------------------------------------------------------------- member process
def _member_main(argv: list[str]) -> int:
    """``python -m ignite_trainer.experiments.cv member EXP_DIR FOLD SEED THREADS``: one member in its own process."""
    if len(argv) != 5 or argv[0] != "member":
        print("usage: python -m ignite_trainer.experiments.cv member EXP_DIR FOLD SEED THREADS", file=sys.stderr)
        return 2
    _, exp_dir, fold, seed, threads = argv
    try:
        exp = Experiment.load(exp_dir)
        run_member(exp, Member(seed=int(seed), fold=int(fold)), threads=int(threads), progress=False)
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_member_main(sys.argv[1:]))
