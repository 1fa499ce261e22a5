"""Kill or stop a training at random moments, resume it with ``--resume``, and check that nothing was lost.

Why: a run killed by a scheduler, an OOM killer or a power cut must resume to exactly the weights an
uninterrupted run reaches, and so must a run stopped on purpose (SIGTERM before a preemption). Each trial
starts ``cli.py train`` on a tiny synthetic set in a subprocess, watches its checkpoint folder (every ~1 ms,
loading the newest complete ``last_checkpoint_*.pt`` to prove a loadable one exists at every moment after
the first), and then either SIGKILLs it after a random delay (``random``) or the moment a ``.partial``
file shows a checkpoint write in progress (``write``), or sends SIGTERM after a random delay (``sigterm``:
the run must finish its iteration, write a mid-epoch checkpoint and exit 143). Then it resumes and checks:

- resume picked the newest complete checkpoint (some trials add a truncated newer file, as a filesystem
  without atomic rename would leave, and a stray Ignite ``tmpXXXX`` file; both must be skipped/removed);
- no temporary files remain; ``metrics.jsonl`` holds epochs 1..E once each, with the reference numbers;
- TensorBoard steps (after the purge TensorBoard applies on reading) are strictly increasing, 1..N;
- the final weights are ``torch.equal`` to a run never killed.

The matrix: DataLoader workers {0, 2} x accumulation steps {1, 3 (which does not divide the 8 iterations
of an epoch)} x {random, write, sigterm}. The never-killed reference of each accumulation setting runs
with 0 workers: results do not depend on the worker count. In ``sigterm`` trials the stopped epoch's
``train_loss`` in ``metrics.jsonl`` averages only the iterations after the resume, so that one value is
left out of the metrics comparison.

Usage::

    .venv/bin/python benchmarks/kill_resume.py --trials 2            # trials per cell of the matrix
    .venv/bin/python benchmarks/kill_resume.py --trials 30 --workers 0 --accumulation 1 --modes random write
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ignite_trainer.runs.checkpoint import PARTIAL_SUFFIX, checkpoint_epoch  # noqa: E402

SMALL = ["n_mels=8", "sample_rate=1000", "hop_ms=20.0", "n_fft=64", "window_seconds=4.0", "val_fraction=0.34"]
TIMING_KEYS = {"seconds", "val_seconds"}


@dataclass
class Trial:
    index: int
    mode: str  # "random"/"write": SIGKILL after a random delay / during a checkpoint write; "sigterm": graceful stop
    workers: int = 0
    accumulation: int = 1
    stop_rc: int | None = None  # the exit code of the signalled run
    stop_iteration: int = -1  # the trainer iteration of the checkpoint it was resumed from
    killed_at_epoch: int = -1  # newest complete last checkpoint when killed
    partial_at_kill: bool = False  # a .partial file existed right after the kill
    polls: int = 0
    finished_unkilled: bool = False  # the run ended before the chosen moment (not counted as a trial)
    unloadable_polls: int = 0
    injected_truncated: bool = False
    resumed_from: int = -1
    resume_rc: int = -1
    temp_left: list[str] = field(default_factory=list)
    metrics_ok: bool = False
    tb_ok: bool = False  # steps strictly increasing; what the resumed run logged equals the reference
    tb_lost: int = 0  # events logged before the kill's checkpoint but never flushed (lost to the kill)
    weights_equal: bool = False

    @property
    def ok(self) -> bool:
        stopped_ok = self.stop_rc == 128 + signal.SIGTERM if self.mode == "sigterm" else True
        return (self.unloadable_polls == 0 and self.resume_rc == 0 and self.resumed_from == self.killed_at_epoch
                and not self.temp_left and self.metrics_ok and self.tb_ok and self.weights_equal and stopped_ok)


def train_command(data: Path, out: Path, name: str, epochs: int, workers: int = 0, accumulation: int = 1) -> list[str]:
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", "--data", str(data), "--epochs", str(epochs),
           "--batch-size", "4", "--no-progress", "--device", "cpu", "--output-dir", str(out), "--name", name,
           "--patience", "0", "--set", f"cache_dir={out.parent / 'cache'}", "--num-workers", str(workers),
           "--set", f"accumulation_steps={accumulation}"]
    for item in SMALL:
        cmd += ["--set", item]
    return cmd


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run_to_end(cmd: list[str]) -> int:
    return subprocess.run(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def complete_last(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(ckpt_dir.glob("last_checkpoint_*.pt"), key=checkpoint_epoch)


def has_partial(ckpt_dir: Path, prefix: str = "") -> bool:
    try:
        return any(n.endswith(PARTIAL_SUFFIX) and n.startswith("." + prefix) for n in os.listdir(ckpt_dir))
    except FileNotFoundError:
        return False


def loadable(path: Path) -> bool:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return "model_state_dict" in ckpt and "trainer" in ckpt
    except FileNotFoundError:
        return True  # rotated away between listing and loading: a newer file exists (checked next poll)
    except Exception:
        return False


def kill_one(trial: Trial, cmd: list[str], run_dir: Path, epochs: int, rng: random.Random) -> None:
    """Start the run, watch it, kill it; fills the watching fields of ``trial``."""
    ckpt_dir = run_dir / "checkpoints"
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target_epoch = rng.randint(2, max(2, epochs - 1))  # "write" mode: kill while this epoch's file is written
    deadline = None
    try:
        while proc.poll() is None:
            files = complete_last(ckpt_dir)
            if files:
                trial.polls += 1
                if not loadable(files[-1]):
                    trial.unloadable_polls += 1
                if trial.mode in ("random", "sigterm") and deadline is None:
                    deadline = time.monotonic() + rng.uniform(0.0, 0.25 * (epochs - 1))
                if trial.mode in ("random", "sigterm") and time.monotonic() >= deadline:
                    break
                if trial.mode == "write" and has_partial(ckpt_dir) and checkpoint_epoch(files[-1]) >= target_epoch - 1:
                    break
            time.sleep(0.001)
    finally:
        trial.finished_unkilled = proc.poll() is not None
        if not trial.finished_unkilled:
            os.kill(proc.pid, signal.SIGTERM if trial.mode == "sigterm" else signal.SIGKILL)
        trial.stop_rc = proc.wait()
        if trial.mode == "sigterm" and trial.stop_rc == 0:
            trial.finished_unkilled = True  # the signal came after the last iteration: not a trial
    trial.partial_at_kill = has_partial(ckpt_dir)
    files = [p for p in complete_last(ckpt_dir) if loadable(p)]
    trial.killed_at_epoch = checkpoint_epoch(files[-1]) if files else -1


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file in order, with TensorBoard's purge applied: an event file that starts with
    a ``file_version`` event at step S (tensorboardX's ``purge_step``) hides what earlier files logged at >= S."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 12 + length > len(data):
                break  # a record cut by the kill: TensorBoard drops it too
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.file_version and event.step > 0:
                out = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in out.items()}
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def tb_steps_per_epoch(ref_tb: dict, epochs: int) -> int:
    return len(ref_tb["train/loss"]) // epochs


def metrics_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def final_weights(run_dir: Path, epochs: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"last_checkpoint_{epochs}.pt", weights_only=True)["model_state_dict"]


def stopped_epoch(run_dir: Path) -> int | None:
    """The epoch a graceful stop interrupted (from train.log), None when the stop fell on an epoch's end."""
    for line in (run_dir / "train.log").read_text().splitlines():
        if "stopped by SIG" in line and " at epoch " in line:
            return int(line.split(" at epoch ", 1)[1].split(",", 1)[0])
    return None


def resumed_epochs(run_dir: Path) -> list[int]:
    log = (run_dir / "train.log").read_text()
    return [int(line.rsplit("(epoch ", 1)[1].rstrip(")")) for line in log.splitlines() if "resumed from" in line]


def run_trial(index: int, mode: str, data: Path, out: Path, reference: Path, epochs: int, rng: random.Random,
              inject: bool, workers: int = 0, accumulation: int = 1) -> Trial:
    trial = Trial(index, mode, workers, accumulation)
    name = f"t{index:02d}"
    run_dir = out / name
    kill_one(trial, train_command(data, out, name, epochs, workers, accumulation), run_dir, epochs, rng)
    if trial.killed_at_epoch < 1 or trial.finished_unkilled:
        return trial  # no checkpoint yet, or never killed: not a trial (the caller draws another)
    ckpt_dir = run_dir / "checkpoints"
    newest = torch.load(complete_last(ckpt_dir)[-1], map_location="cpu", weights_only=True)
    trial.stop_iteration = int(newest["trainer"]["iteration"])
    interrupted = stopped_epoch(run_dir) if mode == "sigterm" else None
    if inject:  # a truncated newer file and an Ignite temp file: resume must skip the first, remove the second
        newest = complete_last(ckpt_dir)[-1]
        (ckpt_dir / f"last_checkpoint_{trial.killed_at_epoch + 1}.pt").write_bytes(newest.read_bytes()[:4096])
        (ckpt_dir / "tmpk1ll3d_x").write_bytes(b"\0" * 100)
        trial.injected_truncated = True
    resume = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--resume", str(run_dir), "--no-progress"],
                            env=child_env(), capture_output=True, text=True)
    trial.resume_rc = resume.returncode
    if trial.resume_rc != 0:
        return trial
    resumed = resumed_epochs(run_dir)
    trial.resumed_from = resumed[-1] if resumed else -1
    if interrupted is not None and trial.resumed_from == interrupted - 1:
        trial.resumed_from = interrupted  # a mid-epoch checkpoint: Ignite counts the epoch from its iteration
    if trial.killed_at_epoch == epochs and "run already finished" in resume.stdout:
        trial.resumed_from = epochs  # killed after its last checkpoint: resume correctly has nothing to do
    trial.temp_left = sorted(n for n in os.listdir(ckpt_dir) if n.endswith(PARTIAL_SUFFIX) or n.startswith("tmp"))
    rows, ref_rows = metrics_rows(run_dir), metrics_rows(reference)
    if interrupted is not None:  # the stopped epoch's mean loss covers only the iterations after the resume
        rows = [{k: v for k, v in r.items() if not (k == "train_loss" and r["epoch"] == interrupted)} for r in rows]
        ref_rows = [{k: v for k, v in r.items() if not (k == "train_loss" and r["epoch"] == interrupted)}
                    for r in ref_rows]
    trial.metrics_ok = [r["epoch"] for r in rows] == list(range(1, epochs + 1)) and rows == ref_rows
    tb, ref_tb = read_scalars(run_dir / "tb"), read_scalars(reference / "tb")
    monotonic = all(all(a[0] < b[0] for a, b in zip(v, v[1:])) for v in tb.values())
    first_resumed = trial.killed_at_epoch * (tb_steps_per_epoch(ref_tb, epochs)) + 1
    after = {t: [e for e in v if e[0] >= first_resumed] for t, v in tb.items()}
    ref_after = {t: [e for e in v if e[0] >= first_resumed] for t, v in ref_tb.items()}
    trial.tb_ok = monotonic and {t: [s for s, _ in v] for t, v in after.items() if v} == {
        t: [s for s, _ in v] for t, v in ref_after.items() if v} and after["train/loss"] == ref_after["train/loss"]
    trial.tb_lost = sum(len(ref_tb[t]) - len(tb.get(t, [])) for t in ref_tb)
    got, want = final_weights(run_dir, epochs), final_weights(reference, epochs)
    trial.weights_equal = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    return trial


def make_data(base: Path) -> Path:
    from ignite_trainer.data.synthetic import write_synthetic

    return write_synthetic(base / "data", 12, 4)


def reference_run(data: Path, out: Path, epochs: int, accumulation: int = 1) -> Path:
    name = f"reference-acc{accumulation}"
    rc = run_to_end(train_command(data, out, name, epochs, 0, accumulation))
    if rc != 0:
        raise SystemExit(f"the reference run failed (exit {rc})")
    return out / name


def table(trials: list[Trial]) -> str:
    head = (f"{'trial':>5} {'mode':>7} {'wrk':>3} {'acc':>3} {'rc':>4} {'iter':>4} {'killed@':>7} {'partial':>7} "
            f"{'polls':>5} {'unload':>6} {'trunc':>5} {'resumed':>7} {'temps':>5} {'metrics':>7} {'tb':>3} {'tb_lost':>7} {'weights':>7} {'ok':>3}")
    lines = [head]
    for t in trials:
        lines.append(f"{t.index:>5} {t.mode:>7} {t.workers:>3} {t.accumulation:>3} {t.stop_rc:>4} "
                     f"{t.stop_iteration:>4} {t.killed_at_epoch:>7} {'yes' if t.partial_at_kill else '-':>7} "
                     f"{t.polls:>5} {t.unloadable_polls:>6} {'yes' if t.injected_truncated else '-':>5} "
                     f"{t.resumed_from:>7} {len(t.temp_left):>5} {'ok' if t.metrics_ok else 'BAD':>7} "
                     f"{'ok' if t.tb_ok else 'BAD':>3} {t.tb_lost:>7} {'equal' if t.weights_equal else 'DIFF':>7} "
                     f"{'ok' if t.ok else 'NO':>3}")
    n = len(trials)
    lines.append(
        f"\n{sum(t.ok for t in trials)}/{n} trials pass; {sum(t.mode == 'sigterm' for t in trials)} stopped by "
        f"SIGTERM ({sum(t.mode == 'sigterm' and t.stop_rc == 143 for t in trials)} exited 143, "
        f"{sum(t.mode == 'sigterm' and t.stop_iteration % 8 != 0 for t in trials)} mid-epoch); "
        f"{sum(t.mode == 'write' for t in trials)} killed during a "
        f"checkpoint write ({sum(t.partial_at_kill for t in trials)} left a .partial file); "
        f"{sum(t.injected_truncated for t in trials)} with a truncated newer file injected; "
        f"{sum(t.unloadable_polls for t in trials)} of {sum(t.polls for t in trials)} polls found no loadable checkpoint; "
        f"{sum(t.tb_lost > 0 for t in trials)} trials lost {sum(t.tb_lost for t in trials)} unflushed TensorBoard "
        f"event(s) of checkpointed epochs"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2, help="Trials per cell of the matrix [2].")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--modes", nargs="+", choices=["random", "write", "sigterm"], default=["random", "write", "sigterm"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="Scratch folder [a temporary one].")
    args = parser.parse_args(argv)
    import tempfile

    base = args.workdir or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    rng = random.Random(args.seed)
    data = make_data(base)
    out = base / "runs"
    started = time.perf_counter()
    references = {acc: reference_run(data, out, args.epochs, acc) for acc in args.accumulation}
    print(table([]).splitlines()[0], flush=True)
    trials = []
    index = 0
    for workers in args.workers:
        for acc in args.accumulation:
            for mode in args.modes:
                done = 0
                while done < args.trials:
                    trial = run_trial(index, mode, data, out, references[acc], args.epochs, rng,
                                      inject=mode != "sigterm" and index % 3 == 2, workers=workers, accumulation=acc)
                    index += 1
                    if trial.killed_at_epoch >= 1 and not trial.finished_unkilled:
                        trials.append(trial)
                        done += 1
                        print(table([trial]).splitlines()[1], flush=True)
    print()
    print(table(trials))
    print(f"\n{time.perf_counter() - started:.0f} s in all (workdir {base})")
    return 0 if all(t.ok for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
