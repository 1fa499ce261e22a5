"""DataLoaders for training and evaluation, single- or multi-process (through ``ignite.distributed``).

Training uses ``idist.auto_dataloader`` (``batch_size`` is the global batch) with a `DistributedSampler`
that drops the uneven tail when distributed, so that an epoch has ``n // batch_size`` steps whatever the
process count, and a checkpoint resumes under any count. Evaluation must see every window exactly once, but `DistributedSampler` pads the last
shard with repeated windows, which would make 2-process metrics differ from 1-process ones; so
evaluation shards with `ShardSampler`, which never pads.
"""

from __future__ import annotations

from typing import Any, Iterator

import ignite.distributed as idist
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ignite_trainer.errors import DataError


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, rank + 2*world, ...``: disjoint shards covering the dataset once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_train_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Shuffled batches of ``batch_size`` (global), dropping the last partial batch.

    Dropping keeps every step the same size (and a batch of one would break BatchNorm); it is why the
    training set must hold at least one full batch.

    Example::

        loader = make_train_loader(TrainWindows(train, cache, 4.0), batch_size=32, num_workers=2,
                                   device=torch.device("cpu"))
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n < batch_size:
        raise DataError(f"batch_size={batch_size} is larger than the training set ({n} recordings); lower --batch-size")
    world = idist.get_world_size()
    order: dict[str, Any] = {"shuffle": True}
    if world > 1:
        # Ignite's default DistributedSampler pads to ceil(n / world) per rank, so the steps per epoch would
        # depend on the process count and a checkpoint would not resume under another count. Dropping
        # the tail instead gives floor(floor(n / world) / (batch / world)) = floor(n / batch) for any count.
        order = {"sampler": DistributedSampler(dataset, num_replicas=world, rank=idist.get_rank(), shuffle=True,
                                               drop_last=True)}
    return idist.auto_dataloader(
        dataset, batch_size=batch_size, drop_last=True, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0, **order,
    )


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Every item once, in order, sharded across processes without padding.

    Example::

        loader = make_eval_loader(EvalWindows(val, cache, 4.0), batch_size=32, num_workers=0,
                                  device=torch.device("cpu"))
    """
    world = idist.get_world_size()
    sampler = ShardSampler(len(dataset), idist.get_rank(), world) if world > 1 else None  # type: ignore[arg-type]
    return DataLoader(
        dataset, batch_size=max(1, batch_size // world), shuffle=False, sampler=sampler, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
    )
