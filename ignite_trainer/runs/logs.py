"""Where a run's messages go: ``train.log`` in the run directory and stderr, from rank 0 only.

The console handler writes through ``tqdm.write``: while a progress bar is drawn, a message (a warning,
an epoch line) lifts the bar, prints on its own line and the bar is redrawn below it, instead of being
spliced into the bar. Without a bar ``tqdm.write`` is a plain write.

Other ranks log warnings only (their INFO lines would repeat rank 0's), and Ignite's per-run INFO lines
about its own launcher and wrappers are lowered to WARNING: the run's summary says it once.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("ignite_trainer")

#: ``train.log``'s record format, and the pattern that reads a record of it back.
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) (.*)$")

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
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.addHandler(file_handler)
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        stream = _CurrentStderr()
        stream.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(stream)
    log.setLevel(logging.INFO)
    quiet_ignite()


def last_error(train_log: Path) -> str | None:
    """The message of ``train_log``'s last record when that record is an ERROR or CRITICAL one (training logs
    the error that stopped it as its last word; a resume logs on, so an old error no longer counts)."""
    try:
        lines = Path(train_log).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        m = _LOG_RECORD.match(line)
        if m:
            return m.group(2) if m.group(1) in ("ERROR", "CRITICAL") else None
    return None


def progress_bar_wanted(progress: bool | None) -> bool:
    """``progress`` None (the default) draws the bar only when stderr is a terminal: in a file (``tee``, a job
    scheduler's log) a bar is thousands of ``\r`` fragments, and the epoch lines already say everything."""
    if progress is not None:
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def quiet_non_zero_rank() -> None:
    """Warnings only on ranks other than 0; a spawned rank starts without the parent's settings."""
    log.setLevel(logging.WARNING)
    quiet_ignite()


def quiet_ignite() -> None:
    """Lower Ignite's per-run INFO lines (launcher, auto_* wrappers) to WARNING."""
    for name in _IGNITE_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and notebooks swap it between runs, and a
    handler holding the old stream would write into a closed file), through ``tqdm.write`` so that an
    active progress bar is never split by a message."""

    def __init__(self) -> None:
        super().__init__()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the training loop
            self.handleError(record)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass
