"""Command line of ignite_trainer: parse, validate, call the library (`train`, `evaluate`, `predict`, export).

Every `UserError` (bad file, value, config or checkpoint) is printed as one ``error:`` line with exit
code 2 and no traceback; a numerical fault that stops training exits with code 3.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import click

from ignite_trainer import __version__
from ignite_trainer.core.config import MAX_SEED, MAX_SYNTHETIC_PATIENTS, TrainConfig
from ignite_trainer.core.vocabulary import AGGREGATIONS, DEVICES, FORMATS, GRACE_HEARTBEATS, HEARTBEAT_INTERVAL, LABELS
from ignite_trainer.core.errors import ConfigError, TrainingAborted, UserError
from ignite_trainer.training.graceful import TrainingStopped

EXIT_BAD_INPUT = 2
#: OS errors that a path or the disk the user chose explains (too long, not a folder, read-only, full, ...):
#: the last line of defence for a path no library check named first.
FILE_SYSTEM_REFUSALS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                                  errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ELOOP, errno.ENOENT})
EXIT_TRAINING_ABORTED = 3

# ---------------------------------------------------------------------------------------------- config flags
#: The config fields that are flags of every command taking a run config (`train`, `cv`); each flag's type,
#: choices, help and shown default come from the `TrainConfig` field. Every field, these included, can also
#: be set with --config FILE or --set KEY=VALUE.
CONFIG_FLAGS = frozenset({
    "data", "format", "skip_bad", "cache_dir", "window_seconds", "n_folds", "fold", "batch_size", "learning_rate",
    "weight_decay", "epochs", "early_stopping_patience", "gradient_clip", "amp", "model", "monitor", "seed", "device",
    "num_workers", "output_dir", "name", "progress", "tracker", "tracking_uri", "nproc_per_node", "backend",
    "feature_dtype", "amp_dtype", "sync_every", "resident_features", "compile", "cpu_kernel", "eval_batch_size",
    "demographics", "init_from", "freeze_trunk", "trunk_lr_scale", "warmup_epochs", "heads",
    "attribute_loss_weight", "segmentation_loss_weight", "patient_model",
})
#: Flags not spelled --<field-name-with-dashes>.
FLAG_SPELLINGS = {"learning_rate": "--lr", "early_stopping_patience": "--patience", "gradient_clip": "--grad-clip"}


def config_flag(name: str) -> str:
    """The flag of config field ``name``: ``--lr`` for ``learning_rate``, ``--batch-size`` for ``batch_size``."""
    return FLAG_SPELLINGS.get(name, "--" + name.replace("_", "-"))


def shown_default(value: Any, flag: str) -> str | None:
    """A field's default as its help shows it (None: not shown, the help says what empty means)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return flag[2:] if value else f"no-{flag[2:]}"
    return str(value)


def config_options(helps: dict[str, str] | None = None,
                   names: frozenset[str] = CONFIG_FLAGS) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--config, one option per field of ``names`` (default `CONFIG_FLAGS`; in the dataclass's order; the
    parameter is named as the field), and --set. ``helps`` replaces a field's help where the command gives it
    another meaning."""
    hints = typing.get_type_hints(TrainConfig)
    options = [click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of config fields.")]
    for f in dataclasses.fields(TrainConfig):
        if f.name not in names:
            continue
        flag = config_flag(f.name)
        kind, args = hints[f.name], typing.get_args(hints[f.name])
        if type(None) in args:  # an optional field: None is its default, never a value to type
            kind = next(a for a in args if a is not type(None))
        text = (helps or {}).get(f.name, f.metadata["help"])
        default = shown_default(f.default, flag)
        help_text = text + ("" if default is None else f" [default: {default}]")
        if kind is bool:
            options.append(click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text))
        elif typing.get_origin(kind) is list:  # NAME,NAME,...
            options.append(click.option(flag, f.name, type=str, default=None, callback=_comma_list,
                                        help=help_text + " (comma-separated)"))
        else:
            kind = click.Choice(typing.get_args(kind)) if typing.get_origin(kind) is Literal else kind
            options.append(click.option(flag, f.name, type=kind, default=None, help=help_text))
    options.append(click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                                help="Set any config field; repeatable."))

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    """``a,b`` -> ``["a", "b"]``; an empty string is an empty list."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="ignite_trainer", message="%(prog)s %(version)s")
def cli() -> None:
    """Train and evaluate multi-label heart-sound classifiers (labels: heart, murmur) on PyTorch Ignite."""


@cli.command()
@config_options()
@click.option("--resume", type=click.Path(file_okay=False), default=None, help="Continue the run in RUN_DIR from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory of the same name.")
def train(config_file: str | None, resume: str | None, overwrite: bool, assignments: tuple[str, ...], **flags: Any) -> None:
    """Train a model; writes runs/<name>/ (config, checkpoints, metrics.jsonl, TensorBoard, train.log)."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    if resume is not None:
        if config_file:
            raise click.UsageError("--config cannot be combined with --resume (the run's own config is used)")
        if overwrite:
            raise click.UsageError("--overwrite cannot be combined with --resume")
        overrides.update(_parse_sets(assignments))
        config = None
    else:
        config = TrainConfig.from_yaml(config_file) if config_file else TrainConfig()
        if config_file and _is_run_config(Path(config_file)) and "name" not in overrides:
            config = config.updated({"name": None})  # re-running a run: a new run directory, not a clash
        config = config.updated(overrides, source="command line").with_overrides(list(assignments))

    from ignite_trainer.training.run import train as run_training  # imported after validation: bad flags fail fast

    if config is None:
        summary = run_training(TrainConfig(), resume=resume, overrides=overrides)
    else:
        summary = run_training(config, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun every rank returns here; rank 0 speaks for the run
    if summary.get("already_finished"):
        click.echo(f"{summary['run_dir']}: run already finished at epoch {summary['epoch']}; nothing to do")
        return
    print_summary(summary)


#: The config flags of `pretrain`: the settings it shares with training (every field via --config or --set).
PRETRAIN_FLAGS = frozenset({
    "format", "skip_bad", "cache_dir", "window_seconds", "batch_size", "learning_rate", "weight_decay", "epochs",
    "gradient_clip", "amp", "model", "seed", "device", "num_workers", "output_dir", "name", "progress", "sync_every",
})


@cli.command()
@click.argument("data", metavar="DATA...", nargs=-1, type=click.Path())
@config_options(names=PRETRAIN_FLAGS)
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the pretraining run in RUN_DIR from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory of the same name.")
def pretrain(data: tuple[str, ...], config_file: str | None, resume: str | None, overwrite: bool,
             assignments: tuple[str, ...], **flags: Any) -> None:
    """Learn a model's trunk without labels (BYOL-A) from DATA: dataset folders (labels ignored), WAV folders or
    WAV files; writes runs/<name>/ with checkpoints and trunk.safetensors for train to start from."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    if resume is not None:
        if config_file or data:
            raise click.UsageError("--resume takes neither DATA nor --config (the run's own are used)")
        if overwrite:
            raise click.UsageError("--overwrite cannot be combined with --resume")
        overrides.update(_parse_sets(assignments))
        config = None
    else:
        config = TrainConfig.from_yaml(config_file) if config_file else TrainConfig()
        if data:
            overrides["pretrain_data"] = list(data)
        config = config.updated(overrides, source="command line").with_overrides(list(assignments))
        if not config.pretrain_data:
            raise click.UsageError("give DATA: one or more dataset folders, WAV folders or WAV files")

    from ignite_trainer.training.pretrain import pretrain as run_pretraining

    if config is None:
        summary = run_pretraining(TrainConfig(), resume=resume, overrides=overrides)
    else:
        summary = run_pretraining(config, overwrite=overwrite)
    if summary.get("already_finished"):
        click.echo(f"{summary['run_dir']}: run already finished at epoch {summary['epoch']}; nothing to do")
        return
    click.echo(f"run directory: {summary['run_dir']}")
    click.echo(f"pretrained model: {summary['trunk']}")
    for line in summary.get("skipped") or []:
        click.echo(f"skipped: {line}")


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a run directory's own ``config.yaml`` (its folder holds ``checkpoints/``): its
    ``name`` is that run's, so re-running it gets a new name unless ``--name`` is given."""
    return path.name == "config.yaml" and (path.parent / "checkpoints").is_dir()


def _parse_sets(assignments: tuple[str, ...]) -> dict[str, Any]:
    """``--set`` values as a mapping (validated later against the resumed config)."""
    base = TrainConfig()
    changed = base.with_overrides(list(assignments)).to_dict()
    keys = {a.partition("=")[0].strip() for a in assignments}
    return {k: changed[k] for k in keys}


def print_summary(summary: dict[str, Any]) -> None:
    """Where the run is and what was skipped; training itself has already logged the epochs and the summary
    of the best checkpoint (console and train.log)."""
    click.echo(f"run directory: {summary['run_dir']}")
    for line in summary.get("skipped") or []:
        click.echo(f"skipped: {line}")


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--patients", type=int, default=300, show_default=True,
              help=f"Number of patients, 1 to {MAX_SYNTHETIC_PATIENTS} (about 0.5 MB each in CirCor format).")
@click.option("--seed", type=int, default=0, show_default=True, help=f"Same seed, same bytes; 0 to {MAX_SEED}.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="circor2022", show_default=True)
@click.option("--difficulty", type=click.Choice(["default", "hard"]), default="default", show_default=True,
              help="hard: noisier recordings, subtler murmurs and an age-linked outcome.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in OUT_DIR (kept until the new one is complete).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on a terminal.")
def synth(out_dir: str, patients: int, seed: int, fmt: str, difficulty: str, overwrite: bool, progress: bool) -> None:
    """Write a synthetic PCG dataset in CirCor 2022 (or PhysioNet 2016) on-disk layout."""
    from ignite_trainer.data.synthetic import write_synthetic

    path = write_synthetic(Path(out_dir), patients, seed, fmt=fmt, difficulty=difficulty, overwrite=overwrite,
                           progress=progress)
    click.echo(f"wrote {patients} synthetic patients ({fmt}, {difficulty}) to {path}")


_UNKNOWN_MARGIN = click.option(
    "--unknown-margin", type=click.FloatRange(0.0, 0.5), default=0.1, show_default=True,
    help="For a model saved without a decision layer: murmur probabilities within this distance of the murmur "
         "threshold are called Unknown (2022 scoring).")
_DEVICE = click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
                       help="Where to run the model.")


_MODEL_HELP = ("MODEL is a run directory, checkpoint or export, or an ensemble: a cv experiment directory, an "
               "exported ensemble, or models separated by commas (RUN_A,RUN_B); an ensemble's recording "
               "probability is the mean of its members' probabilities, decided by its out-of-fold thresholds and "
               "decision layer.")


_MC_DROPOUT = click.option("--mc-dropout", type=click.IntRange(min=1), default=None, metavar="N",
                           help="Also N Monte Carlo dropout passes: each patient's mean probability and its sd.")
_MC_SEED = click.option("--mc-seed", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Seed of the Monte Carlo dropout masks (with the pass and window index).")


def _model_source(text: str) -> str | list[str]:
    """MODEL as typed: one path, or a comma-separated list of models (an ensemble)."""
    parts = [p for p in text.split(",") if p]
    return parts if len(parts) > 1 else text


@cli.command(epilog=_MODEL_HELP)
@click.argument("model_path", metavar="MODEL", type=str)
@click.option("--data", type=click.Path(), default=None, help="Labelled dataset folder [the run's own data; "
              "required for an ensemble].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Layout of --data [detected].")
@click.option("--split", type=click.Choice(["val", "all"]), default=None,
              help="Patients to score: the run's validation split or all [val without --data, all with it].")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default=None,
              help="Recordings -> patients: mean probability or any recording positive [the run's].")
@_UNKNOWN_MARGIN
@click.option("--output-dir", type=click.Path(file_okay=False), default=None, help="Report folder [RUN_DIR/report].")
@_DEVICE
@_MC_DROPOUT
@_MC_SEED
def evaluate(model_path: str, data: str | None, fmt: str | None, split: str | None, aggregation: str | None,
             unknown_margin: float, output_dir: str | None, device: str, mc_dropout: int | None, mc_seed: int) -> None:
    """Score a model per window, recording and patient; write report/metrics.json, patients.csv, report.md."""
    from ignite_trainer.use.evaluation import evaluate as run_evaluation

    result = run_evaluation(_model_source(model_path), data=data, fmt=fmt, split=split, aggregation=aggregation,
                            unknown_margin=unknown_margin, out_dir=output_dir, device=device, mc_dropout=mc_dropout,
                            mc_seed=mc_seed)
    print_evaluation(result)


def print_evaluation(result: dict[str, Any]) -> None:
    from ignite_trainer.training.console import format_score

    counts, t, ch = result["counts"], result["thresholds"], result["challenge"]
    click.echo(f"{result['data']} ({result['split']}): {counts['patient']} patients, {counts['recording']} recordings, "
               f"{counts['window']} windows; thresholds heart {t['heart']:.3f} murmur {t['murmur']:.3f}"
               + ("" if result["thresholds_tuned"] else " (default)"))
    names = ["accuracy", "precision", "recall", "specificity", "f1", "auroc", "auprc"]
    click.echo(f"{'patients':<10}" + "".join(f"{n:>12}" for n in names))
    for label in LABELS:
        scores = result["levels"]["patient"].get(label)
        if scores is None:
            continue  # no patient holds this label (murmur on PhysioNet 2016 data)
        click.echo(f"{label:<10}" + "".join(f"{format_score(scores[n]):>12}" for n in names))
    for name, value in (("project's 2016 MAcc (heart, recordings)", result.get("project", {}).get("heart_macc")),
                        ("2022 Challenge murmur weighted accuracy", ch["murmur_weighted_accuracy"]),
                        ("2022 Challenge outcome cost", ch["outcome_cost"])):
        click.echo(f"{name}: {format_score(value)}")
    cal = result.get("calibration")
    if cal:
        click.echo(f"calibration (ECE, {cal['bins']} bins, {cal['level']}s; {cal['source']}; "
                   f"{'used' if cal['applied'] else 'not used'} for decisions):")
        for label in LABELS:
            click.echo(f"  {label:<8} T={cal['temperatures'][label]:.4g}  ECE before {format_score(cal['ece_before'][label])}"
                       f"  after {format_score(cal['ece_after'][label])}")
    if "challenge_scores" in result["files"]:
        click.echo(f"official scores file: {result['files']['challenge_scores']}")
    click.echo(f"report: {result['files']['report']}")


@cli.command(epilog=_MODEL_HELP)
@click.argument("model_path", metavar="MODEL", type=str)
@click.argument("inputs", metavar="PATH...", nargs=-1, required=True, type=click.Path())
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="CSV file [stdout].")
@click.option("--challenge-dir", type=click.Path(file_okay=False), default=None,
              help="Also write the 2022 Challenge per-patient files <id>.csv here.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Layout of dataset folders [detected].")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default=None,
              help="Recordings -> patients: mean probability or any recording positive [the run's].")
@click.option("--attributes", "attributes_out", type=click.Path(dir_okay=False), default=None,
              help="CSV of the murmur descriptors per patient, for a model trained with descriptor heads "
                   "[<output>.attributes.csv beside --output].")
@_UNKNOWN_MARGIN
@_DEVICE
@_MC_DROPOUT
@_MC_SEED
@click.option("--mc-output", type=click.Path(dir_okay=False), default=None,
              help="CSV of each patient's Monte Carlo dropout mean and sd (needed with --mc-dropout).")
def predict(model_path: str, inputs: tuple[str, ...], output: str | None, challenge_dir: str | None, fmt: str | None,
            aggregation: str | None, attributes_out: str | None, unknown_margin: float, device: str,
            mc_dropout: int | None, mc_seed: int, mc_output: str | None) -> None:
    """Predict heart and murmur per recording and per patient for WAV files or dataset folders.

    The model is a run directory (its best checkpoint), a checkpoint file or a .safetensors export.
    """
    from ignite_trainer.use.heads_output import write_attributes_csv
    from ignite_trainer.use.inference import predict as run_prediction
    from ignite_trainer.use.writers import write_challenge_outputs, write_predictions_csv

    if (mc_dropout is None) != (mc_output is None):
        raise click.UsageError("--mc-dropout and --mc-output go together (N passes, and the CSV they are written to)")
    result = run_prediction(_model_source(model_path), list(inputs), fmt=fmt, aggregation=aggregation,
                            unknown_margin=unknown_margin, device=device, challenge=challenge_dir is not None)
    has_attributes = result.heads is not None and bool(result.heads[0].attributes)
    if attributes_out is not None and not has_attributes:
        raise ConfigError(f"--attributes: {model_path} was trained without murmur-descriptor heads (heads), so it "
                          "predicts no descriptors")
    write_predictions_csv(result, output)
    if has_attributes and (attributes_out is not None or output is not None):
        path = attributes_out or str(Path(output).with_suffix("")) + ".attributes.csv"
        write_attributes_csv(*result.heads, result.recordings, path)
        click.echo(f"wrote the murmur descriptors of {len(result.patients)} patient(s) to {path}", err=True)
    elif has_attributes:
        click.echo("the model predicts murmur descriptors: --attributes FILE (or --output) writes them", err=True)
    if challenge_dir is not None:
        written = write_challenge_outputs(result, challenge_dir)
        click.echo(f"wrote {len(written)} challenge file(s) to {challenge_dir}", err=True)
    if output is not None:
        click.echo(f"wrote {len(result.recordings)} recording and {len(result.patients)} patient row(s) to {output}",
                   err=True)
    if mc_dropout is not None:
        from ignite_trainer.data.discovery import discover_recordings
        from ignite_trainer.use.ensemble import Ensemble, load_model
        from ignite_trainer.use.mc_dropout import mc_dropout as run_mc, write_mc_csv

        trained = load_model(_model_source(model_path))
        if isinstance(trained, Ensemble):
            raise click.UsageError("--mc-dropout runs one model, not an ensemble")
        mc = run_mc(trained, discover_recordings(list(inputs), fmt), mc_dropout, mc_seed, aggregation, device)
        write_mc_csv(mc, mc_output)
        click.echo(f"wrote {len(mc.patients)} patient row(s) of {mc_dropout} dropout passes to {mc_output}", err=True)


@cli.command(epilog=_MODEL_HELP)
@click.argument("model_path", metavar="MODEL", type=str)
@click.argument("out_path", metavar="OUT.safetensors", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT.safetensors if it exists.")
def export(model_path: str, out_path: str, overwrite: bool) -> None:
    """Export the model weights as safetensors, with its config, thresholds and decision layer in the metadata
    (an ensemble: every member in one file)."""
    from ignite_trainer.use.ensemble import is_ensemble
    from ignite_trainer.use.export import export_ensemble, export_safetensors

    source = _model_source(model_path)
    if isinstance(source, list) or is_ensemble(source):
        path = export_ensemble(source, out_path, overwrite=overwrite)
    else:
        path = export_safetensors(source, out_path, overwrite=overwrite)
    click.echo(f"exported {model_path} to {path}")


# ---------------------------------------------------------------------------------------------- runs
@cli.command()
@click.argument("folder", required=False, default="runs", type=click.Path())
@click.option("--diff", nargs=2, metavar="A B", default=None,
              help="Print the config differences of runs A and B (names in FOLDER, or paths).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def runs(folder: str, diff: tuple[str, str] | None, as_json: bool) -> None:
    """Compare the runs in FOLDER [runs]: state, model, data, epochs, best epoch and score, Challenge scores, time."""
    import json

    from ignite_trainer.runs.table import config_diff, format_diff, format_table, read_runs, rows_as_json

    if diff is not None:
        a, b = (Path(name) if Path(name).is_dir() else Path(folder) / name for name in diff)
        differences = config_diff(a, b)
        if as_json:
            click.echo(json.dumps([{"field": k, "a": x, "b": y} for k, x, y in differences], indent=2))
        else:
            click.echo(format_diff(diff[0], diff[1], differences))
        return
    rows = read_runs(folder)
    if as_json:
        click.echo(rows_as_json(rows))
    elif not rows:
        click.echo(f"{folder}: no run directories (folders with a config.yaml)")
    else:
        click.echo(format_table(rows))


# ---------------------------------------------------------------------------------------------- sweep
@cli.command("sweep")
@click.argument("space_file", metavar="SPACE.yaml", type=click.Path(dir_okay=False))
@click.option("--trials", "n_trials", type=int, required=True, help="Trials in the whole sweep, over all workers.")
@click.option("--dir", "sweep_dir", type=click.Path(file_okay=False), default=None,
              help="Sweep directory: trials/, report/, study.db [sweeps/<SPACE name>].")
@click.option("--storage", type=str, default=None,
              help="Optuna storage shared by workers: an SQLAlchemy URL or journal:PATH [SWEEP_DIR/study.db].")
@click.option("--study", "study_name", type=str, default=None, help="Study name in the storage [the sweep directory's name].")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes on this machine.")
@click.option("--heartbeat", type=int, default=HEARTBEAT_INTERVAL, show_default=True,
              help="Seconds between a running trial's heartbeats in a database storage; a trial that misses "
                   f"{GRACE_HEARTBEATS} is failed and run again by another worker.")
def sweep_command(space_file: str, n_trials: int, sweep_dir: str | None, storage: str | None, study_name: str | None,
                  workers: int, heartbeat: int) -> None:
    """Search the settings in SPACE.yaml with Optuna; each trial is a run directory under SWEEP_DIR/trials.

    Started again (here or on other machines with the same --storage and --dir), it joins the study,
    recovers trials of dead workers and stops when --trials are done; SWEEP_DIR/report/ holds the result.
    """
    from ignite_trainer.experiments.sweeps import sweep
    from ignite_trainer.experiments.space import load_space

    space = load_space(space_file)
    summary = sweep(space, sweep_dir or Path("sweeps") / Path(space_file).stem, n_trials, storage=storage,
                    study_name=study_name, workers=workers, heartbeat=heartbeat)
    states = ", ".join(f"{n} {state}" for state, n in summary["states"].items() if n)
    click.echo(f"\nstudy {summary['study']}: {summary['trials']} trials ({states or 'none'})")
    best = summary["best"]
    if best is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        click.echo(f"best: trial {best['number']} {summary['objective']['metric']} {best['score']:.4f} ({params})")
        click.echo(f"best run: {best['run_dir']}")
    click.echo(f"report: {Path(summary['files']['trials']).parent}")
# ---------------------------------------------------------------------------------------------- cross-validation
@cli.command()
@config_options(helps={"output_dir": "parent folder of the experiment directory",
                       "name": "experiment directory name; default cv-<timestamp>"})
@click.option("--folds", type=int, default=None, help="Patient folds, stratified by heart x murmur [n_folds, else 5].")
@click.option("--seeds", type=str, default="0", show_default=True, help="Training seeds, comma separated (0,1,2).")
@click.option("--split-seed", type=int, default=None, help="Seed that deals the folds [the config's split_seed, else seed].")
@click.option("--splits", "splits_file", type=click.Path(dir_okay=False), default=None,
              help="Take the folds from this file (JSON lists of patient ids, or CSV patient_id,fold).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Runs at once, each its own process.")
@click.option("--only", multiple=True, metavar="FOLD:SEED", help="Run only this member (repeatable); no report.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the experiment in EXP_DIR: finished runs are skipped, an interrupted one resumes.")
@click.option("--collect", "collect_dir", type=click.Path(file_okay=False), default=None,
              help="Only build the report and the ensemble of EXP_DIR from the runs that finished.")
@click.option("--overwrite", is_flag=True, help="Replace an existing experiment directory.")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Resamples of the 95 % intervals.")
@click.option("--figures/--no-figures", default=True, help="Draw the report's figures [on].")
@click.option("--storage", type=str, default=None,
              help="Hand the members out to every machine running this command with the same --storage: a database "
                   "URL (sqlite:///FILE, postgresql://..., mysql://...); with --collect, check the queue first.")
@click.option("--study", "study_name", type=str, default=None,
              help="Study name of the members' queue in --storage [the experiment directory's name].")
@click.option("--heartbeat", type=int, default=None,
              help="Seconds between a running member's heartbeats in a database storage; a member that misses "
                   f"{GRACE_HEARTBEATS} is failed and run again by another machine [default: {HEARTBEAT_INTERVAL}].")
def cv(**params: Any) -> None:
    """Cross-validate: k patient folds x training seeds, out-of-fold predictions and thresholds, a report
    with spread and intervals, and the fold models as an ensemble (EXP_DIR/report/, EXP_DIR/ensemble.json)."""
    from ignite_trainer.experiments.cv_flags import CvFlags, FlagCombinationError, FlagValueError, run_cv

    typed = [(config_flag(name), name, params.pop(name)) for name in list(params) if name in CONFIG_FLAGS]
    flags = CvFlags(config_flags=tuple(t for t in typed if t[2] is not None), **params)
    try:
        run_cv(flags, echo=lambda line: click.echo(line, err=True), report=_print_cv)
    except FlagValueError as e:
        raise click.BadParameter(str(e)) from None
    except FlagCombinationError as e:
        raise click.UsageError(str(e)) from None


def _print_cv(summary: dict[str, Any]) -> None:
    """Pooled out-of-fold scores with their intervals, and the spread over runs."""
    def number(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    click.echo(f"\nexperiment: {summary['experiment']}  ({len(summary['members_finished'])} runs"
               + (f", missing {', '.join(summary['missing'])}" if summary["missing"] else "") + ")")
    final = list(summary["sets"])[-1]
    interval = summary["sets"][final]["pooled_interval"]
    click.echo(f"{'score':<26}{'pooled (' + final + ')':>22}{'95% CI':>26}{'runs mean ± sd':>24}")
    for metric in ("murmur_weighted_accuracy", "outcome_cost", "heart.f1", "murmur.f1", "heart.auroc", "murmur.auroc"):
        ci = interval.get(metric)
        runs = summary["runs"][metric]
        spread = number(runs["mean"]) + ("" if runs["sd"] is None else f" ± {runs['sd']:.3f}")
        click.echo(f"{metric:<26}{number(summary['pooled'][metric]):>22}"
                   f"{'' if ci is None else f'[{ci[0]:.3f}, {ci[1]:.3f}]':>26}{spread:>24}")
    t = summary["thresholds"]
    click.echo(f"out-of-fold thresholds: heart {t['heart']:.4f}, murmur {t['murmur']:.4f}")
    click.echo(f"out-of-fold Challenge decision layer: {Path(summary['experiment']) / 'decision.json'} "
               "(the Challenge scores above are its calls, per fold fitted on the other folds)")
    click.echo(f"report: {Path(summary['experiment']) / 'report' / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input, 3 for an aborted training)."""
    try:
        result = cli.main(args=argv, prog_name="cli.py", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as e:
        # click's own "Usage: ... Error: ..." block becomes the project's one line (same exit code 2)
        where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
        click.echo(f"error: {where}{e.format_message()}", err=True)
        return EXIT_BAD_INPUT
    except TrainingStopped as e:  # a signal stopped the run after a checkpoint: say how to go on
        click.echo(e.message, err=True)
        return e.exit_code
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return EXIT_BAD_INPUT
    except TrainingAborted as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_TRAINING_ABORTED
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_BAD_INPUT
    except OSError as e:
        if e.errno not in FILE_SYSTEM_REFUSALS or e.filename is None:
            raise  # not something the user's paths or disk explain: a bug, keep the traceback
        click.echo(f"error: {e.filename}: {e.strerror}", err=True)
        return EXIT_BAD_INPUT
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
