"""Training and evaluation throughput of the default model, the share of time spent waiting for data, and
peak RSS on a CirCor-sized synthetic set; prints one table.

    python benchmarks/bench_throughput.py --data /tmp/ignite_bench_circor        # reuse a generated set
    python benchmarks/bench_throughput.py --patients 40 --data /tmp/circor-small  # generated if missing

The feature cache is filled first (not timed), so the figures are the warm-cache steady state a second
epoch sees. Data wait is the time between Ignite's ``GET_BATCH_STARTED`` and ``GET_BATCH_COMPLETED``
(the loader's ``next()``), as a share of the epoch. Peak RSS is ``ru_maxrss`` of this process and of
its largest child (loader workers, feature workers). With CUDA, the same runs on the GPU with and
without bf16 AMP, pinned memory and non-blocking copies; without CUDA those rows are skipped.
Targets (2 CPU cores): data wait <= 5 %, peak RSS <= 2 GB.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite_trainer.core.config import TrainConfig  # noqa: E402
from ignite_trainer.data.datasets import EvalWindows, TrainWindows  # noqa: E402
from ignite_trainer.data.loaders import make_eval_loader, make_train_loader  # noqa: E402
from ignite_trainer.data.synthetic import write_synthetic  # noqa: E402
from ignite_trainer.training.engine import create_evaluator, create_trainer  # noqa: E402
from ignite_trainer.training.losses import WeightedBCELoss  # noqa: E402
from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics  # noqa: E402
from ignite_trainer.model.registry import build_model  # noqa: E402
from ignite_trainer.data.prepare import prepare_data  # noqa: E402

TARGET_WAIT = 0.05
TARGET_RSS_GB = 2.0


def peak_rss_gb() -> tuple[float, float]:
    """(this process, the largest child): ru_maxrss is in KiB on Linux."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)


def attach_data_wait(engine: Engine) -> dict[str, float]:
    """Accumulate seconds spent inside the loader's ``next()``, through Ignite's own batch events."""
    acc = {"wait": 0.0, "t": 0.0}

    def start(_: Engine) -> None:
        acc["t"] = time.perf_counter()

    def done(_: Engine) -> None:
        acc["wait"] += time.perf_counter() - acc["t"]

    engine.add_event_handler(Events.GET_BATCH_STARTED, start)
    engine.add_event_handler(Events.GET_BATCH_COMPLETED, done)
    return acc


def measure(config: TrainConfig, data, device: torch.device, amp: bool, batches: int) -> dict[str, float]:
    """One training epoch of at most ``batches`` steps and one pass over (at most) as many val batches."""
    torch.manual_seed(0)
    model = build_model(config.model, n_mels=config.n_mels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = WeightedBCELoss(*config.pos_weight).to(device)
    cache = data.feature_cache()
    train_loader = make_train_loader(TrainWindows(data.train, cache, config.window_seconds, seed=config.seed), config.batch_size,
                                     config.num_workers, device)
    val_loader = make_eval_loader(EvalWindows(data.val, cache, config.window_seconds), config.batch_size,
                                  config.num_workers, device)
    trainer = create_trainer(model, optimizer, loss_fn, device, gradient_clip=config.gradient_clip, amp=amp)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn, device=device),
                                         "labels": PerLabelMetrics(device=device)}, device, amp=amp)
    train_wait, val_wait = attach_data_wait(trainer), attach_data_wait(evaluator)
    n_train = min(batches, len(train_loader))
    n_val = min(batches, len(val_loader))
    t0 = time.perf_counter()
    trainer.run(train_loader, max_epochs=1, epoch_length=n_train)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluator.run(val_loader, epoch_length=n_val)
    if device.type == "cuda":
        torch.cuda.synchronize()
    val_s = time.perf_counter() - t0
    return {"train_sps": n_train * config.batch_size / train_s, "train_wait": train_wait["wait"] / train_s,
            "val_sps": n_val * config.batch_size / val_s, "val_wait": val_wait["wait"] / val_s,
            "train_s": train_s, "val_s": val_s, "n_train": n_train, "n_val": n_val}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ignite_bench_circor",
                        help="synthetic CirCor-format folder: reused if it exists, generated otherwise")
    parser.add_argument("--patients", type=int, default=940, help="patients to generate when --data is missing")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ignite_bench_cache",
                        help="feature cache (kept: a second run starts warm)")
    parser.add_argument("--batches", type=int, default=40, help="steps measured per pass (0: the whole epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not (args.data / "training_data").is_dir():
        write_synthetic(args.data, args.patients, 2022)
    config = TrainConfig(data=str(args.data), cache_dir=str(args.cache), batch_size=args.batch_size,
                         num_workers=args.num_workers, device="cpu", progress=False)
    logging.getLogger("ignite.distributed.auto.auto_dataloader").setLevel(logging.WARNING)
    warm = args.cache.is_dir() and any((args.cache / "features").glob("*"))
    t0 = time.perf_counter()
    data = prepare_data(config)
    prep_s = time.perf_counter() - t0
    batches = args.batches or 10**9
    rows = [("cpu fp32", measure(config, data, torch.device("cpu"), False, batches))]
    if torch.cuda.is_available():
        cuda = config.updated({"device": "cuda"}, source="benchmark")
        rows.append(("cuda fp32 pinned", measure(cuda, data, torch.device("cuda"), False, batches)))
        rows.append(("cuda bf16 pinned", measure(cuda, data, torch.device("cuda"), True, batches)))
    own, child = peak_rss_gb()

    patients = len({r.patient_id for r in data.train + data.val})
    print(f"data {args.data}: {patients} patients, {len(data.train)} train / {len(data.val)} val recordings; "
          f"prepare (cache {'warm' if warm else 'cold'}) {prep_s:.1f} s")
    print(f"model {config.model}, batch {config.batch_size}, {args.num_workers} loader workers, {args.threads} threads")
    print(f"{'run':<18}{'train/s':>9}{'wait':>8}{'val/s':>9}{'wait':>8}{'steps':>12}")
    for name, r in rows:
        print(f"{name:<18}{r['train_sps']:>9.1f}{r['train_wait']:>8.1%}{r['val_sps']:>9.1f}{r['val_wait']:>8.1%}"
              f"{int(r['n_train']):>6}/{int(r['n_val']):<5}")
    if not torch.cuda.is_available():
        print("cuda rows skipped: no CUDA device (AMP bf16, pinned memory, non-blocking copies not measured)")
    worst = max(max(r["train_wait"], r["val_wait"]) for _, r in rows)
    print(f"data wait max {worst:.1%} (target <= {TARGET_WAIT:.0%})  {'OK' if worst <= TARGET_WAIT else 'OVER'}")
    print(f"peak RSS {own:.2f} GiB main / {child:.2f} GiB largest child (target <= {TARGET_RSS_GB} GB)  "
          f"{'OK' if max(own, child) * 2**30 / 1e9 <= TARGET_RSS_GB else 'OVER'}")


if __name__ == "__main__":
    main()
