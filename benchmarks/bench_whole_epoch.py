"""Whole `cli.py train` epochs of two or more checkouts (or settings) interleaved, with their validation scores.

Each variant is ``LABEL=PATH[:SETTING...]``: ``PATH`` is a checkout of this project (the current one, or
``git worktree add /tmp/old <commit>``), and each colon-separated ``SETTING`` after it is either

- an extra ``cli.py train`` flag, if it starts with ``--``: ``on=.:--cpu-kernel``; a flag with a value is one
  setting written with ``=``, as click accepts it: ``attn=.:--model=resnet_attention``; or
- an environment setting ``NAME=VALUE`` for that variant's process: ``few=.:OMP_NUM_THREADS=1``.

Both kinds mix: ``x=/tmp/old:--cpu-kernel:MY_ENV=1``. (No setting may contain a colon.) Flags go after the
benchmark's own, so a flag repeated here wins where click takes the last value.

For every seed, each variant trains the default run (``--epochs`` epochs, no early stopping) in its own
process, in turn, so load from other jobs hits all of them; all share one warm feature cache. The table gives
each variant's median training and validation seconds per epoch (from the run's own ``metrics.jsonl``, first
epoch left out as warm-up), the ratio to the first variant, and the last epoch's validation loss, macro F1 at
0.5 and tuned F1 per label, mean ± sd over seeds: a change that only reorders float sums must leave those within
the seed-to-seed spread.

    nice python benchmarks/bench_whole_epoch.py before=/tmp/old after=. --seeds 0 1 2 --epochs 6
    nice python benchmarks/bench_whole_epoch.py off=. on=.:--cpu-kernel --seeds 0 1 2 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, Path, dict[str, str], list[str]]:
    """``LABEL=PATH[:--flag...][:ENV=VALUE...]`` -> label, checkout, environment settings, extra CLI flags."""
    label, _, rest = text.partition("=")
    if not label or not rest:
        raise SystemExit(f"variant {text!r}: expected LABEL=PATH[:--flag...][:ENV=VALUE...]")
    path, *settings = rest.split(":")
    flags = [s for s in settings if s.startswith("--")]
    env_items = [s for s in settings if not s.startswith("--")]
    bad = [s for s in env_items if "=" not in s]
    if bad:
        raise SystemExit(f"variant {label!r}: {bad[0]!r} is neither a --flag nor ENV=VALUE")
    env = dict(s.split("=", 1) for s in env_items)
    return label, Path(path).resolve(), env, flags


def run(path: Path, env: dict[str, str], flags: list[str], seed: int, epochs: int, threads: int, out: Path,
        cache: Path) -> list[dict]:
    cmd = [sys.executable, "cli.py", "train", "--epochs", str(epochs), "--patience", "0", "--no-progress",
           "--seed", str(seed), "--output-dir", str(out), "--name", "run", "--set", f"cache_dir={cache}", *flags]
    full_env = dict(os.environ, OMP_NUM_THREADS=str(threads), **env)
    full_env.pop("PYTHONPATH", None)  # each checkout imports its own package (cli.py's folder comes first)
    subprocess.run(cmd, cwd=path, env=full_env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def mean_sd(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return "–"  # an older checkout that does not record it
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="LABEL=PATH[:--flag...][:ENV=VALUE...]; the first is the baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs [a temporary one]")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    work = args.work or Path(tempfile.mkdtemp(prefix="whole_epoch_"))
    cache = work / "cache"
    results: dict[str, list[list[dict]]] = {label: [] for label, _, _, _ in variants}
    for seed in args.seeds:
        for label, path, env, flags in variants:
            rows = run(path, env, flags, seed, args.epochs, args.threads, work / f"{label}_seed{seed}", cache)
            results[label].append(rows)
            print(f"# seed {seed} {label}: train s {[r['seconds'] for r in rows]} val s "
                  f"{[r['val_seconds'] for r in rows]}", file=sys.stderr, flush=True)
    base = variants[0][0]

    def per_epoch(label: str, key: str) -> float:
        return statistics.median(r[key] for rows in results[label] for r in rows[1:])

    print(f"{args.epochs} epochs x seeds {args.seeds}, {args.threads} threads, OMP_NUM_THREADS per process; "
          f"per-epoch seconds are medians over epochs 2..{args.epochs} of every seed")
    head = ["variant", "train s/epoch", "val s/epoch", "epoch s", "epoch ×", "val_loss", "macro F1",
            "heart tuned F1", "murmur tuned F1"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    base_epoch = per_epoch(base, "seconds") + per_epoch(base, "val_seconds")
    for label, _, env, flags in variants:
        train, val = per_epoch(label, "seconds"), per_epoch(label, "val_seconds")
        last = [rows[-1] for rows in results[label]]
        settings = [*flags, *(f"{k}={v}" for k, v in env.items())]
        cells = [label + (f" ({', '.join(f'`{s}`' for s in settings)})" if settings else ""),
                 f"{train:.2f}", f"{val:.2f}", f"{train + val:.2f}", f"{base_epoch / (train + val):.2f}",
                 mean_sd([r["val_loss"] for r in last]), mean_sd([r["macro_f1"] for r in last]),
                 mean_sd([r[k].get("at_threshold", {}).get("f1") for r in last for k in ("heart",)]),
                 mean_sd([r[k].get("at_threshold", {}).get("f1") for r in last for k in ("murmur",)])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
