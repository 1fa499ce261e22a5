"""Checkpoint files: written so a kill never leaves none, loaded so an untrusted file never runs code.

Ignite's `Checkpoint` decides *what* and *when* to save; this module supplies what it lacks:

- `SafeDiskSaver`: Ignite's `DiskSaver` deletes the outgoing file *before* writing the new one, so a kill
  in between leaves no checkpoint of that handler (measured: 13-17 of 30 kills). This saver writes the new
  file first (`atomic.atomic_write`: temp file, fsync, rename, fsync of the folder) and only then deletes
  the old one.
- File names: `BEST_PATTERN` and `LAST_PATTERN` are given to Ignite's `Checkpoint`, and
  `parse_checkpoint_name` reads them back; nothing else in the project builds or parses a checkpoint name.
- `load_checkpoint`: always ``torch.load(weights_only=True)`` with ``map_location``; a pickle that would
  build arbitrary objects is refused, a truncated file is reported, both as a `CheckpointError` line.
- `RNGStates` and `Snapshot`: objects with ``state_dict()`` so that Ignite's `Checkpoint` stores the
  python/numpy/torch RNG states (without which a resumed run is not bit-identical) and plain values
  (``epoch``, ``val_loss``, the config) at the top level of the file, where readers of the file expect them.
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from ignite.handlers import Checkpoint, DiskSaver

from ignite_trainer.core.atomic import PARTIAL_SUFFIX, atomic_write, write_failure
from ignite_trainer.core.vocabulary import best_epoch
from ignite_trainer.core.errors import CheckpointError

#: The run directory's folder of checkpoint files (`rundir.RunDirectory.checkpoints`).
CHECKPOINTS_DIR = "checkpoints"
#: Ignite ``filename_pattern`` of the best checkpoints: the epoch, then the score (larger is better).
BEST_PATTERN = "best_checkpoint_{global_step}_{score_name}={score}.{ext}"
#: Ignite ``filename_pattern`` of the per-epoch resume checkpoints.
LAST_PATTERN = "last_checkpoint_{global_step}.{ext}"
_NAME = re.compile(r"^(?P<kind>best|last)_checkpoint_(?P<epoch>\d+)"
                   r"(?:_(?P<score_name>[^=]+)=(?P<score>-?[0-9.]+(?:e[-+]?\d+)?))?\.pt$", re.IGNORECASE)
#: What a file `torch.save` wrote starts with: a zip archive, or (the legacy format) a pickle protocol byte.
_ZIP_MAGIC, _PICKLE_PROTOCOL = b"PK\x03\x04", b"\x80"
_IGNITE_TEMP = re.compile(r"^tmp[a-z0-9_]{6,}$")
#: Where ``torch.save``'s zip writer raises from (``[enforce fail at inline_container.cc:672] ...``) when a
#: write under it failed.
_ZIP_WRITER_FAILURE = "inline_container.cc"


@dataclass(frozen=True)
class CheckpointName:
    """What a checkpoint's file name says: ``kind`` (``"best"`` or ``"last"``), epoch and, for best, the score."""

    kind: str
    epoch: int
    score_name: str | None = None
    score: float | None = None


def parse_checkpoint_name(name: str) -> CheckpointName | None:
    """Read a name written through `BEST_PATTERN` or `LAST_PATTERN`; None for any other file.

    Example:

        >>> parse_checkpoint_name("best_checkpoint_7_neg_val_loss=-0.4310.pt")
        CheckpointName(kind='best', epoch=7, score_name='neg_val_loss', score=-0.431)
    """
    m = _NAME.match(name)
    if m is None or (m.group("kind").lower() == "best") != (m.group("score") is not None):
        return None
    score = m.group("score")
    return CheckpointName(m.group("kind").lower(), int(m.group("epoch")), m.group("score_name"),
                          float(score) if score is not None else None)


class SafeDiskSaver(DiskSaver):
    """A `DiskSaver` that writes the new file before deleting the old one, and fsyncs both file and folder.

    Ignite's `Checkpoint` calls ``remove(old)`` and then ``__call__(new)``; removals are therefore queued
    and carried out after the next successful write. If that write fails (disk full, kill), the old
    file is still there. Partial files are named ``.<name>.<random>.partial`` and removed by `clean_partial_files`.

    Example::

        from ignite.handlers import Checkpoint
        saver = SafeDiskSaver("runs/x/checkpoints", require_empty=False)
        handler = Checkpoint({"model": model}, saver, n_saved=1)
    """

    def __init__(self, dirname: str | Path, **kwargs: Any) -> None:
        kwargs.setdefault("require_empty", False)
        super().__init__(dirname, atomic=True, **kwargs)
        self._pending_removals: list[str] = []

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        try:
            with atomic_write(path, "wb", durable=True) as f:
                func(checkpoint, f, **self.kwargs)
        except Exception as e:  # disk full, quota, read-only: a user's problem, one line; the old file is kept
            reason = _checkpoint_write_failure(e)
            if reason is None:
                raise  # not the disk: a bug, keep the traceback
            raise CheckpointError(
                f"{path}: cannot write checkpoint ({reason}); nothing was removed, the previous checkpoint is intact"
            ) from None
        pending, self._pending_removals = self._pending_removals, []
        for name in pending:
            if name != path.name:
                (self.dirname / name).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self._pending_removals.append(filename)


def _checkpoint_write_failure(error: BaseException) -> str | None:
    """Why writing a checkpoint failed, when the disk explains it. On a full disk ``torch.save`` raises a
    ``RuntimeError`` from its zip writer, not the `OSError` (that is only its context, when there is one)."""
    reason = write_failure(error)
    if reason is None and isinstance(error, RuntimeError) and _ZIP_WRITER_FAILURE in str(error):
        reason = f"the zip writer of torch.save failed: {_first_line(error)[:160]}; is the disk full?"
    return reason


def clean_partial_files(dirname: str | Path) -> list[Path]:
    """Delete temporary files left by killed saves (ours and Ignite's ``tmpXXXX``); returns what was removed."""
    dirname = Path(dirname)
    removed = []
    if not dirname.is_dir():
        return removed
    for p in dirname.iterdir():
        if p.is_file() and (p.name.endswith(PARTIAL_SUFFIX) or _IGNITE_TEMP.match(p.name)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class Snapshot:
    """Puts a plain value in a checkpoint through Ignite's ``state_dict()`` protocol; loading is a no-op.

    ``Checkpoint({"epoch": Snapshot(lambda: trainer.state.epoch), ...})`` stores ``epoch`` as an int at the
    top level of the file, readable without rebuilding any object.

    Example::

        to_save = {"model_state_dict": model, "epoch": Snapshot(lambda: trainer.state.epoch)}
        trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, SafeDiskSaver("ckpt")))
    """

    def __init__(self, get: Callable[[], Any]) -> None:
        self._get = get

    def state_dict(self) -> Any:
        return self._get()

    def load_state_dict(self, state: Any) -> None:  # values are read back by whoever needs them
        pass


class RNGStates:
    """The python, numpy and torch (CPU and CUDA) RNG states, in a form ``weights_only=True`` accepts.

    Ignite's documented resume set (model, optimizer, scheduler, trainer, early stopping) does not make
    a resumed run bit-identical: crops and shuffles draw from these generators too.

    Example::

        handler = Checkpoint({"model": model, "optimizer": optimizer, "rng": RNGStates()}, SafeDiskSaver("ckpt"))
        RNGStates().load_state_dict(load_checkpoint("ckpt/checkpoint_10.pt")["rng"])  # on resume, last
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: ``weights_only=True`` always, never a fallback. Errors are one line.

    Example::

        ckpt = load_checkpoint("runs/x/checkpoints/last_checkpoint_3.pt")
        print(ckpt["epoch"], ckpt["val_loss"], ckpt["thresholds"])
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((_ZIP_MAGIC, _PICKLE_PROTOCOL)):
        hint = "; a WAV recording: the checkpoint comes first" if head == b"RIFF" else ""
        raise CheckpointError(f"{path}: not a checkpoint (a PyTorch checkpoint is a zip archive; "
                              f"this file starts with {head!r}{hint})")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if _unsafe_globals(path):
            raise CheckpointError(
                f"{path}: refused: the file holds objects other than tensors and plain containers "
                f"(it could run code when loaded); it was not loaded"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dictionary, found {type(obj).__name__}")
    return obj


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a refused file's pickle would build, as torch itself lists them (none when
    the file cannot even be read that far: then it is damaged, not dangerous)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - any failure to list means: not classifiable as unsafe
        return []


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def checkpoint_epoch(path: Path) -> int:
    """Epoch number in a checkpoint's file name (-1 when the name is not one of ours)."""
    parsed = parse_checkpoint_name(Path(path).name)
    return parsed.epoch if parsed else -1


def find_best_checkpoint(run_dir: str | Path) -> Path:
    """The best checkpoint of a run: the highest score among its ``best_checkpoint_*`` files.

    Scores in the names are "larger is better" (a loss is stored negated); a tie goes to the earlier epoch
    (`vocabulary.best_epoch`, the rule of the whole project).

    Example::

        path = find_best_checkpoint("runs/quick")   # runs/quick/checkpoints/best_checkpoint_9_...pt
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    best = best_checkpoint_file(ckpt_dir)
    if best is None:
        raise CheckpointError(f"{run_dir}: no best_checkpoint_*.pt in {ckpt_dir} (has the run validated an epoch?)")
    return best[2]


def best_checkpoint_file(ckpt_dir: str | Path) -> tuple[int, float, Path] | None:
    """``(epoch, larger-is-better score in the name, path)`` of the best ``best_checkpoint_*`` file in
    ``ckpt_dir`` by `vocabulary.best_epoch`; None when there is none. Reads names only."""
    ckpt_dir = Path(ckpt_dir)
    found = {}
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        parsed = parse_checkpoint_name(p.name)
        if parsed is not None and parsed.kind == "best" and parsed.score is not None:
            found[parsed.epoch] = (parsed.score, p)
    epoch = best_epoch(((e, score) for e, (score, _) in found.items()), "max")
    return None if epoch is None else (epoch, *found[epoch])


def last_checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """The ``last_checkpoint_*`` files in ``ckpt_dir``, newest epoch first. Reads names only."""
    ckpt_dir = Path(ckpt_dir)
    found = [p for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
             if getattr(parse_checkpoint_name(p.name), "kind", None) == "last"]
    return sorted(found, key=checkpoint_epoch, reverse=True)


def find_resume_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest *complete* ``last_checkpoint_*.pt`` in ``run_dir/checkpoints`` and its contents.

    A truncated or corrupt newer file (a kill during the write) is skipped in favour of an older one.

    Example::

        path, ckpt = find_resume_checkpoint("runs/x")
        print(f"would resume from {path.name} after epoch {ckpt['epoch']}")
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints folder; nothing to resume")
    clean_partial_files(ckpt_dir)
    problems = []
    for path in last_checkpoint_files(ckpt_dir):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if "model_state_dict" in ckpt and "trainer" in ckpt:
            return path, ckpt
        problems.append(f"{path}: not a training checkpoint (no trainer state)")
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from{detail}")


def check_model_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Raise a one-line `CheckpointError` when ``state_dict`` does not fit ``model`` (keys or shapes).

    ``model.load_state_dict`` would say it in a multi-line RuntimeError listing every key.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        if shapes:
            parts.append(f"shape mismatch e.g. {shapes[0]}")
        raise CheckpointError(
            f"{source}: weights do not fit model {type(model).__name__} ({'; '.join(parts)}); "
            "was it trained with another --model or feature setting?"
        )


def load_model_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict`` with a one-line explanation of mismatched keys or shapes.

    Example::

        model = build_model("attention_cnn", n_mels=64)
        load_model_weights(model, load_checkpoint(path)["model_state_dict"], path)
    """
    check_model_weights(model, state_dict, source)
    model.load_state_dict(state_dict)


def restore(path: str | Path, objects: Mapping[str, Any], map_location: str | torch.device = "cpu") -> int:
    """Load a resume checkpoint into ``objects`` (the handler's ``to_save``); returns the trainer's iteration.

    Ignite's `Checkpoint.load_objects` does the loading (it unwraps DDP models); this adds only the
    project's rules: every object must be in the file (else one `CheckpointError` line, since the run
    could not continue exactly), except a `Snapshot` (a plain value added by a later version: nothing to
    restore); model weights that do not fit are one line too; and `RNGStates` are restored last, so that
    nothing loaded before them draws from the restored generators.

    Example::

        iteration = restore(find_resume_checkpoint(run_dir)[0], to_save)
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location=map_location)
    for key, obj in objects.items():
        if key not in ckpt and not isinstance(obj, Snapshot):
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'; it cannot resume this run exactly")
        if isinstance(obj, torch.nn.Module):
            inner = obj.module if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else obj
            check_model_weights(inner, ckpt[key], path)
    rng = {k: o for k, o in objects.items() if isinstance(o, RNGStates)}
    Checkpoint.load_objects({k: o for k, o in objects.items() if k not in rng and not isinstance(o, Snapshot)}, ckpt)
    for key, obj in rng.items():
        obj.load_state_dict(ckpt[key])
    return int(ckpt["trainer"]["iteration"]) if "trainer" in ckpt else 0
