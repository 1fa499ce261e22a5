"""DataLoaders for training and evaluation, single- or multi-process (through ``ignite.distributed``).

Training order and crops are functions of ``(seed, epoch)`` and ``(seed, epoch, index)``: `EpochSampler`
shuffles with a generator seeded from the run's seed and the epoch, shards the permutation across ranks,
and yields ``(epoch, index)`` keys, so the epoch reaches the dataset in every worker process with each
request. The global batch ``j`` of an epoch is then the same set of (recording, crop) pairs for any
process count and any ``num_workers``; an epoch has ``n // batch_size`` steps whatever the process count
(the uneven tail is dropped), so a checkpoint resumes under any count.

A run resumed from a checkpoint written after batch ``k`` of an epoch calls ``sampler.set_start(k)``
before the epoch's iterator is created: the epoch then yields batches ``k, k+1, ...`` exactly as the
uninterrupted run would have, without reading the first ``k``.

Evaluation must see every window exactly once, but `DistributedSampler` pads the last shard with
repeated windows, which would make 2-process metrics differ from 1-process ones; so evaluation shards
with `ShardSampler`, which never pads.
"""

from __future__ import annotations

from typing import Iterator, Sized

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ignite_trainer.data.datasets import STREAM_SHUFFLE, EvalWindows, ResidentFeatures, TrainWindows, sample_seed
from ignite_trainer.core.errors import DataError


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, rank + 2*world, ...``: disjoint shards covering the dataset once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def epoch_order(length: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``range(length)`` for ``epoch`` (from 0): a function of ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, 0, STREAM_SHUFFLE))
    return torch.randperm(length, generator=generator).tolist()


class EpochSampler(DistributedSampler):
    """This rank's ``(epoch, index)`` keys of an epoch: a shard of `epoch_order`, from batch ``start`` on.

    With ``keyed=False`` it yields plain indices, for a dataset that draws nothing at random (any
    map-style dataset); `make_train_loader` asks the dataset's ``accepts_epoch_keys`` attribute.

    Rank ``r`` of ``R`` takes positions ``r, r + R, ...`` of the epoch's order, cut to a multiple of
    ``R * local_batch_size``; so its ``j``-th local batch and the other ranks' ``j``-th batches together
    are positions ``[j * B, (j + 1) * B)`` of the order, ``B`` the global batch: the batch one process
    would have read. A `DistributedSampler` (``set_epoch`` as usual; Ignite's auto helpers leave it alone).

    ``set_epoch(e)`` must be called before the epoch's iterator is created (``e`` from 0; the trainer's
    ``EPOCH_STARTED`` is early enough, Ignite creates the iterator after it). ``set_start(k)`` makes the
    *next* iterator skip the first ``k`` local batches (a mid-epoch resume) and applies once; ``len()``
    stays the whole epoch's, which is what Ignite's ``epoch_length`` must be.

    Example::

        sampler = EpochSampler(len(dataset), local_batch_size=32, seed=0)
        sampler.set_epoch(4)
        sampler.set_start(10)                          # resume after 10 batches of the 5th epoch
        first = next(iter(sampler))                    # (4, index of position 320 of epoch 4's order)
    """

    def __init__(self, length: int, local_batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, keyed: bool = True) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.length = length
        self.local_batch_size = local_batch_size
        self.start_batch = 0
        self.keyed = keyed
        batches = (length // num_replicas) // local_batch_size
        self.num_samples = batches * local_batch_size
        self.total_size = self.num_samples * num_replicas

    def set_start(self, batch: int) -> None:
        """Skip the first ``batch`` local batches in the next iterator only (0..batches per epoch)."""
        batches = self.num_samples // self.local_batch_size
        if not 0 <= batch <= batches:
            raise ValueError(f"start batch {batch} is outside the epoch's 0..{batches} batches")
        self.start_batch = batch

    def __iter__(self) -> Iterator[tuple[int, int] | int]:
        order = epoch_order(self.length, self.seed, self.epoch) if self.shuffle else list(range(self.length))
        shard = order[self.rank:self.total_size:self.num_replicas]
        skip, self.start_batch = self.start_batch * self.local_batch_size, 0
        if not self.keyed:
            return iter(shard[skip:])
        epoch = self.epoch
        return iter([(epoch, i) for i in shard[skip:]])

    def __len__(self) -> int:
        return self.num_samples


def set_sampler_position(sampler: Sampler, engine: Engine) -> None:
    """Point ``sampler`` at the engine's epoch and, after a mid-epoch resume, at its next batch.

    Call it on the trainer's ``EPOCH_STARTED`` (before Ignite creates the epoch's iterator): it calls
    ``set_epoch(epoch - 1)`` and, for an `EpochSampler`, ``set_start(iteration % epoch_length)``, which is
    0 except in the first epoch of a run resumed from a checkpoint written after that many iterations
    (Ignite then counts the epoch from there, and the sampler yields exactly the remaining batches).

    Example::

        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: set_sampler_position(loader.sampler, e))
    """
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(engine.state.epoch - 1)
    length = engine.state.epoch_length
    if isinstance(sampler, EpochSampler) and length:
        sampler.set_start(engine.state.iteration % length)


def _sampler_for(dataset: Sized, batch_size: int, start_batch: int) -> EpochSampler:
    n = len(dataset)
    if n < batch_size:
        raise DataError(f"batch_size={batch_size} is larger than the training set ({n} recordings); lower --batch-size")
    world = idist.get_world_size()
    sampler = EpochSampler(n, batch_size // world, seed=getattr(dataset, "seed", 0), num_replicas=world,
                           rank=idist.get_rank(), keyed=getattr(dataset, "accepts_epoch_keys", False))
    sampler.set_start(start_batch)
    return sampler


def make_train_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, *,
                      start_batch: int = 0) -> DataLoader:
    """Shuffled batches of ``batch_size`` (global; ``batch_size / world`` per rank), last partial batch dropped.

    Dropping keeps every step the same size (and a batch of one would break BatchNorm); it is why the
    training set must hold at least one full batch. The loader's ``sampler`` is an `EpochSampler`: call
    its ``set_epoch`` every epoch and ``set_start(k)`` (or pass ``start_batch=k`` for the first epoch) to
    resume after batch ``k``. On CUDA, batches come in pinned memory so the copy to the device can overlap.
    A dataset with a ``collate_fn`` attribute (`bags.TrainBags`: padded bags) batches its items with it.

    Example::

        loader = make_train_loader(TrainWindows(train, cache, 4.0, seed=0), batch_size=32, num_workers=2,
                                   device=torch.device("cpu"))
        loader.sampler.set_epoch(0)
    """
    sampler = _sampler_for(dataset, batch_size, start_batch)  # type: ignore[arg-type]
    return DataLoader(
        dataset, batch_size=sampler.local_batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=num_workers > 0,
        generator=_own_generator(), collate_fn=getattr(dataset, "collate_fn", None),
    )


def _own_generator() -> torch.Generator:
    """A generator for the DataLoader's own draw (its workers' base seed) at every new iterator.

    Without it that draw comes from torch's global generator, once per epoch with ``num_workers=0`` but
    only once per run with persistent workers, so the model's dropout would see a different global
    stream depending on the worker count. Nothing of ours uses the workers' seeds.
    """
    return torch.Generator().manual_seed(0)


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
        pin_memory=torch.device(device).type == "cuda", persistent_workers=num_workers > 0,
        generator=_own_generator(), collate_fn=getattr(dataset, "collate_fn", None),
    )


class ResidentTrainLoader:
    """Training batches cut on the device from `ResidentFeatures`: no worker, no file, no host copy of x.

    The same batches as `make_train_loader` over the same dataset, bit for bit (the same `EpochSampler`
    order, the same crops, the same float32 values), for when the features fit on the training device.
    Labels, masks and indices are tiny and copied per batch. ``sampler`` works as the DataLoader's.

    Example::

        loader = ResidentTrainLoader(TrainWindows(train, cache, 4.0, seed=0), 32, torch.device("cuda"))
        trainer.run(loader, max_epochs=10)  # with attach_sampler_epoch(trainer, loader)
    """

    def __init__(self, dataset: TrainWindows, batch_size: int, device: torch.device, *, start_batch: int = 0,
                 resident: ResidentFeatures | None = None) -> None:
        self.dataset = dataset
        self.sampler = _sampler_for(dataset, batch_size, start_batch)
        self.device = torch.device(device)
        self.resident = resident if resident is not None else dataset.features_on(self.device)
        self._targets = dataset._targets.to(self.device)
        self._masks = dataset._masks.to(self.device)
        self._demographics = None if dataset.demographics is None else dataset.demographics.to(self.device)

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.local_batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        keys = list(self.sampler)
        size = self.sampler.local_batch_size
        for b in range(0, len(keys) - size + 1, size):
            batch = keys[b:b + size]
            index = torch.tensor([i for _, i in batch], dtype=torch.int64)
            starts = torch.tensor([self.dataset.crop_start(e, i) for e, i in batch], dtype=torch.int64)
            on_device = index.to(self.device, non_blocking=True)
            x = self.resident.windows(on_device, starts)
            batch = (x, self._targets[on_device], self._masks[on_device], index)
            yield batch if self._demographics is None else (*batch, self._demographics[on_device])


class ResidentEvalLoader:
    """Evaluation batches cut on the device from `ResidentFeatures`: the batches of `make_eval_loader`
    (same order, same sharding across processes, same float32 values) without reading any file.

    Example::

        loader = ResidentEvalLoader(EvalWindows(val, cache, 4.0), 64, torch.device("cuda"))
        evaluator.run(loader)
    """

    def __init__(self, dataset: EvalWindows, batch_size: int, device: torch.device,
                 resident: ResidentFeatures | None = None) -> None:
        world = idist.get_world_size()
        self.batch_size = max(1, batch_size // world)
        self.indices = torch.arange(idist.get_rank(), len(dataset), world)
        self.device = torch.device(device)
        self.resident = resident if resident is not None else dataset.features_on(self.device)
        self._recording = torch.tensor(dataset.window_recording, dtype=torch.int64)
        self._start = torch.tensor(dataset.window_start, dtype=torch.int64)
        self._targets = dataset._targets.to(self.device)
        self._masks = dataset._masks.to(self.device)
        self._demographics = None if dataset.demographics is None else dataset.demographics.to(self.device)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for index in self.indices.split(self.batch_size):
            recording = self._recording[index].to(self.device, non_blocking=True)
            x = self.resident.windows(recording, self._start[index])
            batch = (x, self._targets[recording], self._masks[recording], index)
            yield batch if self._demographics is None else (*batch, self._demographics[recording])
