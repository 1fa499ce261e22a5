"""Patient-level splits and the training / evaluation window datasets."""

from __future__ import annotations

import os
import pickle
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile
from torch.utils.data import DataLoader

from ignite_trainer.data.datasets import EvalWindows, TrainWindows, frames_per_window
from ignite_trainer.data.splits import assign_folds, patient_stratum, split_patients
from ignite_trainer.data.features import FeatureCache, FeatureSettings
from ignite_trainer.data.records import Recording
from ignite_trainer.core.errors import DataError

SETTINGS = FeatureSettings()
W = 4.0
W_FRAMES = 400


# ---------------------------------------------------------------------------------------------- split fixtures
def make_patients(n: int, seed: int = 0) -> list[Recording]:
    """``n`` patients with 1-4 recordings each; heart 0/1, murmur 0/1 or masked (like CirCor's Unknown)."""
    rng = random.Random(seed)
    recs = []
    for p in range(n):
        heart = float(rng.random() < 0.45)
        murmur_state = rng.choices(["present", "absent", "unknown"], weights=[19, 74, 7])[0]
        for k in range(rng.randint(1, 4)):
            murmur = 1.0 if murmur_state == "present" and k % 2 == 0 else 0.0
            recs.append(Recording(recording_id=f"{p}_{k}", patient_id=f"{p:04d}", wav_path=Path(f"/nowhere/{p}_{k}.wav"),
                                  labels=(heart, murmur), mask=(True, murmur_state != "unknown")))
    return recs


def patients_of(recs: list[Recording]) -> set[str]:
    return {r.patient_id for r in recs}


def strata_counts(recs: list[Recording]) -> Counter:
    by_patient: dict[str, list[Recording]] = {}
    for r in recs:
        by_patient.setdefault(r.patient_id, []).append(r)
    return Counter(patient_stratum(v) for v in by_patient.values())


# ---------------------------------------------------------------------------------------------- splits
def test_patient_stratum_uses_any_positive_and_marks_masked() -> None:
    assert patient_stratum([Recording("a", "p", Path("a"), (1.0, 0.0), (True, True)),
                            Recording("b", "p", Path("b"), (1.0, 1.0), (True, True))]) == ("1", "1")
    assert patient_stratum([Recording("a", "p", Path("a"), (0.0, 0.0), (True, False))]) == ("0", "?")
    # a label masked in one recording but known in another is known for the patient
    assert patient_stratum([Recording("a", "p", Path("a"), (0.0, 1.0), (True, False)),
                            Recording("b", "p", Path("b"), (0.0, 0.0), (True, True))]) == ("0", "0")


def test_split_keeps_patients_on_one_side_and_covers_everything() -> None:
    recs = make_patients(200)
    train, val = split_patients(recs, val_fraction=0.2, seed=1)
    assert not patients_of(train) & patients_of(val)
    assert sorted(map(id, train + val)) == sorted(map(id, recs))
    assert len(patients_of(val)) == 40
    # input order is kept on each side
    assert train == [r for r in recs if r.patient_id in patients_of(train)]


def test_split_is_stratified_by_label_combination() -> None:
    recs = make_patients(300)
    _, val = split_patients(recs, val_fraction=0.2, seed=3)
    everyone, in_val = strata_counts(recs), strata_counts(val)
    assert len(everyone) == 6  # (0|1) x (0|1|?)
    for stratum, n in everyone.items():
        assert abs(in_val[stratum] - 0.2 * n) < 1.0, stratum  # each stratum's rounded share, not a random draw


def test_split_depends_only_on_seed() -> None:
    recs = make_patients(120)
    shuffled = recs[:]
    random.Random(9).shuffle(shuffled)
    a = patients_of(split_patients(recs, 0.25, seed=5)[1])
    assert a == patients_of(split_patients(shuffled, 0.25, seed=5)[1])
    assert a != patients_of(split_patients(recs, 0.25, seed=6)[1])


def test_k_fold_folds_are_disjoint_cover_all_patients_and_are_stratified() -> None:
    recs = make_patients(203)  # enough that every stratum fills the 5 folds (the one fold rule refuses less)
    folds = [patients_of(split_patients(recs, 0.2, seed=2, n_folds=5, fold=k)[1]) for k in range(5)]
    assert folds == [set(f) for f in assign_folds(recs, 5, 2)]  # the same dealing as cross-validation's
    assert set().union(*folds) == patients_of(recs)
    assert sum(len(f) for f in folds) == 203
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for k in range(5):
        train, val = split_patients(recs, 0.2, seed=2, n_folds=5, fold=k)
        assert patients_of(train) == patients_of(recs) - folds[k]
    everyone = strata_counts(recs)
    for k in range(5):
        in_fold = strata_counts([r for r in recs if r.patient_id in folds[k]])
        for stratum, n in everyone.items():
            assert abs(in_fold[stratum] - n / 5) <= 1.0, (k, stratum)


def test_split_refuses_an_empty_side() -> None:
    one_patient = [r for r in make_patients(5) if r.patient_id == "0000"]
    with pytest.raises(DataError, match="at least 2"):
        split_patients(one_patient, 0.2, seed=0)
    with pytest.raises(DataError, match="n_folds=5 needs at least 5 patients"):
        split_patients(make_patients(3), 0.2, seed=0, n_folds=5)
    with pytest.raises(DataError, match="val_fraction"):
        split_patients(make_patients(10), 0.0, seed=0)
    train, val = split_patients(make_patients(2), 0.2, seed=0)  # rounds to 0, but one patient is kept out
    assert len(patients_of(val)) == 1 and len(patients_of(train)) == 1


# ---------------------------------------------------------------------------------------------- window fixtures
@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Recording], FeatureCache]:
    """Recordings of 10 s, 4 s exactly, 2 s and 7.3 s; the last one has its murmur masked."""
    root = tmp_path_factory.mktemp("windows")
    rng = np.random.default_rng(0)
    recs = []
    for i, (seconds, labels, mask) in enumerate([(10.0, (1.0, 0.0), (True, True)), (4.0, (0.0, 1.0), (True, True)),
                                                  (2.0, (1.0, 1.0), (True, True)), (7.3, (0.0, 1.0), (True, False))]):
        path = root / f"r{i}.wav"
        wavfile.write(path, 4000, (rng.standard_normal(int(4000 * seconds)) * 4000).astype(np.int16))
        os.utime(path, (time.time() - 60,) * 2)
        recs.append(Recording(f"rec{i}", f"pat{i // 2}", path, labels, mask))
    cache = FeatureCache(root / "cache", SETTINGS)
    assert cache.prepare(recs) == recs
    return recs, cache


def find_start(full: np.ndarray, x: torch.Tensor) -> int:
    """Where the window ``x`` was cut from ``full`` (features are noise, so the match is unique)."""
    n = min(x.shape[1], full.shape[1])
    for s in range(full.shape[1] - n + 1):
        if np.array_equal(full[:, s:s + n], x[:, :n].numpy()):
            return s
    raise AssertionError("window not found in the recording's features")


# ---------------------------------------------------------------------------------------------- windows
def test_frames_per_window() -> None:
    assert frames_per_window(SETTINGS, 4.0) == W_FRAMES
    assert frames_per_window(FeatureSettings(hop_ms=20), 3.0) == 150


def test_train_items_and_crops_vary_across_epochs(prepared) -> None:
    recs, cache = prepared
    ds = TrainWindows(recs, cache, W)
    assert len(ds) == 4 and ds.n_frames == [1000, 400, 200, 730]
    x, y, mask, index = ds[3]
    assert x.dtype == torch.float32 and tuple(x.shape) == (64, W_FRAMES)
    assert y.tolist() == [0.0, 0.0] and mask.tolist() == [1.0, 0.0]  # a masked label carries 0, never garbage
    assert index.dtype == torch.int64 and index.item() == 3
    full = np.asarray(cache.get(recs[0]))
    starts = {find_start(full, ds[(epoch, 0)][0]) for epoch in range(8)}
    assert len(starts) > 3 and all(0 <= s <= 600 for s in starts)


def test_train_crops_are_a_function_of_seed_epoch_and_index_only(prepared) -> None:
    recs, cache = prepared
    ds = TrainWindows(recs, cache, W, seed=5)
    first = [ds[(2, i)][0] for i in range(4)]
    torch.manual_seed(1)  # the global generators must not matter
    np.random.seed(0)
    again = [ds[(2, i)][0] for i in reversed(range(4))][::-1]  # nor the order of the reads
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_seed = TrainWindows(recs, cache, W, seed=6)
    assert [other_seed.crop_start(2, 0) for _ in range(3)] == [other_seed.crop_start(2, 0)] * 3
    assert {TrainWindows(recs, cache, W, seed=s).crop_start(2, 0) for s in range(8)} != {ds.crop_start(2, 0)}
    ds.epoch = 2
    assert torch.equal(ds[0][0], first[0])  # a plain index reads the dataset's own epoch


def test_short_recording_is_zero_padded_at_the_end(prepared) -> None:
    recs, cache = prepared
    x = TrainWindows(recs, cache, W)[2][0]
    full = np.asarray(cache.get(recs[2]))
    assert full.shape[1] == 200
    np.testing.assert_array_equal(x[:, :200].numpy(), full)
    assert torch.count_nonzero(x[:, 200:]) == 0
    exact = TrainWindows(recs, cache, W)[1][0]  # exactly one window long: the whole recording, no padding
    np.testing.assert_array_equal(exact.numpy(), np.asarray(cache.get(recs[1])))


def test_eval_windows_cover_each_recording_and_map_back(prepared) -> None:
    recs, cache = prepared
    ds = EvalWindows(recs, cache, W)
    # 1000 frames -> 0, 400 and one aligned to the end; 400 -> one; 200 -> one padded; 730 -> 0 and 330.
    assert ds.window_recording == [0, 0, 0, 1, 2, 3, 3]
    assert ds.window_start == [0, 400, 600, 0, 0, 0, 330]
    assert ds.recording_ids() == ["rec0", "rec0", "rec0", "rec1", "rec2", "rec3", "rec3"]
    assert ds.patient_ids() == ["pat0", "pat0", "pat0", "pat0", "pat1", "pat1", "pat1"]
    covered = [np.zeros(n, dtype=bool) for n in ds.n_frames]
    for i in range(len(ds)):
        x, y, mask, index = ds[i]
        rec = ds.window_recording[i]
        assert index.item() == i and tuple(x.shape) == (64, W_FRAMES)
        assert y.tolist() == [v if m else 0.0 for v, m in zip(recs[rec].labels, recs[rec].mask)]
        full = np.asarray(cache.get(recs[rec]))
        start = ds.window_start[i]
        piece = full[:, start:start + W_FRAMES]
        np.testing.assert_array_equal(x[:, :piece.shape[1]].numpy(), piece)
        covered[rec][start:start + W_FRAMES] = True
    assert all(c.all() for c in covered)


def test_eval_windows_with_overlap(prepared) -> None:
    recs, cache = prepared
    ds = EvalWindows(recs[:1], cache, W, hop_seconds=2.0)
    assert ds.window_start == [0, 200, 400, 600]


def test_pickled_dataset_carries_no_memory_maps(prepared) -> None:
    recs, cache = prepared
    ds = EvalWindows(recs, cache, W)
    for i in range(len(ds)):
        ds[i]
    assert ds._open  # opened in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._open
    assert len(pickle.dumps(ds)) < 10_000
    assert torch.equal(clone[2][0], ds[2][0])


def test_datasets_work_in_a_dataloader_with_workers(prepared) -> None:
    recs, cache = prepared
    eval_ds = EvalWindows(recs, cache, W)
    loader = DataLoader(eval_ds, batch_size=3, num_workers=2)
    xs, indices = [], []
    for x, y, mask, index in loader:
        assert x.shape[1:] == (64, W_FRAMES) and y.shape[1:] == (2,) and mask.shape[1:] == (2,)
        xs.append(x)
        indices.append(index)
    assert torch.cat(indices).tolist() == list(range(len(eval_ds)))
    expected = torch.stack([eval_ds[i][0] for i in range(len(eval_ds))])
    assert torch.equal(torch.cat(xs), expected)

    train_ds = TrainWindows(recs * 4, cache, W, seed=7)
    keys = [(1, i) for i in range(len(train_ds))]

    def crops(workers: int) -> torch.Tensor:
        return torch.cat([x for x, *_ in DataLoader(train_ds, batch_size=4, sampler=keys, num_workers=workers)])

    assert torch.equal(crops(0), crops(2))  # crops do not depend on which process reads them
