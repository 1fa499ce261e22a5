"""What the Ignite engine costs over a hand-written PyTorch loop; prints one table.

    python benchmarks/bench_engine.py                   # default model, 24 train + 8 val batches of 32
    python benchmarks/bench_engine.py --repeats 7 --train-batches 40

Both sides run the same model, the same in-memory batches and the same math per step (forward, masked
BCE, backward, gradient-norm clip, AdamW, a finiteness check), validate every epoch and save a checkpoint
every epoch. The engine side also carries every default handler of a run: NaN guard, validation
metrics (loss, per-label counts, prediction collector), threshold tuning is left out (it is
analysis, not loop cost), best and last `Checkpoint`s, ``metrics.jsonl``, TensorBoard, cosine LR; the
progress bar is off. Runs alternate raw/engine in one process so that machine noise hits both; the
ratio is the median over ``--repeats`` rounds of (engine epoch / raw epoch in the same round), after
one warm-up epoch of each; seconds per epoch are medians too. Target: ratio <= 1.03.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite_trainer.training.engine import create_evaluator, create_trainer  # noqa: E402
from ignite_trainer.training.handlers import (  # noqa: E402
    attach_best_checkpoint,
    attach_last_checkpoint,
    attach_lr_scheduler,
    attach_metrics_log,
    attach_nan_guard,
    attach_tensorboard,
    attach_validation,
    training_state,
)
from ignite_trainer.training.losses import WeightedBCELoss  # noqa: E402
from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics  # noqa: E402
from ignite_trainer.model.registry import build_model  # noqa: E402
from ignite_trainer.training.metrics import PredictionCollector  # noqa: E402

TARGET = 1.03


def make_batches(n: int, batch: int, n_mels: int, frames: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """In-memory batches in the project's layout ``(x, y, mask, index)``: no data loading in either loop."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, n_mels, frames, generator=g), (torch.rand(batch, 2, generator=g) > 0.5).float(),
             torch.ones(batch, 2), torch.arange(i * batch, (i + 1) * batch)) for i in range(n)]


class RawLoop:
    """The hand-written loop: what a careful user writes without a framework."""

    def __init__(self, model: torch.nn.Module, out: Path, clip: float = 1.0) -> None:
        self.model, self.out, self.clip = model, out, clip
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        self.loss_fn = WeightedBCELoss()
        self.epoch = 0

    def run_epoch(self, train: list, val: list) -> None:
        self.epoch += 1
        self.model.train()
        total = 0.0
        for x, y, mask, _ in train:
            logits, _ = self.model(x)
            loss = self.loss_fn(logits.float(), y, mask)
            value = loss.item()
            if not math.isfinite(value):
                raise RuntimeError("non-finite loss")
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip).item()
            if math.isfinite(norm):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total += value
        self.model.eval()
        val_loss = 0.0
        with torch.no_grad():
            for x, y, mask, _ in val:
                logits, _ = self.model(x)
                val_loss += self.loss_fn(logits.float(), y, mask).item()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                    "train_loss": total / len(train), "val_loss": val_loss / len(val)}, self.out / "last.pt")


class EngineLoop:
    """The project's trainer with the handlers `ignite_trainer.training.run.training_process` attaches."""

    def __init__(self, model: torch.nn.Module, out: Path, epochs: int, clip: float = 1.0) -> None:
        device = torch.device("cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        loss_fn = WeightedBCELoss()
        self.trainer = create_trainer(model, optimizer, loss_fn, device, gradient_clip=clip)
        self.evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn, device=device),
                                                  "labels": PerLabelMetrics(device=device),
                                                  "predictions": PredictionCollector(device=device)}, device)
        self.val: list = []
        attach_nan_guard(self.trainer)
        attach_validation(self.trainer, self.evaluator, self.val)
        to_save = {"model_state_dict": model, "optimizer_state_dict": optimizer, "trainer": self.trainer,
                   **training_state(self.trainer, {})}
        best = attach_best_checkpoint(self.trainer, to_save, out / "checkpoints", "val_loss", 1)
        to_save["lr_scheduler"] = attach_lr_scheduler(self.trainer, optimizer, epochs)
        attach_last_checkpoint(self.trainer, {**to_save, "best_checkpointer": best}, out / "checkpoints")
        attach_metrics_log(self.trainer, optimizer, out / "metrics.jsonl")
        self.tb = attach_tensorboard(self.trainer, optimizer, out / "tb")
        self.epochs = epochs
        self.started = False

    def run_epoch(self, train: list, val: list) -> None:
        self.val[:] = val
        if not self.started:  # one run of all epochs, stepped one epoch at a time like a real run
            self.trainer.state.max_epochs = None
            self.started = True
        epoch = self.trainer.state.epoch + 1
        self.trainer.run(train, max_epochs=epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="attention_cnn")
    parser.add_argument("--repeats", type=int, default=5, help="measured epochs per side (median)")
    parser.add_argument("--train-batches", type=int, default=24)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-mels", type=int, default=64)
    parser.add_argument("--frames", type=int, default=400, help="4 s windows at a 10 ms hop")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train = make_batches(args.train_batches, args.batch_size, args.n_mels, args.frames, 0)
    val = make_batches(args.val_batches, args.batch_size, args.n_mels, args.frames, 1)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        raw = RawLoop(build_model(args.model, n_mels=args.n_mels), Path(tmp) / "raw")
        (Path(tmp) / "raw").mkdir()
        torch.manual_seed(0)
        eng = EngineLoop(build_model(args.model, n_mels=args.n_mels), Path(tmp) / "engine", args.repeats + 1)
        times: dict[str, list[float]] = {"raw": [], "engine": []}
        for i in range(args.repeats + 1):  # the first of each is warm-up
            for name, loop in (("raw", raw), ("engine", eng)) if i % 2 == 0 else (("engine", eng), ("raw", raw)):
                t0 = time.perf_counter()
                loop.run_epoch(train, val)
                if i:
                    times[name].append(time.perf_counter() - t0)
        eng.tb.close()

    raw_s = statistics.median(times["raw"])
    iters = args.train_batches + args.val_batches
    # each round's two epochs ran back to back, so their ratio cancels most of a shared machine's drift
    ratio = statistics.median(e / r for e, r in zip(times["engine"], times["raw"]))
    print(f"model {args.model}, batch {args.batch_size} x {args.n_mels} mels x {args.frames} frames, "
          f"{args.train_batches} train + {args.val_batches} val iterations/epoch, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'loop':<8}{'s/epoch':>10}{'min':>10}{'max':>10}")
    for name, s in (("raw", times["raw"]), ("engine", times["engine"])):
        print(f"{name:<8}{statistics.median(s):>10.3f}{min(s):>10.3f}{max(s):>10.3f}")
    print(f"engine / raw        {ratio:.4f}  median of paired rounds (target <= {TARGET})  "
          f"{'OK' if ratio <= TARGET else 'OVER'}")
    print(f"engine / raw, mins  {min(times['engine']) / min(times['raw']):.4f}")
    print(f"engine cost / iter  {(ratio - 1) * raw_s / iters * 1e6:.0f} us  (train + val iterations, from the paired ratio)")


if __name__ == "__main__":
    main()
