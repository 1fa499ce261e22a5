"""Replace a file all at once: readers see the old file or the new one, never half of either.

Every file the project rewrites (checkpoints, the metrics log after a resume, an export, reports, cache
indexes) goes through `atomic_write`: the new content goes to a hidden temp file beside the target, then
``os.replace`` swaps it in. With ``durable=True`` the file and its folder are also fsynced, so that the
swap survives a power cut, not just a killed process: use it where losing the file loses training work;
a report that can be regenerated does not need it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """The temp name `atomic_write` writes ``path`` to first: ``.<name>.partial`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def fsync_dir(path: str | Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path to write ``path`` through (for writers that want a file name, not a stream).

    On a clean exit the temp file is fsynced (``durable``) and renamed over ``path``; on any exception it is
    removed and ``path`` is left as it was.

    Example::

        with atomic_path("model.safetensors") as tmp:
            safetensors.torch.save_file(state, str(tmp))
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", durable: bool = True, **open_kwargs) -> Iterator[IO]:
    """Open a temp file for writing that replaces ``path`` when the block ends without an exception.

    Example::

        with atomic_write("report/metrics.json", durable=False) as f:
            json.dump(results, f)
    """
    with atomic_path(path, durable=False) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
    if durable:
        fsync_dir(Path(path).parent)
