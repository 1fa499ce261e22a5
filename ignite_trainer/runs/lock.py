"""Tell a run that is training now from one that stopped: an OS lock the training process holds.

Files alone cannot tell "running" from "killed a minute ago": both have a fresh log and no final checkpoint.
The training process therefore holds an exclusive ``flock`` on ``<run_dir>/.lock`` while it trains; the
operating system releases it when the process ends in any way, a SIGKILL or a power cut included, so a
stale lock cannot exist. Anyone can ask `is_running` without disturbing the run. Where ``fcntl`` is not
available (Windows), `hold_run_lock` does nothing and `is_running` answers None (unknown).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ignite_trainer.core.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "hold_run_lock", "is_running"]

LOCK_NAME = ".lock"

#: Lock descriptors this process holds. A forked child (a DataLoader worker) inherits them, and an flock
#: lives while any copy is open: a worker still alive after training would keep the run "running".
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    """In a forked child: drop the inherited copies, so that only the training process holds the lock."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run's lock for the ``with`` block; a run already locked by another process is refused.

    Example::

        with hold_run_lock(run_dir):
            launch(config, run_dir, data, resume_path, setup)
    """
    if fcntl is None:
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"{run_dir}: another process is training this run now") from None
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing releases the lock


def is_running(run_dir: str | Path) -> bool | None:
    """True while a process holds the run's lock; None where locks are not available.

    Example::

        is_running("runs/quick")   # False once the training process has ended, however it ended
    """
    if fcntl is None:
        return None
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # never locked (or not readable): nothing trains there through this project
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
