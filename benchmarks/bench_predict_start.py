"""Wall time of a whole `cli.py predict` process, start to first line of output and start to exit: a checkout
that builds the fused CPU kernel inside its first forward pass against one where the kernel is an opt-in.

Variants, run in turn within each repetition (so load from other jobs hits all of them):

- ``old, fresh machine``: the old checkout (``--old``) with ``TORCH_EXTENSIONS_DIR`` set to a new empty folder
  each time, so its first forward pass compiles the kernel (what a first predict on a new machine costs);
- ``old, warm cache``: the old checkout with a ``TORCH_EXTENSIONS_DIR`` its kernel was built into before the
  timed runs (an untimed warm-up run);
- ``new, default``: the new checkout (``--new``) with ``IGNITE_TRAINER_KERNEL_DIR`` set to a new empty folder
  each time (the default run does not use the kernel, so the folder stays empty);
- with ``--kernel-run RUN`` (a run trained with ``--cpu-kernel``), also ``new, kernel run, not built`` (an empty
  ``IGNITE_TRAINER_KERNEL_DIR``: predict must not build, it runs the ordinary modules) and
  ``new, kernel run, built`` (a kernel folder prepared before the timed runs: predict loads it).

Every process gets ``OMP_NUM_THREADS=--threads`` and no ``PYTHONPATH`` (each checkout's ``cli.py`` imports its
own package). One untimed run per checkout first warms the OS file cache and writes ``__pycache__``. The table
gives the median and the range over repetitions. "First line" is the first line predict writes to stdout (the
CSV header, or a row); with output to a file it is not measured.

    git worktree add /tmp/before cfbf4a0
    .venv/bin/python cli.py train --epochs 2 --output-dir /tmp/bench_runs --name p
    .venv/bin/python cli.py synth /tmp/pred_data --patients 20
    nice .venv/bin/python benchmarks/bench_predict_start.py --old /tmp/before --new . \\
        --model /tmp/bench_runs/p --data /tmp/pred_data --reps 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(checkout: Path, env: dict[str, str], model: Path, data: Path, threads: int) -> tuple[float | None, float]:
    """(seconds to the first stdout line, seconds to exit) of one ``cli.py predict MODEL DATA``."""
    full_env = dict(os.environ, OMP_NUM_THREADS=str(threads), **env)
    full_env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "cli.py", "predict", str(model), str(data)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=checkout, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    t_first = time.perf_counter() - start if first else None
    rest, err = proc.communicate()
    t_exit = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} in {checkout} failed ({proc.returncode}):\n{err.decode(errors='replace')[-2000:]}")
    lines = (first + rest).decode().splitlines()
    if len(lines) < 2:
        raise SystemExit(f"{cmd} in {checkout} wrote {len(lines)} lines")
    return t_first, t_exit


def fmt(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return "–"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"  # type: ignore[type-var]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout that builds the kernel in a forward pass")
    parser.add_argument("--new", type=Path, required=True, help="checkout with the kernel as an opt-in")
    parser.add_argument("--model", type=Path, required=True, help="run directory both checkouts can read")
    parser.add_argument("--old-model", type=Path, default=None, help="run directory for the old checkout [--model]")
    parser.add_argument("--kernel-run", type=Path, default=None, help="a run trained with --cpu-kernel (new code)")
    parser.add_argument("--data", type=Path, required=True, help="WAV files or a dataset folder to predict on")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    old, new = args.old.resolve(), args.new.resolve()
    model, data = args.model.resolve(), args.data.resolve()
    old_model = (args.old_model or args.model).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="predict_start_"))

    def fresh() -> str:
        return tempfile.mkdtemp(dir=scratch)

    warm_old = fresh()
    warm_kernel = fresh()
    # untimed: __pycache__ and the OS file cache of both checkouts; the old kernel built into warm_old
    t0 = time.perf_counter()
    timed(old, {"TORCH_EXTENSIONS_DIR": warm_old}, old_model, data, args.threads)
    print(f"# warm-up, old checkout, kernel built into an empty cache: {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    timed(new, {"IGNITE_TRAINER_KERNEL_DIR": fresh()}, model, data, args.threads)
    variants: list[tuple[str, Path, Path, object]] = [
        ("old, fresh machine (empty TORCH_EXTENSIONS_DIR)", old, old_model, lambda: {"TORCH_EXTENSIONS_DIR": fresh()}),
        ("old, warm cache", old, old_model, lambda: {"TORCH_EXTENSIONS_DIR": warm_old}),
        ("new, default (empty IGNITE_TRAINER_KERNEL_DIR)", new, model, lambda: {"IGNITE_TRAINER_KERNEL_DIR": fresh()}),
    ]
    if args.kernel_run is not None:
        kernel_run = args.kernel_run.resolve()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from ignite_trainer.model import cpu_kernels; "
                        "assert cpu_kernels.prepare(), cpu_kernels.kernel_status()"], cwd=new, check=True,
                       env={k: v for k, v in dict(os.environ, IGNITE_TRAINER_KERNEL_DIR=warm_kernel).items()
                            if k != "PYTHONPATH"})
        print(f"# new checkout, prepare() into an empty kernel folder: {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        variants += [
            ("new, --cpu-kernel run, kernel not built", new, kernel_run,
             lambda: {"IGNITE_TRAINER_KERNEL_DIR": fresh()}),
            ("new, --cpu-kernel run, kernel built", new, kernel_run,
             lambda: {"IGNITE_TRAINER_KERNEL_DIR": warm_kernel}),
        ]
    times: dict[str, list[tuple[float | None, float]]] = {label: [] for label, *_ in variants}
    for rep in range(args.reps):
        for label, checkout, run_dir, env in variants:
            t = timed(checkout, env(), run_dir, data, args.threads)  # type: ignore[operator]
            times[label].append(t)
            print(f"# rep {rep} {label}: first line {t[0]}, exit {t[1]:.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    print(f"`cli.py predict` on {data.name}, {args.reps} repetitions interleaved, OMP_NUM_THREADS={args.threads}; "
          "seconds from process start, median (min–max)")
    base = statistics.median(t[1] for t in times[variants[0][0]])
    head = ["variant", "to first line s", "to exit s", "× vs first row"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for label, *_ in variants:
        exits = [t[1] for t in times[label]]
        print(f"| {label} | {fmt([t[0] for t in times[label]])} | {fmt(exits)} | "
              f"{base / statistics.median(exits):.2f} |")


if __name__ == "__main__":
    main()
