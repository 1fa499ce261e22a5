"""Loader throughput with every feature file kept mapped vs a bounded set of 64 reopened as needed (the
earlier behaviour), features resident in memory, and float32 vs float16 feature caches; prints one table.

    python benchmarks/bench_data_path.py --data /tmp/circor-data-bench --patients 120
    python benchmarks/bench_data_path.py --data /tmp/circor-data-bench --workers 2 --rounds 5

The feature caches are filled first (not timed). Each round measures every variant once, in turn
(interleaved, so that machine load drifts over all of them alike); the table shows the median
batches/s over rounds. A variant starts from a fresh copy of its dataset, as a new epoch's worker
would (no file mapped yet), and reads one whole epoch: training crops for the train loader, every
window for the eval loader. "reopen 64" bounds the maps to 64 files, so that a shuffled epoch over more
recordings than that reopens files all along. Sizes are the feature files on disk, per dtype.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite_trainer.data.datasets import EvalWindows, TrainWindows
from ignite_trainer.data.splits import split_patients  # noqa: E402
from ignite_trainer.data.features import FeatureCache, FeatureSettings, feature_workers  # noqa: E402
from ignite_trainer.data.loaders import (  # noqa: E402
    ResidentEvalLoader,
    ResidentTrainLoader,
    make_eval_loader,
    make_train_loader,
)
from ignite_trainer.data.readers import read_recordings  # noqa: E402
from ignite_trainer.data.synthetic import write_synthetic  # noqa: E402


def fresh(dataset, max_open: int | None):
    clone = pickle.loads(pickle.dumps(dataset))
    clone.max_open_files = max_open
    return clone


def epoch_rate(loader, epoch: int) -> float:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    started = time.perf_counter()
    n = sum(1 for _ in loader)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ignite_bench_data_path")
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    source = args.data / "dataset"
    if not (source / "training_data").exists():
        write_synthetic(source, args.patients, 0)
    recordings = read_recordings(source, "circor2022")
    device = torch.device("cpu")
    variants: dict[str, tuple] = {}
    sizes: dict[str, float] = {}
    for dtype in ("float32", "float16"):
        cache = FeatureCache(args.data / "cache", FeatureSettings(feature_dtype=dtype))
        usable = cache.prepare(recordings, workers=feature_workers())
        sizes[dtype] = sum(p.stat().st_size for p in cache.feature_dir.glob("*.npy")) / 2**20
        train, val = split_patients(usable, 0.2, seed=0)
        train_set, val_set = TrainWindows(train, cache, args.window, seed=0), EvalWindows(val, cache, args.window)
        if dtype == "float32":
            variants["train  float32  reopen 64"] = ("train", train_set, 64)
            variants["train  float32  all mapped"] = ("train", train_set, None)
            variants["train  float32  resident"] = ("resident", train_set, None)
            variants["eval   float32  reopen 64"] = ("eval", val_set, 64)
            variants["eval   float32  all mapped"] = ("eval", val_set, None)
            variants["eval   float32  resident"] = ("resident eval", val_set, None)
        else:
            variants["train  float16  all mapped"] = ("train", train_set, None)
            variants["eval   float16  all mapped"] = ("eval", val_set, None)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (kind, dataset, max_open) in variants.items():
            ds = fresh(dataset, max_open)
            if kind == "train":
                loader = make_train_loader(ds, args.batch_size, args.workers, device)
            elif kind == "resident":
                started = time.perf_counter()
                loader = ResidentTrainLoader(ds, args.batch_size, device)
                setup = time.perf_counter() - started
                rates.setdefault("  (train resident: load, seconds)", []).append(setup)
            elif kind == "resident eval":
                loader = ResidentEvalLoader(ds, args.batch_size, device)
            else:
                loader = make_eval_loader(ds, args.batch_size, args.workers, device)
            rates[name].append(epoch_rate(loader, r))

    print(f"recordings: {len(recordings)} ({len(variants['train  float32  all mapped'][1])} train, "
          f"{len(variants['eval   float32  all mapped'][1].recordings)} val), batch {args.batch_size}, "
          f"workers {args.workers}, rounds {args.rounds} (median)")
    print(f"{'loader   dtype    files':34s} {'batches/s':>10s}")
    for name, values in rates.items():
        print(f"{name:34s} {statistics.median(values):10.2f}")
    print(f"{'cache on disk, float32 (MiB)':34s} {sizes['float32']:10.1f}")
    print(f"{'cache on disk, float16 (MiB)':34s} {sizes['float16']:10.1f}")
    print(f"{'float16 / float32 size':34s} {sizes['float16'] / sizes['float32']:10.3f}")


if __name__ == "__main__":
    main()
