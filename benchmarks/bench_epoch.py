"""What one epoch of the default run costs in model compute, per model variant; prints one table.

    python benchmarks/bench_epoch.py                    # 2 threads, 5 interleaved rounds
    python benchmarks/bench_epoch.py --compile          # adds torch.compile rows (minutes of start-up)
    python benchmarks/bench_epoch.py --rounds 9 --threads 1

Every variant runs the same in-memory batches ``[32, 64 mels, 400 frames]`` (4 s at a 10 ms hop): a training
step is forward, masked BCE, backward, gradient-norm clip and AdamW, as `ignite_trainer.training.engine` does; a
validation step is a forward pass in evaluation mode. Data loading is left out (see `bench_throughput.py`).
Variants run in turn inside each round, so that load from other jobs on a shared machine hits all of them;
samples/s are medians over rounds (``--clock cpu`` times this process's CPU seconds instead of the wall
clock: with ``--threads 1`` that is the work itself, unaffected by other jobs), and each ratio is the median over rounds of (before / variant) time in
the same round. GFLOP/s use the FLOPs `torch.utils.flop_counter.FlopCounterMode` counts for one step.
"epoch s" is ``train_samples / train rate + val_windows / val rate``: the default run on the embedded
synthetic set has 25 steps of 32 (800 windows) and 1277 validation windows (seed 0 split).

"before" is ``attention_cnn`` computed as it was: NCHW tensors, BatchNorm applied separately in evaluation,
validation under ``torch.no_grad``. The next rows add one thing at a time; "after" is the default computation,
which also runs each block's BatchNorm -> GELU -> max-pool as one kernel (`ignite_trainer.model.fused_block`).
With CUDA, a second table gives training and validation samples/s in fp32 and bf16 autocast; without it, the script says so.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite_trainer.training.losses import WeightedBCELoss  # noqa: E402
from ignite_trainer.model.registry import build_model  # noqa: E402

#: The machine peak the figures are compared with: 2 cores x 2 FMA units x 8 fp32 lanes x 2 FLOP x ~2.45 GHz.
PEAK_GFLOPS_2_CORES = 157.0


@dataclass
class Variant:
    """A model and how it is run: the options `build_model` gets, the no-grad context, compile."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    inference_mode: bool = True
    compile: bool = False


def variants(with_compile: bool) -> list[Variant]:
    rows = [
        Variant("attention_cnn before (NCHW, BN, no_grad)", "attention_cnn",
                {"channels_last": False, "fold_bn": False}, inference_mode=False),
        Variant("attention_cnn + inference_mode", "attention_cnn", {"channels_last": False, "fold_bn": False}),
        Variant("attention_cnn + BN folded", "attention_cnn", {"channels_last": False}),
        Variant("attention_cnn + channels-last", "attention_cnn", {"fold_bn": False, "fused": False}),
        Variant("attention_cnn + all three (unfused)", "attention_cnn", {"fused": False}),
        Variant("attention_cnn after (+ fused BN/GELU/pool)", "attention_cnn"),
        Variant("strided_attention_cnn NCHW", "strided_attention_cnn", {"channels_last": False}),
        Variant("strided_attention_cnn", "strided_attention_cnn"),
        Variant("resnet_attention", "resnet_attention"),
    ]
    if with_compile:
        rows += [Variant("attention_cnn after + compile", "attention_cnn", compile=True),
                 Variant("strided_attention_cnn + compile", "strided_attention_cnn", compile=True)]
    return rows


class Runner:
    """One variant's model, optimiser and step functions on ``device``."""

    def __init__(self, variant: Variant, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                 x_val: torch.Tensor, device: torch.device, amp: bool = False) -> None:
        torch.manual_seed(0)
        self.variant, self.device, self.amp = variant, device, amp
        self.model = build_model(variant.name, n_mels=x.shape[1], **variant.options).to(device)
        self.params = list(self.model.parameters())
        self.run_model: Callable[..., Any] = torch.compile(self.model) if variant.compile else self.model
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.01)
        self.loss_fn = WeightedBCELoss(1.0, 2.5).to(device)
        self.x, self.y, self.mask, self.x_val = (t.to(device) for t in (x, y, mask, x_val))
        self.parameter_count = sum(p.numel() for p in self.params)
        self.startup_s = 0.0

    def train_step(self) -> None:
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, _ = self.run_model(self.x)
        self.loss_fn(logits.float(), self.y, self.mask).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def val_step(self) -> None:
        self.model.eval()
        context = torch.inference_mode() if self.variant.inference_mode else torch.no_grad()
        with context, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.run_model(self.x_val)

    def flops(self) -> tuple[int, int]:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.model.train()
            logits, _ = self.model(self.x)
            self.loss_fn(logits.float(), self.y, self.mask).backward()
        self.optimizer.zero_grad(set_to_none=True)
        train = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.model.eval()
            self.model(self.x_val)
        return train, counter.get_total_flops()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], None], steps: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call over ``steps`` calls, by the wall clock or by this process's CPU time."""
    now = CLOCKS[clock]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = now()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (now() - start) / steps


def batches(batch: int, val_batch: int, n_mels: int, frames: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_mels, frames, generator=g)
    y = (torch.rand(batch, 2, generator=g) > 0.5).float()
    return x, y, torch.ones(batch, 2), torch.randn(val_batch, n_mels, frames, generator=g)


def cpu_table(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    data = batches(args.batch_size, args.val_batch_size, args.n_mels, args.frames)
    runners = []
    chosen = [v for v in variants(args.compile)
              if v.label.startswith("attention_cnn before") or not args.only or any(k in v.label for k in args.only)]
    for variant in chosen:
        runner = Runner(variant, *data, device)
        start = time.perf_counter()
        runner.train_step()  # warm-up; for compiled variants this is the compilation
        runner.val_step()
        runner.startup_s = time.perf_counter() - start
        runners.append(runner)
    flops = [r.flops() for r in runners]
    train_t: list[list[float]] = [[] for _ in runners]
    val_t: list[list[float]] = [[] for _ in runners]
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for i, runner in enumerate(runners):
            train_t[i].append(timed(runner.train_step, args.steps, device, args.clock))
            val_t[i].append(timed(runner.val_step, args.steps, device, args.clock))
    load_after = os.getloadavg()[0]

    def epoch_s(i: int, k: int) -> float:
        return args.train_samples * train_t[i][k] / args.batch_size + args.val_windows * val_t[i][k] / args.val_batch_size

    print(f"CPU: {torch.get_num_threads()} threads, batch {args.batch_size} x {args.n_mels} mels x {args.frames} "
          f"frames, validation batch {args.val_batch_size}; {args.rounds} rounds x {args.steps} steps, {args.clock} clock; "
          f"load average {load_before:.1f} -> {load_after:.1f}; torch {torch.__version__}")
    header = (f"{'variant':<42}{'params':>8}{'train/s':>9}{'GFLOP/s':>9}{'val/s':>9}{'GFLOP/s':>9}"
              f"{'epoch s':>9}{'train x':>9}{'val x':>8}{'epoch x':>9}{'start s':>9}")
    print(header)
    print("-" * len(header))
    for i, runner in enumerate(runners):
        tr, va = statistics.median(train_t[i]), statistics.median(val_t[i])
        ratio_tr = statistics.median(a / b for a, b in zip(train_t[0], train_t[i]))
        ratio_va = statistics.median(a / b for a, b in zip(val_t[0], val_t[i]))
        ratio_ep = statistics.median(epoch_s(0, k) / epoch_s(i, k) for k in range(args.rounds))
        ep = statistics.median(epoch_s(i, k) for k in range(args.rounds))
        print(f"{runner.variant.label:<42}{runner.parameter_count:>8}{args.batch_size / tr:>9.1f}"
              f"{flops[i][0] / tr / 1e9:>9.1f}{args.val_batch_size / va:>9.1f}{flops[i][1] / va / 1e9:>9.1f}"
              f"{ep:>9.2f}{ratio_tr:>9.2f}{ratio_va:>8.2f}{ratio_ep:>9.2f}{runner.startup_s:>9.1f}")
    print("FLOPs per sample: " + ", ".join(
        f"{r.variant.name} train {f[0] / args.batch_size / 1e6:.0f} M / val {f[1] / args.val_batch_size / 1e6:.0f} M"
        for r, f in {r.variant.name: (r, f) for r, f in zip(runners, flops)}.values()))
    print(f"machine peak {PEAK_GFLOPS_2_CORES:.0f} GFLOP/s (2 cores, AVX2 FMA); ratios x are before / variant, "
          f"paired per round; 'start s' is the first train + val step (compilation where compiled)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (this process, all variants)")


def cuda_table(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("CUDA: no GPU found; the fp32 / bf16 rows were not measured")
        return
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    data = batches(args.cuda_batch_size, args.cuda_batch_size, args.n_mels, args.frames)
    print(f"CUDA: {torch.cuda.get_device_name()}, batch {args.cuda_batch_size}, {args.rounds} rounds x "
          f"{args.cuda_steps} steps")
    print(f"{'model':<24}{'precision':<11}{'train/s':>10}{'val/s':>11}")
    for name in ("attention_cnn", "strided_attention_cnn", "resnet_attention"):
        for amp in (False, True):
            runner = Runner(Variant(name, name), *data, device, amp=amp)
            for _ in range(3):
                runner.train_step()
                runner.val_step()
            tr = statistics.median(timed(runner.train_step, args.cuda_steps, device) for _ in range(args.rounds))
            va = statistics.median(timed(runner.val_step, args.cuda_steps, device) for _ in range(args.rounds))
            print(f"{name:<24}{'bf16' if amp else 'fp32':<11}{args.cuda_batch_size / tr:>10.0f}"
                  f"{args.cuda_batch_size / va:>11.0f}")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-batch-size", type=int, default=32)
    parser.add_argument("--n-mels", type=int, default=64)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--train-samples", type=int, default=800, help="training windows per epoch")
    parser.add_argument("--val-windows", type=int, default=1277, help="validation windows per epoch")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: this process's CPU seconds, steadier than wall time on a shared machine with "
                             "--threads 1 (with more threads it also counts threads spinning in wait)")
    parser.add_argument("--only", nargs="*", default=[], metavar="TEXT",
                        help="run only the variants whose label contains one of these (the 'before' row always runs)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (slow start-up)")
    parser.add_argument("--cuda-batch-size", type=int, default=256)
    parser.add_argument("--cuda-steps", type=int, default=20)
    parser.add_argument("--no-cpu", action="store_true", help="only the CUDA table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_cpu:
        cpu_table(args)
    cuda_table(args)


if __name__ == "__main__":
    main()
