"""Self-supervised pretraining (BYOL-A) against training from scratch, with few and with all labels.

On the hard synthetic set: one split file (``--folds`` patient folds, written once) is used by every row, so
rows differ only in what they are. One BYOL-A run pretrains on ALL recordings of the set without their labels
(in its own process, whose time per epoch and peak RSS are reported); every pretrained row starts from its
``trunk.safetensors``. Then for each ``label_fraction`` three rows, each a cross-validation over ``--seeds``:

- ``scratch``: random initialisation;
- ``frozen``: ``init_from`` the trunk, ``freeze_trunk`` (only the head trains);
- ``finetuned``: ``init_from`` the trunk, ``trunk_lr_scale`` (default 0.3), ``warmup_epochs`` 1.

Per row, from each seed's pooled out-of-fold scores in the experiment's ``report/summary.json``
(``sets.seed<S>.pooled``): murmur weighted accuracy, outcome cost (lower is better), heart and murmur AUROC,
as mean ± sd over the seeds. Prints a markdown table. Everything random follows the explicit seeds.

    nice python benchmarks/bench_pretraining.py --patients 80 --n-mels 16 --folds 5 --seeds 0 1 2 \\
        --epochs 6 --pretrain-epochs 10 --out /tmp/ssl_bench
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv_rows import SCORES, add_arguments, base_config, cell, echo_row, pooled, prepare, print_table, run_row

ROWS = ("scratch", "frozen", "finetuned")


def pretrain_only(args: argparse.Namespace) -> None:
    """Run in a child process: pretrain, then print one JSON line with wall time and this process's peak RSS."""
    from ignite_trainer.training.pretrain import pretrain
    args.out = args.out.resolve()
    start = time.perf_counter()
    summary = pretrain(base_config(args, pretrain_data=[str(args.data)], epochs=args.pretrain_epochs, seed=0,
                                   name="pretrain"), overwrite=True)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "trunk": str(summary["trunk"]), "run_dir": str(summary["run_dir"]),
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, patients=80, seeds=[0, 1, 2], epochs=6, batch_size=32, out="/tmp/ssl_bench")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--trunk-lr-scale", type=float, default=0.3)
    parser.add_argument("--pretrain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pretrain_only:
        return pretrain_only(args)

    import numpy as np

    data, split_file = prepare(args)
    trunk = None
    if {"frozen", "finetuned"} & set(args.rows):
        cmd = [sys.executable, __file__, "--pretrain-only", "--data", str(data), "--out", str(args.out),
               "--n-mels", str(args.n_mels), "--window-seconds", str(args.window_seconds),
               "--batch-size", str(args.batch_size), "--pretrain-epochs", str(args.pretrain_epochs)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        pre = json.loads(done.stdout.strip().splitlines()[-1])
        trunk = pre["trunk"]
        epochs = [json.loads(line)["seconds"] for line in
                  (Path(pre["run_dir"]) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        print(f"pretraining: {args.pretrain_epochs} epochs in {pre['wall_s']:.1f} s wall; per epoch "
              + ", ".join(f"{x:.1f}" for x in epochs) + f" s (mean {np.mean(epochs):.1f} s); peak RSS "
              f"{pre['maxrss_mib']:.0f} MiB", flush=True)

    results: dict[tuple[float, str], dict[str, list]] = {}
    for fraction in args.fractions:
        for row in args.rows:
            extra = {}
            if row != "scratch":
                extra = {"init_from": trunk, "freeze_trunk": row == "frozen"}
                if row == "finetuned":
                    extra.update(trunk_lr_scale=args.trunk_lr_scale, warmup_epochs=1)
            config = base_config(args, data=str(data), epochs=args.epochs, split_seed=args.split_seed,
                                 label_fraction=fraction, **extra)
            summary, _, seconds = run_row(f"{row}_{fraction:g}", config, args, split_file)
            results[(fraction, row)] = pooled(summary, args.seeds, [key for key, _ in SCORES])
            echo_row(f"{row} {fraction:g}", results[(fraction, row)], seconds)

    print_table(["label fraction", "row"] + [title for _, title in SCORES],
                [(f"{fraction:g}", [row] + [cell(values[key]) for key, _ in SCORES])
                 for (fraction, row), values in results.items()])
    print(f"\nmean ± sd over seeds {args.seeds} of each seed's pooled out-of-fold score; {args.folds} folds from one "
          f"split file; {args.epochs} supervised epochs per member; pretraining {args.pretrain_epochs} epochs")


if __name__ == "__main__":
    main()
