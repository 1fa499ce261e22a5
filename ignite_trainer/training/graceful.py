"""Stopping a training on purpose: SIGINT (Ctrl-C) or SIGTERM (what a scheduler sends before preemption).

The first signal does not interrupt anything: the current iteration finishes, and as soon as no
gradient is pending (`engine.closes_window`: accumulation windows are not part of any checkpoint) the
run writes a resumable checkpoint of that exact point, logs the stop and ends with `TrainingStopped`,
which the CLI turns into one line with the ``--resume`` command and exit code 128 + the signal
(130 for SIGINT, 143 for SIGTERM). A second signal aborts at once (the last complete checkpoint
stays, a partial one is cleaned up on resume).

An iteration that cannot end (waiting on a lock, a peer in a collective, a dead disk or data worker) would
keep the first signal waiting for ever, and a scheduler's warning signal is often the only one before its
kill. So while a stop is pending, an iteration (fetching its batch, the step, the per-iteration handlers)
that has lasted longer than `stop_wait` (`MIN_STOP_WAIT_S`, or `SLOWEST_ITERATIONS` times the slowest
iteration so far where that is longer) aborts the process as a second signal would: one ``error:`` line,
the same exit code, no new checkpoint, the last complete one as it was. Validation and checkpoint writes
happen between iterations and are never cut short.

Resuming from the mid-epoch checkpoint gives the weights of the run never stopped: the trainer's
iteration is in the checkpoint and `data.loaders.set_sampler_position` starts the epoch's sampler at
the next batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from ignite_trainer.runs.record import end_environment
from ignite_trainer.training.engine import closes_window

__all__ = ["GracefulStop", "TrainingStopped", "recorded_session", "STOP_SIGNALS", "MIN_STOP_WAIT_S", "SLOWEST_ITERATIONS"]

log = logging.getLogger("ignite_trainer")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: With a stop pending, an iteration older than this (or `SLOWEST_ITERATIONS` times the slowest one so far,
#: where that is longer) is taken to be stuck, and the process ends.
MIN_STOP_WAIT_S = 10.0
SLOWEST_ITERATIONS = 4
_WATCH_EVERY_S = 0.2


class TrainingStopped(Exception):
    """Training was stopped on purpose by ``signum`` after writing a checkpoint it resumes from.

    Not an error: the CLI prints `message` (the ``--resume`` command) and exits with `exit_code`.
    """

    def __init__(self, signum: int, run_dir: Path, checkpoint: str | None, command: str = "train") -> None:
        self.signum, self.run_dir, self.checkpoint, self.command = signum, Path(run_dir), checkpoint, command
        super().__init__(self.message)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def message(self) -> str:
        return (f"stopped by {self.signal_name}; checkpoint {self.checkpoint} written; continue with: "
                f"python cli.py {self.command} --resume {self.run_dir}")


class GracefulStop:
    """Turn SIGINT/SIGTERM into a checkpointed stop after the current iteration.

    ``checkpoint`` is the run's last-checkpoint handler (`handlers.attach_last_checkpoint`): called
    mid-epoch it writes the resume state of that iteration. A stop that falls on an epoch's last
    iteration waits for the epoch's own handlers (validation, LR step, that epoch's checkpoint) and stops
    after them, so the checkpoint is the ordinary end-of-epoch one. Attach it after the standard handlers.

    Example::

        stop = GracefulStop(handlers.last_checkpoint, run_dir, accumulation_steps=1)
        stop.attach(trainer)
        with stop.installed():
            trainer.run(train_loader, max_epochs=10)
        stop.raise_if_stopped()
    """

    def __init__(self, checkpoint: Checkpoint, run_dir: str | Path, accumulation_steps: int = 1,
                 command: str = "train") -> None:
        self.checkpoint_handler, self.run_dir, self.accumulation_steps = checkpoint, Path(run_dir), accumulation_steps
        self.command = command  # the CLI command whose --resume continues the run
        self.requested: int | None = None
        self.checkpoint: str | None = None
        self.stopped = False
        self._pid = os.getpid()
        self._busy_since: float | None = None  # when the current iteration began; None between iterations
        self._slowest = 0.0
        self._over = threading.Event()  # set outside `installed`: no run to watch, so a watch ends at once
        self._over.set()

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._on_iteration_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)

    @property
    def stop_wait(self) -> float:
        """How long an iteration may last, with a stop pending, before it is taken to be stuck."""
        return max(MIN_STOP_WAIT_S, SLOWEST_ITERATIONS * self._slowest)

    def _on_iteration_started(self, _engine: Engine) -> None:
        self._busy_since = time.monotonic()

    def _on_iteration(self, engine: Engine) -> None:
        # An iteration is timed from the end of the one before (or the epoch's start) to here, so a wait in
        # any handler, the batch fetch or the step counts, whichever order they were attached in.
        now = time.monotonic()
        if self._busy_since is not None:
            self._slowest = max(self._slowest, now - self._busy_since)
        # the epoch's last iteration: validation and its checkpoint come next, never cut short
        self._busy_since = None if engine.state.iteration % engine.state.epoch_length == 0 else now
        if self.requested is None or self.stopped or not closes_window(engine, self.accumulation_steps):
            return
        if engine.state.iteration % engine.state.epoch_length == 0:
            return  # the epoch's end: its own handlers and checkpoint come first (`_on_epoch_completed`)
        self.checkpoint_handler(engine)
        self._stop(engine)

    def _on_epoch_completed(self, engine: Engine) -> None:
        if self.requested is None or self.stopped or engine.state.epoch >= engine.state.max_epochs:
            return  # no request, or the run ends here anyway
        self._stop(engine)  # the epoch's checkpoint was just written by its own handler

    def _stop(self, engine: Engine) -> None:
        self.checkpoint = Path(self.checkpoint_handler.last_checkpoint or "").name
        self.stopped = True
        assert self.requested is not None
        log.warning("stopped by %s at epoch %d, iteration %d; checkpoint %s written; resume with --resume %s",
                    signal.Signals(self.requested).name, engine.state.epoch, engine.state.iteration,
                    self.checkpoint, self.run_dir)
        engine.terminate()

    def _handle(self, signum: int, _frame: object) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked with our handler (Ctrl-C reaches the whole group): the main process decides
        if self.requested is not None:  # the second signal: no more waiting
            sys.stderr.write(f"\nerror: second {signal.Signals(signum).name}: aborted at once; the last complete "
                             f"checkpoint resumes with --resume {self.run_dir}\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = signum
        log.warning("%s received: stopping after the current iteration (send it again to abort at once)",
                    signal.Signals(signum).name)
        threading.Thread(target=self._watch, args=(signum,), name="graceful-stop-watch", daemon=True).start()

    def _watch(self, signum: int) -> None:
        """With a stop pending: end the process if the current iteration outlives `stop_wait`."""
        while not self.stopped and not self._over.wait(_WATCH_EVERY_S):
            since = self._busy_since
            if since is None or self.stopped:
                continue
            age = time.monotonic() - since
            if age > self.stop_wait:
                sys.stderr.write(f"\nerror: {signal.Signals(signum).name}: the current iteration has not ended in "
                                 f"{age:.0f} s (it is waiting on something that does not come); stopped without a "
                                 f"new checkpoint; the last complete checkpoint resumes with --resume {self.run_dir}\n")
                sys.stderr.flush()
                os._exit(128 + signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Our handlers for `STOP_SIGNALS` while the block runs (the main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._pid = os.getpid()
        self._over.clear()
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            self._over.set()  # the watch ends with the run
            for s, handler in previous.items():
                signal.signal(s, handler)

    def raise_if_stopped(self) -> None:
        """After the run: `TrainingStopped` if a signal stopped it."""
        if self.stopped and self.requested is not None:
            raise TrainingStopped(self.requested, self.run_dir, self.checkpoint, self.command)


@contextlib.contextmanager
def recorded_session(run_dir: Path) -> Iterator[None]:
    """Close this session in the run's ``environment.json`` with how it ended: finished, stopped by a signal
    (`TrainingStopped`), interrupted, or failed."""
    outcome = "failed"
    try:
        yield
        outcome = "finished"
    except TrainingStopped as e:
        outcome = f"stopped by {e.signal_name}"
        raise
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    finally:
        end_environment(run_dir, outcome)
