"""Starting the ranks of a run and ending them together: spawned by us, or already started by ``torchrun``.

Both go through Ignite's ``idist.Parallel``. What it lacks is how a failure travels: a rank's own
`UserError` must reach the user as that error (same class, one line), and any other crash as one
`DistributedFailure` naming the rank and the checkpoint to resume from. Errors travel as exception
objects (a queue for spawned ranks, a broadcast under torchrun), never as traceback text to parse.
"""

from __future__ import annotations

import base64
import gc
import logging
import math
import multiprocessing
import os
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import ignite.distributed as idist
import torch
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException, ProcessRaisedException

from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.runs.checkpoint import clean_partial_files, find_resume_checkpoint
from ignite_trainer.core.errors import CheckpointError, ConfigError, DistributedFailure, UserError

__all__ = ["DIST_TIMEOUT", "dist_timeout", "run_spawned", "run_joined", "broadcast_from_rank0"]

#: How long a rank waits in a collective for a peer before giving up. gloo otherwise waits forever for a
#: peer that died without closing its sockets (another node, SIGKILL under torchrun); the spawn launcher
#: also stops the survivors as soon as one rank exits. Must exceed the slowest rank-0-only work between
#: two collectives (a checkpoint save, TensorBoard writes). ``$IGNITE_TRAINER_DIST_TIMEOUT`` overrides it.
DIST_TIMEOUT = timedelta(seconds=45)
DIST_TIMEOUT_VARIABLE = "IGNITE_TRAINER_DIST_TIMEOUT"


def dist_timeout() -> timedelta:
    """`DIST_TIMEOUT`, or ``$IGNITE_TRAINER_DIST_TIMEOUT`` seconds; a value that is not a positive number of
    seconds is a `ConfigError` naming the variable (checked before a run directory is touched)."""
    raw = os.environ.get(DIST_TIMEOUT_VARIABLE)
    if raw is None:
        return DIST_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{DIST_TIMEOUT_VARIABLE}={raw!r} is not a positive number of seconds (e.g. 45)")
    return timedelta(seconds=seconds)


def run_spawned(fn: Callable[..., None], args: tuple, nproc: int, backend: str, run_dir: Path) -> None:
    """``fn(local_rank, *args)`` in this process (``nproc == 1``) or on ``nproc`` spawned ranks.

    A failed spawned rank becomes its own `UserError` (prefixed with its rank) or one `DistributedFailure`
    naming the rank, the cause and the checkpoint to resume from.
    """
    if nproc == 1:
        with idist.Parallel(backend=None) as parallel:
            parallel.run(fn, *args)
        return
    if backend == "nccl" and nproc > max(1, torch.cuda.device_count()):
        raise ConfigError(f"nproc_per_node={nproc} but only {torch.cuda.device_count()} CUDA devices; use --backend gloo")
    errors = multiprocessing.get_context("spawn").SimpleQueue()
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # its "Terminating process ... via SIGTERM" would follow our one line
    try:
        with idist.Parallel(backend=backend, nproc_per_node=nproc, timeout=dist_timeout()) as parallel:
            parallel.run(_spawned_rank, fn, errors, *args)
    except ProcessException as e:
        clean_partial_files(RunDirectory(run_dir).checkpoints)  # a rank stopped by SIGTERM mid-save leaves its temp file
        raised = {}
        while not errors.empty():
            rank, error = errors.get()
            raised.setdefault(rank, error)
        raise _rank_failure(e, raised.get(e.error_index), run_dir) from None
    finally:
        spawn_log.setLevel(level)


def _spawned_rank(local_rank: int, fn: Callable[..., None], errors: Any, *args: Any) -> None:
    """``fn`` on a spawned rank: report its `UserError` to the parent, then collect garbage before Ignite
    destroys the group.

    The engines' handler closures form reference cycles that keep the DDP model alive past the return;
    left to the interpreter's exit, they were freed after the gloo group was gone, and the rank died
    with SIGABRT ("terminate called without an active exception").
    """
    try:
        fn(local_rank, *args)
    except UserError as e:
        errors.put((local_rank, e))
        raise
    finally:
        gc.collect()


def _rank_failure(e: ProcessException, raised: UserError | None, run_dir: Path) -> UserError:
    """One line for a failed spawned rank; its own `UserError` keeps its class and message."""
    if raised is not None:
        return type(raised)(f"rank {e.error_index}: {raised}")
    if isinstance(e, ProcessExitedException):
        cause = f"killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
    elif isinstance(e, ProcessRaisedException):
        lines = [line for line in str(e).splitlines() if line.strip()]
        cause = lines[-1] if lines else "unknown error"  # the traceback's last line, only shown
    else:
        cause = str(e).strip().splitlines()[0]
    try:
        where = f"; resume from {find_resume_checkpoint(run_dir)[0].name} with --resume {run_dir}"
    except CheckpointError:
        where = "; no complete checkpoint was written yet"
    return DistributedFailure(f"rank {e.error_index} failed ({cause}); the whole run stopped{where}")


def run_joined(fn: Callable[..., None], args: tuple, backend: str) -> None:
    """``fn(local_rank, *args)`` on this rank when ``torchrun`` started every rank: Ignite joins its
    process group instead of spawning."""
    with idist.Parallel(backend=backend, timeout=dist_timeout()) as parallel:
        parallel.run(fn, *args)


def broadcast_from_rank0(make: Callable[[], Any]) -> Any:
    """``make()`` on rank 0, its value on every rank; a `UserError` it raises is raised on every rank.

    Every rank must learn of rank 0's failure, or the others would wait in the broadcast until the
    timeout. The value (or the error object) travels pickled, so the error keeps its class.
    """
    payload = ""
    if idist.get_rank() == 0:
        try:
            outcome: tuple[str, Any] = ("value", make())
        except UserError as e:
            outcome = ("error", e)
        payload = base64.b64encode(pickle.dumps(outcome)).decode("ascii")
    kind, value = pickle.loads(base64.b64decode(idist.broadcast(payload, src=0, safe_mode=True)))
    if kind == "error":
        raise value
    return value
