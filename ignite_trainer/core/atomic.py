"""Replace a file all at once: readers see the old file or the new one, never half of either.

Every file the project rewrites (checkpoints, the metrics log after a resume, an export, reports, cache
entries) goes through `atomic_write`: the new content goes to a hidden temp file beside the target (a
unique name, so that two processes writing the same target never share one), then ``os.replace`` swaps it
in. A generated folder goes through `atomic_directory` the same way. With ``durable=True`` the file and its folder are also fsynced, so that the
swap survives a power cut, not just a killed process: use it where losing the file loses training work;
a report that can be regenerated does not need it.

`write_failure` tells a write the file system refused (disk full, quota, read-only) from a bug, also when a
library wrapped the OS error in its own type; `created_parents` removes the folders made for a write that
failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import IO, Iterator

PARTIAL_SUFFIX = ".partial"
#: How a library written in Rust (safetensors) words the OS error under its own exception type.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def partial_path(path: str | Path, tag: str = "") -> Path:
    """A fresh temp name to write ``path`` to first: ``.<name>.[<tag>.]<random>.partial`` in the same folder.

    A ``tag`` lets a writer find and remove the temp files of its own interrupted writes by name.
    """
    path = Path(path)
    middle = f"{tag}." if tag else ""
    return path.with_name(f".{path.name}.{middle}{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def current_umask() -> int:
    """The process umask (reading it means setting it: it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
def atomic_path(path: str | Path, durable: bool = True, tag: str = "") -> Iterator[Path]:
    """Yield a temp path to write ``path`` through (for writers that want a file name, not a stream).

    On a clean exit the temp file is fsynced (``durable``), given the mode a plain ``open()`` would give
    (0666 less the umask: some writers, e.g. safetensors, create 0600 files a group could not read) and
    renamed over ``path``; on any exception it is removed and ``path`` is left as it was.

    Example::

        with atomic_path("model.safetensors") as tmp:
            safetensors.torch.save_file(state, str(tmp))
    """
    path = Path(path)
    tmp = partial_path(path, tag)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", durable: bool = True, tag: str = "",
                 **open_kwargs) -> Iterator[IO]:
    """Open a temp file for writing that replaces ``path`` when the block ends without an exception.

    Example::

        with atomic_write("report/metrics.json", durable=False) as f:
            json.dump(results, f)
    """
    with atomic_path(path, durable=False, tag=tag) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
    if durable:
        fsync_dir(Path(path).parent)


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, in words (``"No space left on device"``), when the file system refused it; None
    for anything else (a bug, which keeps its traceback).

    Libraries do not always raise `OSError`: ``torch.save`` raises a ``RuntimeError`` from its zip writer
    while the `OSError` of the failed write is its context, and safetensors raises its own
    ``SafetensorError`` with the OS error only in its text (``... (os error 28)``). Both count.

    Example::

        try:
            safetensors.torch.save_file(tensors, str(tmp))
        except Exception as e:
            if (reason := write_failure(e)) is None:
                raise
            raise CheckpointError(f"{out_path}: cannot write the export ({reason})") from None
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause.strerror or str(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    found = _RUST_OS_ERROR.search(str(error))
    return os.strerror(int(found.group(1))) if found else None


@contextlib.contextmanager
def created_parents(path: str | Path) -> Iterator[None]:
    """Create the missing folders above ``path``; when the block raises, remove the ones it created (while
    they are empty), so that a write that failed leaves no new empty folders behind.

    Example::

        with created_parents("exports/v2/m.safetensors"), atomic_path("exports/v2/m.safetensors") as tmp:
            safetensors.torch.save_file(tensors, str(tmp))
    """
    missing = []
    folder = Path(path).absolute().parent
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    try:
        Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in missing:  # the deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextlib.contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a staging folder that becomes ``target`` when the block ends without an exception.

    A killed writer never leaves half a folder at ``target``; when two processes race to create the same
    ``target``, both end up with one complete copy (the loser's staging folder is discarded). With
    ``replace`` an existing ``target`` is swapped out for the new one (two renames; the old folder is
    deleted only after the new one is in place), so a failure while writing leaves the old one whole.

    Example::

        with atomic_directory(cache / "synthetic" / "circor2022-p300-s2022") as staging:
            write_synthetic(staging, 300, 2022)
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield staging
        if replace and target.exists():
            swap_directory(staging, target)
            return
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def swap_directory(staging: Path, target: Path) -> None:
    """Put ``staging`` where ``target`` is; the old ``target`` goes only once the new one is in place."""
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
