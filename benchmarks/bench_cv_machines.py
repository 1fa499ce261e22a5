"""Cross-validation on two "machines" through a storage queue against one machine: wall time, identical scores.

One machine: ``cli.py cv`` with ``--folds`` × ``--seeds`` members, one after another. Two machines: two
``cli.py cv ... --storage URL`` processes started together, each with its own run root (no shared folder)
and presenting itself as its own host (``IGNITE_TRAINER_WORKER_HOST``); then the second one's member folders
are copied into the first one's experiment and ``cv --collect`` builds the report. Every process trains
with one torch thread, so the members are the same computations either way and the pooled out-of-fold
scores must be identical (printed side by side, and ``oof_predictions.csv`` compared byte for byte).

    python benchmarks/bench_cv_machines.py --folds 3 --seeds 0 1 --epochs 3                 # SQLite queue
    python benchmarks/bench_cv_machines.py --folds 3 --seeds 0 1 --epochs 3 --postgres auto  # PostgreSQL queue
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sweep import postgres
from pg_server import create_database

REPO = Path(__file__).resolve().parents[1]
KEYS = ("murmur_weighted_accuracy", "outcome_cost", "heart.auroc", "murmur.auroc")


def cv_command(args: argparse.Namespace, root: Path, *extra: str) -> list[str]:
    settings = {"synthetic_patients": args.patients, "n_mels": args.n_mels, "cache_dir": args.cache}
    return [sys.executable, "cli.py", "cv", *[f"--set={k}={v}" for k, v in settings.items()],
            "--epochs", str(args.epochs), "--folds", str(args.folds), "--seeds", ",".join(map(str, args.seeds)),
            "--output-dir", str(root), "--name", "exp", "--device", "cpu", "--no-progress", "--no-figures",
            "--bootstrap", "100", *extra]


def env(machine: str | None = None) -> dict[str, str]:
    values = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if machine:
        values["IGNITE_TRAINER_WORKER_HOST"] = machine
    return values


def run(commands: list[tuple[list[str], dict[str, str]]], logs: Path) -> float:
    """Start every command at once; the wall time until the last one ends (a failure stops the benchmark)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=e, stdout=open(logs / f"{i}.log", "w"), stderr=subprocess.STDOUT)
             for i, (cmd, e) in enumerate(commands)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"error: exit codes {codes}; see {logs}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-mels", type=int, default=32)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL, or 'auto' for a throw-away server")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench_cv_machines_"))).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args.cache = out / "cache"

    # fill the feature cache once, so neither row pays for it
    subprocess.run(cv_command(args, out / "warm", "--epochs", "1", "--only", "0:0"), cwd=REPO, env=env(), check=True,
                   capture_output=True)  # the later --epochs is the one click keeps

    with postgres(args.postgres) as pg:
        url = create_database(pg, "cv_machines") if pg else f"sqlite:///{out / 'queue.db'}"
        one = run([(cv_command(args, out / "one"), env())], out)
        two = run([(cv_command(args, out / "a", "--storage", url), env("machine-a")),
                   (cv_command(args, out / "b", "--storage", url), env("machine-b"))], out)
    ran_on_b = sorted(p.name for p in (out / "b" / "exp" / "runs").iterdir() if (p / "oof").is_dir())
    for name in ran_on_b:
        shutil.copytree(out / "b" / "exp" / "runs" / name, out / "a" / "exp" / "runs" / name, dirs_exist_ok=True)
    start = time.perf_counter()
    subprocess.run(cv_command(args, out / "a")[:3] + ["--collect", str(out / "a" / "exp"), "--no-figures",
                                                      "--bootstrap", "100"], cwd=REPO, env=env(), check=True,
                   capture_output=True)
    collect = time.perf_counter() - start

    pooled = {name: json.loads((out / name / "exp" / "report" / "summary.json").read_text())["pooled"]
              for name in ("one", "a")}
    same_oof = (out / "one" / "exp" / "oof_predictions.csv").read_bytes() == \
        (out / "a" / "exp" / "oof_predictions.csv").read_bytes()
    members = args.folds * len(args.seeds)
    print(f"\n{args.folds} folds x {len(args.seeds)} seeds = {members} members, {args.epochs} epochs each, "
          f"{args.patients} synthetic patients, n_mels {args.n_mels}, 1 torch thread per process; queue: "
          f"{'PostgreSQL' if pg else 'SQLite'}; machine-b ran {len(ran_on_b)} member(s): {', '.join(ran_on_b)}\n")
    print("| | wall s | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    print(f"| one machine | {one:.1f} | " + " | ".join(f"{pooled['one'][k]:.6g}" for k in KEYS) + " |")
    print(f"| two machines (+ collect {collect:.1f} s) | {two:.1f} | "
          + " | ".join(f"{pooled['a'][k]:.6g}" for k in KEYS) + " |")
    print(f"\nspeed-up {one / two:.2f}x (collect not counted); pooled scores identical: "
          f"{all(pooled['one'][k] == pooled['a'][k] for k in KEYS)}; oof_predictions.csv identical: {same_oof}")


if __name__ == "__main__":
    main()
