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

ROWS = ("scratch", "frozen", "finetuned")
SCORES = (("murmur_weighted_accuracy", "murmur W.acc ↑"), ("outcome_cost", "outcome cost ↓"),
          ("heart.auroc", "heart AUROC ↑"), ("murmur.auroc", "murmur AUROC ↑"))


def base_config(args: argparse.Namespace, **fields):
    from ignite_trainer import TrainConfig
    return TrainConfig(n_mels=args.n_mels, window_seconds=args.window_seconds, batch_size=args.batch_size,
                       cache_dir=str(args.out / "cache"), output_dir=str(args.out / "runs"), progress=False,
                       device="cpu", **fields)


def pretrain_only(args: argparse.Namespace) -> None:
    """Run in a child process: pretrain, then print one JSON line with wall time and this process's peak RSS."""
    from ignite_trainer.training.pretrain import pretrain
    start = time.perf_counter()
    summary = pretrain(base_config(args, pretrain_data=[str(args.data)], epochs=args.pretrain_epochs, seed=0,
                                   name="pretrain"), overwrite=True)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "trunk": str(summary["trunk"]), "run_dir": str(summary["run_dir"]),
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--data-seed", type=int, default=2022)
    parser.add_argument("--n-mels", type=int, default=16)
    parser.add_argument("--window-seconds", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="supervised epochs per cv member")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--trunk-lr-scale", type=float, default=0.3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ssl_bench"))
    parser.add_argument("--pretrain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.pretrain_only:
        return pretrain_only(args)

    import numpy as np

    from ignite_trainer.data.readers import read_recordings
    from ignite_trainer.data.splits import assign_folds, write_split_file
    from ignite_trainer.data.synthetic import write_synthetic
    from ignite_trainer.experiments.cv import cross_validate

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"hard_{args.patients}_{args.data_seed}"
    if not data.exists():
        write_synthetic(data, args.patients, args.data_seed, difficulty="hard", progress=False)
    recordings = read_recordings(data, "circor2022")
    split_file = write_split_file(assign_folds(recordings, args.folds, args.split_seed), args.out / "splits.json",
                                  split_seed=args.split_seed)
    print(f"data: {data} ({len({r.patient_id for r in recordings})} patients, {len(recordings)} recordings), "
          f"split {split_file} ({args.folds} folds, split_seed {args.split_seed})", flush=True)

    trunk, pre = None, None
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

    results: dict[tuple[float, str], dict[str, list[float]]] = {}
    for fraction in args.fractions:
        for row in args.rows:
            extra = {}
            if row != "scratch":
                extra = {"init_from": trunk, "freeze_trunk": row == "frozen"}
                if row == "finetuned":
                    extra.update(trunk_lr_scale=args.trunk_lr_scale, warmup_epochs=1)
            config = base_config(args, data=str(data), epochs=args.epochs, split_seed=args.split_seed,
                                 label_fraction=fraction, **extra)
            start = time.perf_counter()
            summary = cross_validate(config, folds=args.folds, seeds=args.seeds, splits=split_file, jobs=args.jobs,
                                     exp_dir=args.out / f"cv_{row}_{fraction:g}", overwrite=True, bootstrap=100,
                                     figures=False, echo=lambda _: None)
            if summary.get("failed"):
                raise SystemExit(f"error: {row} label_fraction={fraction:g}: members failed: {summary['failed']}")
            values = {key: [summary["sets"][f"seed{s}"]["pooled"][key] for s in args.seeds] for key, _ in SCORES}
            results[(fraction, row)] = values
            print(f"{row:>9} label_fraction={fraction:<5g} " + "  ".join(
                f"{key}={np.mean(v):.3f}±{np.std(v, ddof=1) if len(v) > 1 else 0:.3f}" for key, v in values.items())
                + f"  ({time.perf_counter() - start:.0f} s)", flush=True)

    print("\n| label fraction | row | " + " | ".join(title for _, title in SCORES) + " |")
    print("|---|---|" + "---|" * len(SCORES))
    for (fraction, row), values in results.items():
        cells = []
        for key, _ in SCORES:
            v = np.array([np.nan if x is None else x for x in values[key]], dtype=float)
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            cells.append(f"{v.mean():.3f} ± {sd:.3f}")
        print(f"| {fraction:g} | {row} | " + " | ".join(cells) + " |")
    print(f"\nmean ± sd over seeds {args.seeds} of each seed's pooled out-of-fold score; {args.folds} folds from one "
          f"split file; {args.epochs} supervised epochs per member; pretraining {args.pretrain_epochs} epochs")


if __name__ == "__main__":
    main()
