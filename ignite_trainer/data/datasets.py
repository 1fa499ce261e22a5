"""Patient-level splits and the window datasets the engines iterate over.

Training sees one random crop of W seconds per recording per epoch (a fresh crop each epoch is cheap data
augmentation); evaluation sees every window of every recording and keeps which recording and patient each
window came from, so predictions can be averaged per recording and per patient.

Both datasets read features from `FeatureCache` files through memory maps that are opened lazily in the
process that reads them: a dataset pickled to DataLoader workers carries only paths and frame counts.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ignite_trainer.data.features import FeatureCache, FeatureSettings
from ignite_trainer.data.records import Recording
from ignite_trainer.errors import ConfigError, DataError

#: ``(x [n_mels, W_frames], y [2], mask [2], index)``: what both datasets yield and the engines consume.
Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def frames_per_window(settings: FeatureSettings, window_seconds: float) -> int:
    """Feature frames in a window of ``window_seconds`` (one frame per hop: 4 s at 10 ms -> 400)."""
    return max(1, int(round(window_seconds * settings.frames_per_second)))


# ---------------------------------------------------------------------------------------------- splitting
def patient_stratum(recordings: Sequence[Recording]) -> tuple[str, str]:
    """A patient's label combination, e.g. ``("1", "?")``: per label the maximum over its recordings where
    the label is present, or ``"?"`` when it is masked in all of them (so masked is a stratum of its own)."""
    stratum = []
    for i in range(2):
        known = [r.labels[i] for r in recordings if r.mask[i]]
        stratum.append(str(int(max(known) > 0.5)) if known else "?")
    return stratum[0], stratum[1]


def split_patients(
    recordings: Sequence[Recording], val_fraction: float, seed: int, n_folds: int = 0, fold: int = 0
) -> tuple[list[Recording], list[Recording]]:
    """``(train, validation)`` recordings, split by patient and stratified by the patient's label combination.

    With ``n_folds >= 2`` the patients are dealt into k folds and fold ``fold`` is validation; otherwise
    ``val_fraction`` of the patients are (at least one, from each stratum its rounded share). The result
    depends only on the recordings and ``seed``, not on their order; both sides keep the input order.

    Example::

        train, val = split_patients(recordings, val_fraction=0.2, seed=0)
        train, val = split_patients(recordings, 0.0, seed=0, n_folds=5, fold=2)  # fold 2 of 5 is validation
    """
    by_patient: dict[str, list[Recording]] = defaultdict(list)
    for r in recordings:
        by_patient[r.patient_id].append(r)
    n_patients = len(by_patient)
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for pid in sorted(by_patient):
        strata[patient_stratum(by_patient[pid])].append(pid)
    rng = random.Random(seed)
    ordered = [sorted(strata[s]) for s in sorted(strata)]
    for pids in ordered:
        rng.shuffle(pids)

    if n_folds >= 2:
        if not 0 <= fold < n_folds:
            raise ConfigError(f"fold={fold} must be in 0..{n_folds - 1} for n_folds={n_folds}")
        if n_patients < n_folds:
            raise DataError(f"n_folds={n_folds} needs at least {n_folds} patients, the data has {n_patients}")
        # Deal round-robin, continuing across strata, so every fold gets each stratum's share and folds
        # differ in size by at most one patient.
        val_patients = {pid for i, pid in enumerate(p for pids in ordered for p in pids) if i % n_folds == fold}
    else:
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction} leaves one side of the patient split empty")
        if n_patients < 2:
            raise DataError(f"cannot split {n_patients} patient(s) into training and validation; need at least 2")
        n_val = min(n_patients - 1, max(1, round(n_patients * val_fraction)))
        counts = _largest_remainder([len(p) for p in ordered], n_val)
        val_patients = {pid for pids, k in zip(ordered, counts) for pid in pids[:k]}

    train = [r for r in recordings if r.patient_id not in val_patients]
    val = [r for r in recordings if r.patient_id in val_patients]
    if not train or not val:
        side = "training" if not train else "validation"
        raise DataError(f"the patient split leaves the {side} set empty ({n_patients} patients)")
    return train, val


def _largest_remainder(sizes: list[int], total: int) -> list[int]:
    """Integer shares of ``total`` proportional to ``sizes`` that add up to exactly ``total``."""
    n = sum(sizes)
    exact = [s * total / n for s in sizes]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


# ---------------------------------------------------------------------------------------------- datasets
class _FeatureWindows(Dataset):
    """Shared machinery: feature file paths and lengths, lazily opened memory maps, labels as tensors."""

    #: Memory maps kept open per process; each holds a file descriptor, so the number is bounded.
    max_open_files = 64

    def __init__(self, recordings: Sequence[Recording], cache: FeatureCache, window_seconds: float) -> None:
        self.recordings = list(recordings)
        self.window_frames = frames_per_window(cache.settings, window_seconds)
        self.n_mels = cache.settings.n_mels
        self.feature_files: list[Path] = [cache.feature_path(r) for r in self.recordings]
        self.n_frames: list[int] = [int(np.load(p, mmap_mode="r").shape[1]) for p in self.feature_files]
        self._targets = torch.tensor([[float(v) if m else 0.0 for v, m in zip(r.labels, r.mask)]
                                      for r in self.recordings], dtype=torch.float32).reshape(-1, 2)
        self._masks = torch.tensor([[float(m) for m in r.mask] for r in self.recordings],
                                   dtype=torch.float32).reshape(-1, 2)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # never ship memory maps to another process
        return state

    def _window(self, recording: int, start: int) -> torch.Tensor:
        """Frames ``[start, start + W)`` of a recording, zero-padded at the end where it is shorter."""
        features = self._features(recording)
        piece = np.array(features[:, start:start + self.window_frames], dtype=np.float32)
        x = torch.zeros(self.n_mels, self.window_frames, dtype=torch.float32)
        x[:, :piece.shape[1]] = torch.from_numpy(piece)
        return x

    def _features(self, recording: int) -> np.ndarray:
        features = self._open.get(recording)
        if features is None:
            features = np.load(self.feature_files[recording], mmap_mode="r")
            self._open[recording] = features
            if len(self._open) > self.max_open_files:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(recording)
        return features

    def _item(self, x: torch.Tensor, recording: int, index: int) -> Item:
        return x, self._targets[recording].clone(), self._masks[recording].clone(), torch.tensor(index, dtype=torch.int64)


class TrainWindows(_FeatureWindows):
    """One random window of ``window_seconds`` per recording, drawn anew every time an item is read.

    The crop start comes from ``torch.randint`` (torch's global generator) so that seeding torch, and
    restoring a checkpoint's RNG state, reproduces the crops; DataLoader seeds each worker from it too.
    A recording shorter than the window is zero-padded at the end; the features are z-scored per band,
    so zero is the band's mean. ``index`` in each item is the recording's index.

    Example::

        dataset = TrainWindows(train, cache, window_seconds=4.0)
        x, y, mask, index = dataset[0]  # x: [n_mels, frames of 4 s]
    """

    def __len__(self) -> int:
        return len(self.recordings)

    def __getitem__(self, index: int) -> Item:
        spare = self.n_frames[index] - self.window_frames
        start = int(torch.randint(0, spare + 1, ()).item()) if spare > 0 else 0
        return self._item(self._window(index, start), index, index)


class EvalWindows(_FeatureWindows):
    """Every window of every recording, in order, ``hop_seconds`` apart (default: back to back).

    A leftover shorter than a window is covered by one more window aligned to the recording's end
    (overlapping the one before) rather than padded: every window then holds W seconds of real signal,
    as training crops do, and counts the same in a recording's mean. Only recordings shorter than one
    window are zero-padded. ``index`` in each item is the window's index; `window_recording` maps it to
    the recording, `recording_ids` / `patient_ids` to the ids.

    Example::

        dataset = EvalWindows(val, cache, window_seconds=4.0)
        x, y, mask, index = dataset[5]
        print(dataset.recordings[dataset.window_recording[index]].recording_id)
    """

    def __init__(self, recordings: Sequence[Recording], cache: FeatureCache, window_seconds: float,
                 hop_seconds: float | None = None) -> None:
        super().__init__(recordings, cache, window_seconds)
        hop = self.window_frames if hop_seconds is None else frames_per_window(cache.settings, hop_seconds)
        self.window_recording: list[int] = []
        self.window_start: list[int] = []
        for rec, n in enumerate(self.n_frames):
            starts = list(range(0, max(n - self.window_frames, 0) + 1, hop))
            if starts[-1] + self.window_frames < n:
                starts.append(n - self.window_frames)
            self.window_recording.extend([rec] * len(starts))
            self.window_start.extend(starts)

    def __len__(self) -> int:
        return len(self.window_recording)

    def __getitem__(self, index: int) -> Item:
        rec = self.window_recording[index]
        return self._item(self._window(rec, self.window_start[index]), rec, index)

    def recording_ids(self) -> list[str]:
        """The recording id of every window (index it with an item's ``index``)."""
        return [self.recordings[r].recording_id for r in self.window_recording]

    def patient_ids(self) -> list[str]:
        """The patient id of every window (index it with an item's ``index``)."""
        return [self.recordings[r].patient_id for r in self.window_recording]
