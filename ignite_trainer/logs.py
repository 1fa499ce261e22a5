"""Where a run's messages go: ``train.log`` in the run directory and stderr, from rank 0 only.

Other ranks log warnings only (their INFO lines would repeat rank 0's), and Ignite's per-run INFO lines
about its own launcher and wrappers are lowered to WARNING: the run's summary says it once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("ignite_trainer")

_IGNITE_CHATTER = ("ignite.distributed.launcher.Parallel", "ignite.distributed.auto.auto_dataloader",
                   "ignite.distributed.auto.auto_model", "ignite.distributed.auto.auto_optim")


def setup_logging(path: Path) -> None:
    """Log to ``path`` (``train.log``) and to stderr; calling it again for the same file changes nothing.

    Example::

        setup_logging(run_dir / "train.log")
    """
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in log.handlers):
        return
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_handler)
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        stream = _CurrentStderr()
        stream.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(stream)
    log.setLevel(logging.INFO)
    quiet_ignite()


def quiet_non_zero_rank() -> None:
    """Warnings only on ranks other than 0; a spawned rank starts without the parent's settings."""
    log.setLevel(logging.WARNING)
    quiet_ignite()


def quiet_ignite() -> None:
    """Lower Ignite's per-run INFO lines (launcher, auto_* wrappers) to WARNING."""
    for name in _IGNITE_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time: pytest and notebooks swap it between runs, and a
    handler holding the old stream would write into a closed file."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass
