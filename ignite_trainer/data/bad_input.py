"""What to do with a recording that cannot be used: stop (default) or, with ``--skip-bad``, warn and go on.

Readers find some problems (a ``.txt`` naming a missing file) and feature extraction finds others
(a truncated WAV), so both take the same policy object and the run reports one count at the end.
"""

from __future__ import annotations

import logging

from ignite_trainer.core.errors import DataError

log = logging.getLogger("ignite_trainer.data")


class BadInputPolicy:
    """Raise `DataError` on the first bad item, or (``skip=True``) log a warning per item and count them."""

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.skipped: list[str] = []

    def report(self, message: str) -> None:
        """``message`` names the file and the problem, e.g. ``"a/1234_AV.wav: truncated (...)"``."""
        if not self.skip:
            raise DataError(message)
        log.warning("skipped %s", message)
        self.skipped.append(message)

    def summary(self) -> str | None:
        """One line for the end of a run, or None when nothing was skipped."""
        if not self.skipped:
            return None
        return f"skipped {len(self.skipped)} bad item(s); see the warnings above"

