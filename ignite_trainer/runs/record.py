"""What a run directory records about itself: its identity, its patient split and its environment.

A resume must continue the run it names and nothing else, and an evaluation must score the patients the
run held out, not whatever a later split of a grown data folder would hold out. So a run records:

- its *identity* (`run_identity`): a fingerprint of the config fields that change the result and of the
  data (recording ids and the content keys of their files), stored in every checkpoint; a checkpoint of
  another run, or the same run pointed at other data, is refused by `identity_differences`; a run with
  ``init_from`` adds the digest of the weights file it started from (`weights.weights_digest`), so a resume
  whose init file changed is refused too;
- ``split.json`` (`write_split`, `read_split`): the patient ids on each side (and the fold), what
  ``evaluate`` scores as validation;
- ``environment.json`` (`record_environment`): package versions, command line, resolved device, torch
  thread count, git commit, host, and the start and end of every session (a resume adds one).

Every checkpoint also holds the torch intra-op thread count it was trained with (``torch_threads``, read
back by `recorded_threads`): on the CPU the order of float sums depends on it, so a resume trains with the
recorded count to continue the run bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from ignite_trainer.core.atomic import atomic_write
from ignite_trainer.core.config import ADDED_LATER, RESUMABLE_CHANGES, TrainConfig
from ignite_trainer.data.prepare import PreparedData
from ignite_trainer.model.cpu_kernels import KERNEL_IN_USE
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.runs.weights import weights_digest

__all__ = ["run_identity", "identity_differences", "recorded_threads", "write_split", "read_split",
           "record_environment", "end_environment", "recorded_kernel_use", "SPLIT_FILE", "ENVIRONMENT_FILE"]

SPLIT_FILE = "split.json"
ENVIRONMENT_FILE = "environment.json"
_PACKAGES = ("torch", "pytorch-ignite", "numpy", "scipy", "click", "pyyaml", "tensorboardX", "safetensors")


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=12).hexdigest()


def run_identity(config: TrainConfig, data: PreparedData) -> dict[str, Any]:
    """The fingerprint of a run: the result-affecting config fields and the data (recording ids with the
    content keys of their feature files, per side of the split). Equal for every rank and every resume.

    Example::

        identity = run_identity(config, data)   # {"config": "3f..", "data": "9a..", "recordings": 42, ...}
    """
    result_fields = {k: v for k, v in config.to_dict().items()
                     if k not in RESUMABLE_CHANGES and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    cache = data.feature_cache()

    def side(recordings: list) -> list[list[str]]:
        return sorted([r.recording_id, (cache.cached_path(r) or cache.feature_path(r)).stem] for r in recordings)

    identity = {
        "config": _digest(result_fields),
        "data": _digest({"train": side(data.train), "val": side(data.val)}),
        "recordings": len(data.train) + len(data.val),
        "patients": len({r.patient_id for r in data.train + data.val}),
        "source": str(data.source),
    }
    if config.init_from is not None:  # the weights the run started from: their bytes, not their path
        identity["init"] = weights_digest(config.init_from)
    return identity


def identity_differences(saved: Any, now: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's identity and the run's, in words (empty: the same run)."""
    if not isinstance(saved, Mapping):
        return ["it holds no run identity (written by another program or an older version)"]
    differences = []
    if saved.get("config") != now["config"]:
        differences.append("another config")
    if saved.get("data") != now["data"]:
        differences.append(f"other data (it trained on {saved.get('recordings')} recordings of "
                           f"{saved.get('patients')} patients in {saved.get('source')}; {now['source']} now holds "
                           f"{now['recordings']} recordings of {now['patients']} patients, or the same counts with "
                           "other content)")
    if saved.get("init") != now.get("init"):
        if now.get("init") is None:
            differences.append("other init weights (the run started from an init_from file; the config now has none)")
        else:
            differences.append("other init weights (the init_from file's content is not the one the run started from)")
    return differences


def recorded_threads(checkpoint: Mapping[str, Any], path: Path) -> int | None:
    """The torch intra-op thread count a checkpoint was trained with (its ``torch_threads``), or None for a
    checkpoint written before the count was recorded; a value that is not a count is a `CheckpointError`."""
    threads = checkpoint.get("torch_threads")
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CheckpointError(f"{path}: torch_threads={threads!r} is not a thread count; the checkpoint is damaged")
    return threads


# ---------------------------------------------------------------------------------------------- split
def write_split(run_dir: Path, config: TrainConfig, data: PreparedData) -> Path:
    """``split.json``: the patient ids on each side of the run's split (and the fold that is validation)."""
    path = Path(run_dir) / SPLIT_FILE
    split = {
        "train": sorted({r.patient_id for r in data.train}),
        "val": sorted({r.patient_id for r in data.val}),
        "seed": config.seed, "val_fraction": config.val_fraction, "n_folds": config.n_folds, "fold": config.fold,
    }
    with atomic_write(path, durable=True) as f:
        f.write(json.dumps(split, indent=1) + "\n")
    return path


def read_split(run_dir: Path | None) -> dict[str, set[str]] | None:
    """The saved split of a run as ``{"train": ids, "val": ids}``, or None (no run directory, or a run
    from before splits were saved)."""
    if run_dir is None:
        return None
    path = Path(run_dir) / SPLIT_FILE
    try:
        saved = json.loads(path.read_text())
        return {"train": set(saved["train"]), "val": set(saved["val"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable split file ({e})") from None


# ---------------------------------------------------------------------------------------------- environment
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def record_environment(run_dir: Path, device: str, cpu_kernel: str, threads: int | None = None) -> None:
    """Add this session (start or resume) to ``environment.json``: versions, command line, device, torch
    intra-op ``threads``, git commit, host, start time and whether the fused CPU kernel computes the conv
    blocks (``cpu_kernel``, a `cpu_kernels.kernel_status` line, decided before training; see
    `recorded_kernel_use`); `end_environment` adds the end time."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    sessions = _sessions(path)
    sessions.append({"started": _now(), "ended": None, "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
                     "device": device, "torch_threads": threads, "host": socket.gethostname(),
                     "git_commit": _git_commit(), "packages": _versions(), "cpu_kernel": cpu_kernel})
    _write_sessions(path, sessions)


def end_environment(run_dir: Path, outcome: str) -> None:
    """Close this session in ``environment.json`` with the end time and how it ended (finished, stopped, failed)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    sessions = _sessions(path)
    if sessions and sessions[-1].get("ended") is None:
        sessions[-1].update(ended=_now(), outcome=outcome)
        _write_sessions(path, sessions)


def recorded_kernel_use(run_dir: Path) -> bool | None:
    """Whether the run's latest session that says so computed its conv blocks with the fused CPU kernel (the
    kernel and the ordinary modules round differently, so a resume must take the same path); None when no
    session says (a new run)."""
    for session in reversed(_sessions(Path(run_dir) / ENVIRONMENT_FILE)):
        if not isinstance(session, dict):
            continue
        line = session.get("cpu_kernel", session.get("fused_kernel"))
        if isinstance(line, str):
            # older versions wrote it at the session's end, under "fused_kernel", in the plural
            return line.startswith(KERNEL_IN_USE) or line.startswith("fused kernels in use")
    return None


def _sessions(path: Path) -> list[dict[str, Any]]:
    try:
        sessions = json.loads(path.read_text()).get("sessions", [])
    except (OSError, ValueError, AttributeError):
        return []
    return sessions if isinstance(sessions, list) else []


def _write_sessions(path: Path, sessions: list[dict[str, Any]]) -> None:
    with atomic_write(path, durable=False) as f:
        f.write(json.dumps({"sessions": sessions}, indent=1) + "\n")
