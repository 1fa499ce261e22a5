"""Command line of ignite_trainer: parse, validate, call the library (`train`, `evaluate`, `predict`, export).

Every `UserError` (bad file, value, config or checkpoint) is printed as one ``error:`` line with exit
code 2 and no traceback; a numerical fault that stops training exits with code 3.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import click

from ignite_trainer.config import TrainConfig
from ignite_trainer.vocabulary import AGGREGATIONS, DEVICES, FORMATS, LABELS
from ignite_trainer.errors import TrainingAborted, UserError
from ignite_trainer.graceful import TrainingStopped

EXIT_BAD_INPUT = 2
#: OS errors that a path or the disk the user chose explains (too long, not a folder, read-only, full, ...):
#: the last line of defence for a path no library check named first.
FILE_SYSTEM_REFUSALS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                                  errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ELOOP, errno.ENOENT})
EXIT_TRAINING_ABORTED = 3

# CLI flag -> config field; each flag defaults to None so that only what the user typed overrides.
TRAIN_FLAGS: dict[str, str] = {
    "data": "data", "fmt": "format", "epochs": "epochs", "batch_size": "batch_size", "lr": "learning_rate",
    "weight_decay": "weight_decay", "patience": "early_stopping_patience", "grad_clip": "gradient_clip",
    "seed": "seed", "output_dir": "output_dir", "name": "name", "device": "device", "amp": "amp",
    "num_workers": "num_workers", "model": "model", "skip_bad": "skip_bad", "progress": "progress",
    "nproc_per_node": "nproc_per_node", "backend": "backend",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Train and evaluate multi-label heart-sound classifiers (labels: heart, murmur) on PyTorch Ignite."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of config fields.")
@click.option("--data", type=str, default=None, help="Dataset root (default: the embedded synthetic CirCor-format set).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="On-disk layout of --data.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs [100].")
@click.option("--batch-size", type=int, default=None, help="Global batch size [32].")
@click.option("--lr", type=float, default=None, help="AdamW learning rate [0.001].")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay [0.01].")
@click.option("--patience", type=int, default=None, help="Early-stopping patience in epochs; 0 disables [15].")
@click.option("--grad-clip", type=float, default=None, help="Max gradient norm; 0 disables [1.0].")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--output-dir", type=str, default=None, help="Parent folder of run directories [runs].")
@click.option("--name", type=str, default=None, help="Run directory name [a timestamp].")
@click.option("--resume", type=click.Path(file_okay=False), default=None, help="Continue the run in RUN_DIR from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory of the same name.")
@click.option("--device", type=click.Choice(DEVICES), default=None, help="Where to train [auto].")
@click.option("--amp/--no-amp", default=None, help="Mixed precision [off].")
@click.option("--num-workers", type=int, default=None, help="DataLoader workers [0].")
@click.option("--model", type=str, default=None, help="Model name from the registry [attention_cnn].")
@click.option("--skip-bad/--no-skip-bad", default=None, help="Skip unreadable recordings with a warning [stop].")
@click.option("--progress/--no-progress", default=None, help="Show the progress bar [on].")
@click.option("--nproc-per-node", type=int, default=None, help="Processes on this node (ignite.distributed) [1].")
@click.option("--backend", type=click.Choice(["gloo", "nccl"]), default=None, help="Distributed backend [gloo on CPU].")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Set any config field; repeatable.")
def train(config_file: str | None, resume: str | None, overwrite: bool, assignments: tuple[str, ...], **flags: Any) -> None:
    """Train a model; writes runs/<name>/ (config, checkpoints, metrics.jsonl, TensorBoard, train.log)."""
    overrides = {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}
    if resume is not None:
        if config_file:
            raise click.UsageError("--config cannot be combined with --resume (the run's own config is used)")
        if overwrite:
            raise click.UsageError("--overwrite cannot be combined with --resume")
        overrides.update(_parse_sets(assignments))
        config = None
    else:
        config = TrainConfig.from_yaml(config_file) if config_file else TrainConfig()
        config = config.updated(overrides, source="command line").with_overrides(list(assignments))

    from ignite_trainer.run import train as run_training  # imported after validation: bad flags fail fast

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


def _parse_sets(assignments: tuple[str, ...]) -> dict[str, Any]:
    """``--set`` values as a mapping (validated later against the resumed config)."""
    base = TrainConfig()
    changed = base.with_overrides(list(assignments)).to_dict()
    keys = {a.partition("=")[0].strip() for a in assignments}
    return {k: changed[k] for k in keys}


def print_summary(summary: dict[str, Any]) -> None:
    metrics = summary.get("metrics")
    click.echo(f"\nrun directory: {summary['run_dir']}")
    for line in summary.get("skipped") or []:
        click.echo(f"skipped: {line}")
    if not metrics:
        return
    click.echo(f"epoch {metrics['epoch']}: train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}"
               f"  macro_f1 {metrics['macro_f1']:.3f}")
    names = ["accuracy", "precision", "recall", "specificity", "f1"]
    click.echo(f"{'label':<8}" + "".join(f"{n:>12}" for n in names))
    for label in LABELS:
        click.echo(f"{label:<8}" + "".join(f"{metrics[label][n]:>12.3f}" for n in names))


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--patients", type=int, default=300, show_default=True, help="Number of patients.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="circor2022", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in OUT_DIR.")
def synth(out_dir: str, patients: int, seed: int, fmt: str, overwrite: bool) -> None:
    """Write a synthetic PCG dataset in CirCor 2022 (or PhysioNet 2016) on-disk layout."""
    from ignite_trainer.data.synthetic import write_synthetic

    if patients < 1:
        raise click.BadParameter(f"--patients={patients} must be >= 1")
    path = write_synthetic(Path(out_dir), patients, seed, fmt=fmt, overwrite=overwrite)
    click.echo(f"wrote {patients} synthetic patients ({fmt}) to {path}")


_UNKNOWN_MARGIN = click.option(
    "--unknown-margin", type=click.FloatRange(0.0, 0.5), default=0.1, show_default=True,
    help="Murmur probabilities within this distance of the murmur threshold are called Unknown (2022 scoring).")
_DEVICE = click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
                       help="Where to run the model.")


@cli.command()
@click.argument("model_path", metavar="RUN_DIR|CHECKPOINT", type=click.Path())
@click.option("--data", type=click.Path(), default=None, help="Labelled dataset folder [the run's own data].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Layout of --data [detected].")
@click.option("--split", type=click.Choice(["val", "all"]), default=None,
              help="Patients to score: the run's validation split or all [val without --data, all with it].")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default=None,
              help="Recordings -> patients: mean probability or any recording positive [the run's].")
@_UNKNOWN_MARGIN
@click.option("--output-dir", type=click.Path(file_okay=False), default=None, help="Report folder [RUN_DIR/report].")
@_DEVICE
def evaluate(model_path: str, data: str | None, fmt: str | None, split: str | None, aggregation: str | None,
             unknown_margin: float, output_dir: str | None, device: str) -> None:
    """Score a model per window, recording and patient; write report/metrics.json, patients.csv, report.md."""
    from ignite_trainer.evaluation import evaluate as run_evaluation

    result = run_evaluation(model_path, data=data, fmt=fmt, split=split, aggregation=aggregation,
                            unknown_margin=unknown_margin, out_dir=output_dir, device=device)
    print_evaluation(result)


def print_evaluation(result: dict[str, Any]) -> None:
    counts, t, ch = result["counts"], result["thresholds"], result["challenge"]
    click.echo(f"{result['data']} ({result['split']}): {counts['patient']} patients, {counts['recording']} recordings, "
               f"{counts['window']} windows; thresholds heart {t['heart']:.3f} murmur {t['murmur']:.3f}"
               + ("" if result["thresholds_tuned"] else " (default)"))
    names = ["accuracy", "precision", "recall", "specificity", "f1", "auroc", "auprc"]
    click.echo(f"{'patients':<10}" + "".join(f"{n:>12}" for n in names))
    for label in LABELS:
        scores = result["levels"]["patient"][label]
        click.echo(f"{label:<10}" + "".join(f"{scores[n]:>12.3f}" for n in names))
    for name, key in (("2016 MAcc (heart, recordings)", "heart_macc"),
                      ("2022 murmur weighted accuracy", "murmur_weighted_accuracy"),
                      ("2022 outcome cost", "outcome_cost")):
        value = ch[key]
        click.echo(f"{name}: {'n/a' if value is None else f'{value:.3f}'}")
    click.echo(f"report: {result['files']['report']}")


@cli.command()
@click.argument("model_path", metavar="CHECKPOINT", type=click.Path())
@click.argument("inputs", metavar="PATH...", nargs=-1, required=True, type=click.Path())
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="CSV file [stdout].")
@click.option("--challenge-dir", type=click.Path(file_okay=False), default=None,
              help="Also write the 2022 Challenge per-patient files <id>.csv here.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Layout of dataset folders [detected].")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default=None,
              help="Recordings -> patients: mean probability or any recording positive [the run's].")
@_UNKNOWN_MARGIN
@_DEVICE
def predict(model_path: str, inputs: tuple[str, ...], output: str | None, challenge_dir: str | None, fmt: str | None,
            aggregation: str | None, unknown_margin: float, device: str) -> None:
    """Predict heart and murmur per recording and per patient for WAV files or dataset folders."""
    from ignite_trainer.inference import predict as run_prediction
    from ignite_trainer.writers import write_challenge_outputs, write_predictions_csv

    result = run_prediction(model_path, list(inputs), fmt=fmt, aggregation=aggregation,
                            unknown_margin=unknown_margin, device=device)
    write_predictions_csv(result, output)
    if challenge_dir is not None:
        written = write_challenge_outputs(result, challenge_dir)
        click.echo(f"wrote {len(written)} challenge file(s) to {challenge_dir}", err=True)
    if output is not None:
        click.echo(f"wrote {len(result.recordings)} recording and {len(result.patients)} patient row(s) to {output}",
                   err=True)


@cli.command()
@click.argument("model_path", metavar="CHECKPOINT|RUN_DIR", type=click.Path())
@click.argument("out_path", metavar="OUT.safetensors", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT.safetensors if it exists.")
def export(model_path: str, out_path: str, overwrite: bool) -> None:
    """Export the model weights as safetensors, with its config and thresholds in the metadata."""
    from ignite_trainer.model_files import export_safetensors

    path = export_safetensors(model_path, out_path, overwrite=overwrite)
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

    from ignite_trainer.runs_table import config_diff, format_diff, format_table, read_runs, rows_as_json

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
def sweep_command(space_file: str, n_trials: int, sweep_dir: str | None, storage: str | None, study_name: str | None,
                  workers: int) -> None:
    """Search the settings in SPACE.yaml with Optuna; each trial is a run directory under SWEEP_DIR/trials.

    Started again (here or on other machines with the same --storage and --dir), it joins the study,
    recovers trials of dead workers and stops when --trials are done; SWEEP_DIR/report/ holds the result.
    """
    from ignite_trainer.sweep import sweep
    from ignite_trainer.sweep_space import load_space

    space = load_space(space_file)
    summary = sweep(space, sweep_dir or Path("sweeps") / Path(space_file).stem, n_trials, storage=storage,
                    study_name=study_name, workers=workers)
    states = ", ".join(f"{n} {state}" for state, n in summary["states"].items() if n)
    click.echo(f"\nstudy {summary['study']}: {summary['trials']} trials ({states or 'none'})")
    best = summary["best"]
    if best is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        click.echo(f"best: trial {best['number']} {summary['objective']['metric']} {best['score']:.4f} ({params})")
        click.echo(f"best run: {best['run_dir']}")
    click.echo(f"report: {Path(summary['files']['trials']).parent}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input, 3 for an aborted training)."""
    try:
        result = cli.main(args=argv, prog_name="cli.py", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except TrainingStopped as e:  # a signal stopped the run after a checkpoint: say how to go on
        click.echo(e.message, err=True)
        return e.exit_code
    except click.ClickException as e:
        e.show()
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
