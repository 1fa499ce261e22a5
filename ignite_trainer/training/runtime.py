"""Where a process runs: its device, its distributed backend, its torch thread count and its seeds (the cache
folder is `core.config.cache_root`).

Training, evaluation and prediction all need these answers and must give the same ones, so they live
here rather than in any one of them.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from ignite_trainer.core.config import cache_root
from ignite_trainer.core.errors import ConfigError

if TYPE_CHECKING:
    from ignite_trainer.core.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; asking for CUDA without one is a `ConfigError`.

    Example::

        device = resolve_device(config.device)
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def distributed_backend(backend: str | None, device: str) -> str:
    """The chosen backend, else nccl for CUDA and gloo for CPU (the same rule for every launcher)."""
    return backend or ("nccl" if resolve_device(device).type == "cuda" else "gloo")


def resolved_settings(config: "TrainConfig", data_source: str | Path) -> dict[str, object]:
    """What this run's ``auto``/empty settings turned into on this machine: ``device``, ``backend``
    (with more than one process), ``cache_dir`` and ``data`` (the dataset folder actually read).

    `run.train` writes them to ``resolved.yaml`` beside ``config.yaml``, which keeps the *requested* values
    so that the same config re-runs the same way elsewhere (``device: auto`` stays auto).

    Example::

        resolved_settings(TrainConfig(device="cpu"), "/data/circor")["device"]   # 'cpu'
    """
    values: dict[str, object] = {"device": str(resolve_device(config.device)),
                                 "cache_dir": str(cache_root(config).resolve()),
                                 "data": str(Path(data_source).expanduser().resolve())}
    if config.nproc_per_node > 1 or torchrun_world_size() > 1:
        values["backend"] = distributed_backend(config.backend, config.device)
    return values


def training_threads(recorded: int | None) -> int:
    """The torch intra-op thread count a run trains with: on resume, the count its checkpoint recorded
    (`record.recorded_threads`), because the order of CPU float sums depends on it and a resume on another
    count would not repeat the run bit for bit; else this process's count (a new run, or a checkpoint written
    before the count was recorded, resumed as before).

    Example::

        with intra_op_threads(training_threads(opened.threads)):
            ...  # train
    """
    return recorded if recorded is not None else torch.get_num_threads()


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: as they are), then restore the caller's count.

    Example::

        with intra_op_threads(1):
            train(config)
    """
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch: every rank builds the same initial model from the same seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def torchrun_world_size() -> int:
    """The world size ``torchrun`` (or any ``env://`` launcher) set for this process; 1 when started alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def torchrun_spans_nodes() -> bool:
    """Whether this process's launcher started only some of the run's ranks (``torchrun --nnodes 2``): the
    others run under another launcher, which is the only one that sees them exit."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", torchrun_world_size())) < torchrun_world_size()
