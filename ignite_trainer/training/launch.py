"""Starting the ranks of a run and ending them together: spawned by us, or already started by ``torchrun``.

Both go through Ignite's ``idist`` (``Parallel`` spawns, ``initialize`` joins). What it lacks is how a
failure travels: a rank's own `UserError` must reach the user as that error (same class, one line), and
any other crash as one `DistributedFailure` naming the rank and the checkpoint to resume from. Errors
travel as exception objects (a queue for spawned ranks, a broadcast under torchrun), never as traceback
text to parse.

A rank on another node is different: no launcher here sees it exit, and nothing travels from a machine
switched off or a process SIGKILLed. The survivors learn of it only from their own failed collective (a
closed connection at once, or `dist_timeout` later when the peer stops answering), which gloo raises as a
plain `RuntimeError` known only by its message; under ``torchrun --nnodes N`` that failure becomes one
`DistributedFailure` naming the lost peer (`peer_loss_ends_run`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException, ProcessRaisedException

from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.runs.checkpoint import clean_partial_files, find_resume_checkpoint
from ignite_trainer.core.errors import CheckpointError, ConfigError, DistributedFailure, UserError
from ignite_trainer.training.runtime import torchrun_spans_nodes

__all__ = ["DIST_TIMEOUT", "SETUP_TIMEOUT", "dist_timeout", "run_spawned", "run_joined", "peer_loss_ends_run",
           "broadcast_from_rank0", "setup_barrier"]

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
    return DistributedFailure(f"rank {e.error_index} failed ({cause}); the whole run stopped{_resume_hint(run_dir)}")


def _resume_hint(run_dir: Path) -> str:
    """The end of a failure's line: the checkpoint a resume starts from, and the command's flag."""
    try:
        return f"; resume from {find_resume_checkpoint(run_dir)[0].name} with --resume {run_dir}"
    except CheckpointError:
        return "; no complete checkpoint was written yet"


#: How long a torchrun rank waits for the opening of the run (`broadcast_from_rank0`, `setup_barrier`): rank 0
#: checks every input and a node's local rank 0 fills the feature cache, work that grows with the data set
#: and has no bound `dist_timeout` could know. Torch's own default (30 minutes); training keeps `dist_timeout`.
SETUP_TIMEOUT = torch.distributed.constants.default_pg_timeout

#: The gloo group of every rank that waits out the opening of a run under torchrun (`SETUP_TIMEOUT`); None
#: outside `run_joined`.
_setup_group: Any = None


def run_joined(fn: Callable[..., None], args: tuple, backend: str) -> None:
    """``fn(local_rank, *args)`` on this rank when ``torchrun`` started every rank: Ignite joins the
    process group that torchrun's environment describes, with `dist_timeout`, instead of spawning, and a
    second group waits out the opening (`SETUP_TIMEOUT`). A peer lost before ``fn`` knows its run directory
    (the opening broadcast) ends it as `peer_loss_ends_run` says.

    ``idist.Parallel`` is not used here: when it joins rather than spawns it drops its ``timeout``, and the
    group would wait 30 minutes (torch's default) for a peer that stopped answering.
    """
    global _setup_group
    idist.initialize(backend, timeout=dist_timeout())
    try:
        with peer_loss_ends_run(None):
            _setup_group = torch.distributed.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
            fn(idist.get_local_rank(), *args)
    finally:
        _setup_group = None
        idist.finalize()


#: What gloo's transport errors say; gloo raises them as plain `RuntimeError`s (a closed connection names
#: the peer's address, a receive that timed out names the wait). NCCL and the store raise `DistError`s.
_GLOO_TRANSPORT = ("gloo/transport", "pair closure")


def _is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer closed its connection or stopped answering."""
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and any(mark in str(error) for mark in _GLOO_TRANSPORT)


@contextlib.contextmanager
def peer_loss_ends_run(run_dir: Path | None) -> Iterator[None]:
    """Under ``torchrun --nnodes N``, a collective that lost its peer ends this rank with one
    `DistributedFailure` naming the peer (exit code 3) instead of a traceback; ``run_dir`` (None before the
    run is opened) says where to resume.

    On one node, torchrun's agent stops the survivors as soon as a rank exits, and the rank that failed
    speaks for itself (its own ``error:`` line or traceback); this rank's broken collective adds nothing
    there, so it is left alone.
    """
    try:
        yield
    except RuntimeError as e:  # DistError is a RuntimeError too
        if not (torchrun_spans_nodes() and _is_lost_peer(e)):
            raise
        raise _peer_loss(e, run_dir) from None


def _peer_loss(error: RuntimeError, run_dir: Path | None) -> DistributedFailure:
    """One line: which rank lost which peer, gloo's or NCCL's reason without its source location, where to resume."""
    rank, world = idist.get_rank(), idist.get_world_size()
    peer = f"rank {1 - rank}" if world == 2 else f"one of its {world - 1} peer ranks"
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    reason = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text  # "[.../pair.cc:553] ..."
    reason = reason.split(". ")[0].rstrip(".")
    if run_dir is None:
        where = ""
    elif rank == 0:
        where = _resume_hint(run_dir)
    else:  # rank 0 writes the checkpoints, maybe on a disk this node does not see
        where = f"; resume with --resume {run_dir} where rank 0 wrote it"
    return DistributedFailure(f"rank {rank} lost {peer} ({reason}): a process or node of the run stopped or "
                              f"cannot be reached; the whole run stopped{where}")


def broadcast_from_rank0(make: Callable[[], Any]) -> Any:
    """``make()`` on rank 0, its value on every rank; a `UserError` it raises is raised on every rank.

    Every rank must learn of rank 0's failure, or the others would wait in the broadcast until the
    timeout. The value (or the error object) travels pickled, so the error keeps its class. Under
    `run_joined` the others wait as long as `SETUP_TIMEOUT`, not `dist_timeout`.
    """
    outcome: list[Any] = [None]
    if idist.get_rank() == 0:
        try:
            outcome = [("value", make())]
        except UserError as e:
            outcome = [("error", e)]
    torch.distributed.broadcast_object_list(outcome, src=0, group=_setup_group)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def setup_barrier() -> None:
    """Every rank waits for the others, as long as `SETUP_TIMEOUT` under `run_joined` (a node's feature cache
    being filled), `dist_timeout` elsewhere."""
    torch.distributed.barrier(group=_setup_group)
