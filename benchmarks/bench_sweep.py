"""Sweep throughput (trials per hour with 1 and K workers) and the storage's own cost per trial; prints a table.

    python benchmarks/bench_sweep.py                            # default model, 1-epoch trials, 60 patients
    python benchmarks/bench_sweep.py --patients 300 --epochs 2  # the full embedded set
    python benchmarks/bench_sweep.py --workers 1 2 4 --trials 8 --train-storage postgresql --postgres auto

``--postgres URL`` (a database of an existing server) or ``--postgres auto`` (a throw-away server started
here, as the tests do: Debian's ``initdb``/``pg_ctl``, removed at the end) adds PostgreSQL to the storages
measured; ``--train-storage`` picks the storage of the training rows.

Trials train the default model (``attention_cnn``) on the embedded synthetic set, searching the learning
rate; the feature cache is filled before timing. The storage overhead is measured with the training
replaced by a stub that returns at once, so what remains is Optuna's work per trial (ask, the user
attributes, heartbeat, tell, the budget check) plus the sweep's bookkeeping, on SQLite, on a journal file and
on PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite_trainer.experiments import sweeps as sweep_module  # noqa: E402
from ignite_trainer.experiments import trials as trial_module  # noqa: E402
from ignite_trainer.core.config import TrainConfig  # noqa: E402
from ignite_trainer.training.run import prepare_data  # noqa: E402
from ignite_trainer.experiments.space import parse_space  # noqa: E402


def space(cache: Path, patients: int, epochs: int) -> dict:
    return {"params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "objective": {"metric": "val_loss"}, "pruner": {"name": "none"},
            "base": {"cache_dir": str(cache), "synthetic_patients": patients, "epochs": epochs, "device": "cpu",
                     "early_stopping_patience": 0}}


def stub_runner(config, metric, direction, **_):
    run_dir = Path(config.output_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    return trial_module.TrialResult(run_dir, 0.5, 1)


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' throw-away server


@contextlib.contextmanager
def postgres(url: str | None):
    """None, the given URL, or (``auto``) a throw-away server's URL for as long as the block runs."""
    if url != "auto":
        yield url
        return
    from pg_server import ThrowawayPostgres

    with ThrowawayPostgres() as server:
        yield server.url("postgres")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stub-trials", type=int, default=30)
    parser.add_argument("--stub-only", action="store_true", help="only the storage overhead rows")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ignite_bench_sweep_cache")
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL, or 'auto' for a throw-away server")
    parser.add_argument("--train-storage", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    with postgres(args.postgres) as pg:
        run(args, pg)


def run(args: argparse.Namespace, pg: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    values = space(args.cache, args.patients, args.epochs)

    started = time.perf_counter()
    prepare_data(TrainConfig.from_mapping(values["base"]))
    print(f"feature cache ready in {time.perf_counter() - started:.1f} s ({args.patients} patients)", file=sys.stderr)

    rows = []
    from pg_server import create_database

    if args.train_storage == "postgresql" and not pg:
        raise SystemExit("error: --train-storage postgresql needs --postgres URL or --postgres auto")
    for workers in [] if args.stub_only else args.workers:
        storage = create_database(pg, f"train_w{workers}") if args.train_storage == "postgresql" else None
        started = time.perf_counter()
        summary = sweep_module.sweep(parse_space(values), work / f"train_w{workers}", args.trials, workers=workers,
                                     storage=storage)
        seconds = time.perf_counter() - started
        rows.append((f"train, {workers} worker(s), {args.train_storage}", summary["counted"], seconds,
                     f"{summary['counted'] / seconds * 3600:.1f} trials/h"))

    trial_module.TRIAL_RUNNERS["run"] = stub_runner
    storages = [("sqlite", None), ("journal", f"journal:{work / 'stub.journal'}")]
    if pg:
        storages.append(("postgresql", create_database(pg, "stub")))
    for name, storage in storages:
        started = time.perf_counter()
        summary = sweep_module.sweep(parse_space(values), work / f"stub_{name}", args.stub_trials, storage=storage)
        seconds = time.perf_counter() - started
        started = time.perf_counter()  # again with the budget spent: opening the study and the report alone
        sweep_module.sweep(parse_space(values), work / f"stub_{name}", args.stub_trials, storage=storage)
        fixed = time.perf_counter() - started
        rows.append((f"stub trial, 1 worker, {name}", summary["counted"], seconds,
                     f"{(seconds - fixed) / summary['counted'] * 1000:.0f} ms/trial (+ {fixed:.1f} s open + report)"))

    print("\n| run | trials | wall s | figure |\n|---|---|---|---|")
    for name, n, seconds, figure in rows:
        print(f"| {name} | {n} | {seconds:.1f} | {figure} |")


if __name__ == "__main__":
    main()
