"""Training order and crops as functions of (seed, epoch, index): the same batches for any worker count and
process count, a different epoch gets different ones, and an epoch can start at batch k (mid-epoch resume)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from ignite_trainer.data.datasets import EvalWindows, TrainWindows, sample_generator, sample_seed
from ignite_trainer.data.features import FeatureCache, FeatureSettings
from ignite_trainer.data.loaders import (
    EpochSampler,
    ResidentEvalLoader,
    ResidentTrainLoader,
    epoch_order,
    make_eval_loader,
    make_train_loader,
)
from ignite_trainer.data.records import Recording

SETTINGS = FeatureSettings(n_mels=8, sample_rate=1000, hop_ms=20.0, n_fft=64)
W = 1.0  # 50 frames


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> TrainWindows:
    """14 noise recordings of 0.6-3 s (some shorter than a window), labels alternating."""
    root = tmp_path_factory.mktemp("loaders")
    rng = np.random.default_rng(1)
    recs = []
    for i in range(14):
        path = root / f"r{i}.wav"
        wavfile.write(path, 2000, (rng.standard_normal(int(2000 * (0.6 + 0.2 * i))) * 3000).astype(np.int16))
        os.utime(path, (time.time() - 60,) * 2)
        recs.append(Recording(f"rec{i}", f"pat{i}", path, (float(i % 2), float(i % 3 == 0)), (True, i % 4 != 0)))
    cache = FeatureCache(root / "cache", SETTINGS)
    assert cache.prepare(recs) == recs
    return TrainWindows(recs, cache, W, seed=11)


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.sampler.set_epoch(epoch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b))


def test_seeds_depend_on_every_input_and_nothing_else() -> None:
    assert sample_seed(0, 0, 5) == sample_seed(0, 0, 5)
    seeds = {sample_seed(0, 0, 5), sample_seed(0, 1, 5), sample_seed(1, 0, 5), sample_seed(0, 0, 6),
             sample_seed(0, 0, 5, stream=1), sample_seed(1, 0, 0), sample_seed(0, 1, 0)}
    assert len(seeds) == 7 and all(0 <= s < 2**63 for s in seeds)
    a = torch.rand(3, generator=sample_generator(3, 2, 1))
    torch.manual_seed(99)
    assert torch.equal(a, torch.rand(3, generator=sample_generator(3, 2, 1)))
    assert epoch_order(20, 0, 1) == epoch_order(20, 0, 1) != epoch_order(20, 0, 2)
    assert sorted(epoch_order(20, 0, 1)) == list(range(20))


def test_workers_0_and_2_give_identical_batches_in_every_epoch(dataset) -> None:
    plain = make_train_loader(dataset, 4, 0, torch.device("cpu"))
    workers = make_train_loader(dataset, 4, 2, torch.device("cpu"))  # persistent workers: the epoch must still reach them
    for epoch in range(2):
        a, b = epoch_batches(plain, epoch), epoch_batches(workers, epoch)
        assert len(a) == 14 // 4
        assert_same(a, b)


def test_different_epochs_get_different_orders_and_crops(dataset) -> None:
    loader = make_train_loader(dataset, 14, 0, torch.device("cpu"))
    (x0, _, _, i0), = epoch_batches(loader, 0)
    (x1, _, _, i1), = epoch_batches(loader, 1)
    assert i0.tolist() != i1.tolist() and sorted(i0.tolist()) == sorted(i1.tolist()) == list(range(14))
    by_index_0 = x0[torch.argsort(i0)]
    by_index_1 = x1[torch.argsort(i1)]
    long_ones = [i for i in range(14) if dataset.n_frames[i] > dataset.window_frames + 5]
    changed = [i for i in long_ones if not torch.equal(by_index_0[i], by_index_1[i])]
    assert len(changed) >= len(long_ones) - 1  # a new crop almost every time (spare >= 5 frames each)


def test_two_process_shards_make_up_the_one_process_batches_with_the_same_crops(dataset) -> None:
    one = EpochSampler(len(dataset), 6, seed=dataset.seed)
    ranks = [EpochSampler(len(dataset), 3, seed=dataset.seed, num_replicas=2, rank=r) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(3)
    keys_one, keys_ranks = list(one), [list(s) for s in ranks]
    assert len(keys_one) == 12 and [len(k) for k in keys_ranks] == [6, 6]  # 14 // 6 = 2 steps either way
    for j in range(2):
        global_batch = keys_one[6 * j:6 * (j + 1)]
        shards = keys_ranks[0][3 * j:3 * (j + 1)] + keys_ranks[1][3 * j:3 * (j + 1)]
        assert sorted(global_batch) == sorted(shards)
    crops_one = {k: dataset[k][0] for k in keys_one}
    for k in keys_ranks[0] + keys_ranks[1]:
        assert torch.equal(dataset[k][0], crops_one[k])


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_started_at_batch_k_continues_exactly_the_uninterrupted_epoch(dataset, workers) -> None:
    loader = make_train_loader(dataset, 3, workers, torch.device("cpu"))
    full = epoch_batches(loader, 2)
    assert len(full) == 4
    loader.sampler.set_start(2)
    assert_same(epoch_batches(loader, 2), full[2:])
    assert_same(epoch_batches(loader, 2), full)  # applies to one iterator only
    assert len(loader) == 4  # Ignite's epoch_length stays the whole epoch's
    resumed = make_train_loader(dataset, 3, workers, torch.device("cpu"), start_batch=3)
    assert_same(epoch_batches(resumed, 2), full[3:])
    with pytest.raises(ValueError, match="start batch 5"):
        loader.sampler.set_start(5)


def test_resident_loader_gives_the_same_batches_bit_for_bit(dataset) -> None:
    mapped = make_train_loader(dataset, 4, 0, torch.device("cpu"))
    resident = ResidentTrainLoader(dataset, 4, torch.device("cpu"))
    assert len(resident) == len(mapped)
    for epoch in (0, 1):
        assert_same(epoch_batches(resident, epoch), epoch_batches(mapped, epoch))
    resident.sampler.set_start(1)
    assert_same(epoch_batches(resident, 1), epoch_batches(mapped, 1)[1:])
    evaluation = EvalWindows(dataset.recordings, dataset.cache, W)
    assert_same(list(ResidentEvalLoader(evaluation, 5, torch.device("cpu"))),
                list(make_eval_loader(evaluation, 5, 0, torch.device("cpu"))))


def test_every_feature_file_stays_mapped_after_an_epoch(dataset) -> None:
    import pickle

    clone = pickle.loads(pickle.dumps(dataset))
    for i in range(len(clone)):
        clone[(0, i)]
    assert len(clone._open) == len(clone) and clone.max_open_files >= len(clone)


@pytest.mark.parametrize("workers, accumulation, stop_at", [(0, 1, 6), (2, 1, 6), (0, 3, 7), (2, 3, 7)])
def test_a_run_resumed_mid_epoch_equals_the_uninterrupted_run(dataset, workers, accumulation, stop_at) -> None:
    """Ignite resumes mid-epoch by counting the epoch from ``iteration % epoch_length`` with a new iterator;
    `set_sampler_position` on EPOCH_STARTED makes that iterator start at the right batch."""
    import copy

    from ignite.engine import Events

    from ignite_trainer.data.loaders import set_sampler_position
    from ignite_trainer.training.engine import closes_window, create_trainer

    from conftest import TinyModel

    def build(seed: int):
        torch.manual_seed(seed)
        model = TinyModel(n_mels=8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        loader = make_train_loader(dataset, 3, workers, torch.device("cpu"))
        trainer = create_trainer(model, optimizer, torch.nn.functional.binary_cross_entropy_with_logits,
                                 accumulation_steps=accumulation)
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: set_sampler_position(loader.sampler, e))
        seen = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.batch[3].tolist()))
        return model, optimizer, loader, trainer, seen

    model, _, loader, trainer, seen_whole = build(0)
    trainer.run(loader, max_epochs=3)

    first, opt, loader1, trainer1, seen_first = build(0)
    stops = []

    def stop(e) -> None:  # epoch 2, after batch 2 (or 3: the end of a window of 3) of 4
        stops.append(closes_window(e, accumulation))
        e.terminate()

    trainer1.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), stop)
    trainer1.run(loader1, max_epochs=3)
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict(), "trainer": trainer1.state_dict()})

    resumed, opt2, loader2, trainer2, seen_rest = build(1)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    trainer2.load_state_dict(saved["trainer"])
    trainer2.run(loader2, max_epochs=3)
    assert stops == [True]
    assert seen_first + seen_rest == seen_whole
    for (name, a), b in zip(resumed.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_dataset_without_epoch_keys_gets_plain_indices_in_the_same_order() -> None:
    plain = torch.utils.data.TensorDataset(torch.arange(10))
    loader = make_train_loader(plain, 4, 0, torch.device("cpu"))
    loader.sampler.set_epoch(1)
    seen = [int(i) for (batch,) in loader for i in batch]
    assert seen == epoch_order(10, 0, 1)[:8]


def test_a_float16_cache_stays_float16_when_resident_and_gives_the_mapped_batches(dataset, tmp_path) -> None:
    half = FeatureCache(dataset.cache.root, FeatureSettings(**{**SETTINGS.__dict__, "feature_dtype": "float16"}))
    assert half.prepare(dataset.recordings) == dataset.recordings
    half_set = TrainWindows(dataset.recordings, half, W, seed=dataset.seed)
    resident = ResidentTrainLoader(half_set, 4, torch.device("cpu"))
    assert resident.resident.features.dtype == torch.float16
    mapped = epoch_batches(make_train_loader(half_set, 4, 0, torch.device("cpu")), 1)
    assert_same(epoch_batches(resident, 1), mapped)
    assert mapped[0][0].dtype == torch.float32


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_leave_torch_s_global_generator_alone(dataset, workers) -> None:
    """Dropout draws from the global generator: a loader drawing from it too would make the model's
    randomness depend on the worker count (per-epoch iterators with 0 workers, one with persistent ones)."""
    loader = make_train_loader(dataset, 4, workers, torch.device("cpu"))
    evaluation = make_eval_loader(EvalWindows(dataset.recordings, dataset.cache, W), 4, workers, torch.device("cpu"))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    for epoch in range(2):
        epoch_batches(loader, epoch)
        list(evaluation)
    assert torch.equal(torch.rand(3), expected)
