"""Patient-level splits and the window datasets the engines iterate over.

Training sees one random crop of W seconds per recording per epoch (a fresh crop each epoch is cheap data
augmentation); evaluation sees every window of every recording and keeps which recording and patient each
window came from, so predictions can be averaged per recording and per patient.

Every random choice of the data path is a function of ``(seed, epoch, sample index)`` (`sample_seed`),
never of a process's generator: the crop a recording gets does not depend on which DataLoader worker or
which distributed rank reads it, nor on what was read before, so results are the same for any
``num_workers`` and process count, and a resumed run (even mid-epoch) sees exactly the crops the
uninterrupted one did. `sample_generator` gives later per-sample augmentation the same property.

Both datasets read features from `FeatureCache` files through memory maps, every file of the dataset
kept mapped once opened (an epoch then opens no file); maps are opened lazily in the process that reads
them: a dataset pickled to DataLoader workers carries only paths and frame counts.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ignite_trainer.data.demographics import encode_many
from ignite_trainer.data.features import FeatureCache, FeatureSettings
from ignite_trainer.data.records import Recording
from ignite_trainer.core.errors import DataError

#: ``(x [n_mels, W_frames], y [2], mask [2], index)``: what both datasets yield and the engines consume;
#: built with ``demographics=True`` a fifth tensor follows, the patient's `encode_demographics` values and
#: known-flags concatenated (``[2 * len(DEMOGRAPHIC_FEATURES)]``), for a fusion model.
Item = tuple[torch.Tensor, ...]

log = logging.getLogger("ignite_trainer")

#: Independent random streams per sample: adding an augmentation (its own stream) never changes the crops.
STREAM_CROP = 0
STREAM_AUGMENT = 1
STREAM_SHUFFLE = 2  # per epoch, not per sample: the order of the epoch (`ignite_trainer.data.loaders`)


def sample_seed(seed: int, epoch: int, index: int, stream: int = STREAM_CROP) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, index, stream)``.

    A hash (BLAKE2b of the four numbers), so neighbouring inputs give unrelated seeds and
    ``(seed=1, epoch=0)`` is not ``(seed=0, epoch=1)``; about a microsecond, cheap enough for every item
    of every epoch. ``epoch`` counts from 0.

    Example::

        sample_seed(0, 0, 5) == sample_seed(0, 0, 5) != sample_seed(0, 1, 5)
    """
    message = struct.pack("<QqqQ", int(seed) % 2**64, int(epoch), int(index), int(stream) % 2**64)
    return int.from_bytes(hashlib.blake2b(message, digest_size=8, person=b"ignite-trainer").digest(), "little") >> 1


def sample_generator(seed: int, epoch: int, index: int, stream: int = STREAM_AUGMENT,
                     device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh `torch.Generator` for one sample of one epoch, seeded by `sample_seed`.

    Per-sample augmentation draws from it, so that what a sample gets is the same in any worker, on any
    rank, and after a resume. ``stream`` keeps independent uses apart (crops use `STREAM_CROP`).

    Example::

        g = sample_generator(config.seed, engine.state.epoch - 1, int(index))
        gain = torch.empty(()).uniform_(0.8, 1.2, generator=g)
    """
    return torch.Generator(device=device).manual_seed(sample_seed(seed, epoch, index, stream))


def crop_start(seed: int, epoch: int, index: int, spare: int) -> int:
    """The first frame of the training crop of recording ``index`` in ``epoch``: uniform in ``0..spare``.

    Taken straight from `sample_seed` (its modulo bias, below 1e-13 for any recording length, is far
    beneath notice), which is several times cheaper than building a generator per item.
    """
    if spare <= 0:
        return 0
    return sample_seed(seed, epoch, index, STREAM_CROP) % (spare + 1)


def frames_per_window(settings: FeatureSettings, window_seconds: float) -> int:
    """Feature frames in a window of ``window_seconds`` (one frame per hop: 4 s at 10 ms -> 400)."""
    return max(1, int(round(window_seconds * settings.frames_per_second)))


# ---------------------------------------------------------------------------------------------- datasets
def _open_files_allowance(wanted: int) -> int:
    """How many feature files one process may keep mapped: all ``wanted``, raising the soft open-files
    limit towards the hard one if needed, else as many as leave half the soft limit for everything else.

    Each memory map holds a duplicated file descriptor until it is closed (CPython's mmap), so a dataset
    of ~1000 recordings in each of several processes needs as many descriptors.
    """
    spare_for_others = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + spare_for_others
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    allowed = max(16, soft // 2)
    log.warning("the open-files limit (%d) is too low to keep all %d feature files mapped; keeping %d "
                "(raise it with `ulimit -n %d`)", soft, wanted, allowed, need)
    return allowed


class _FeatureWindows(Dataset):
    """Shared machinery: feature file paths and lengths, memory maps kept open, labels as tensors."""

    def __init__(self, recordings: Sequence[Recording], cache: FeatureCache, window_seconds: float,
                 demographics: bool = False) -> None:
        self.recordings = list(recordings)
        self.cache = cache
        self.window_frames = frames_per_window(cache.settings, window_seconds)
        self.n_mels = cache.settings.n_mels
        self.feature_files: list[Path] = [cache.feature_path(r) for r in self.recordings]
        self.n_frames: list[int] = [int(np.load(p, mmap_mode="r").shape[1]) for p in self.feature_files]
        self._targets = torch.tensor([[float(v) if m else 0.0 for v, m in zip(r.labels, r.mask)]
                                      for r in self.recordings], dtype=torch.float32).reshape(-1, 2)
        self._masks = torch.tensor([[float(m) for m in r.mask] for r in self.recordings],
                                   dtype=torch.float32).reshape(-1, 2)
        self.demographics: torch.Tensor | None = None
        if demographics:
            values, known = encode_many([r.demographics for r in self.recordings])
            self.demographics = torch.cat([values, known], dim=1)  # [recordings, 2 * features]
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self.max_open_files: int | None = None  # decided in the process that opens them

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # never ship memory maps to another process
        state["max_open_files"] = None  # the receiving process checks its own limit
        return state

    def _window(self, recording: int, start: int) -> torch.Tensor:
        """Frames ``[start, start + W)`` of a recording as float32, zero-padded at the end where it is shorter."""
        features = self._features(recording)
        # Copied out of the map in the file's dtype; torch widens float16 several times faster than numpy.
        piece = torch.from_numpy(np.array(features[:, start:start + self.window_frames]))
        if piece.shape[1] == self.window_frames:
            return piece.float()
        x = torch.zeros(self.n_mels, self.window_frames, dtype=torch.float32)
        x[:, :piece.shape[1]] = piece
        return x

    def _features(self, recording: int) -> np.ndarray:
        features = self._open.get(recording)
        if features is not None:
            return features
        if self.max_open_files is None:
            self.max_open_files = _open_files_allowance(len(self.feature_files))
        features = self._map(recording)
        self._open[recording] = features
        if len(self._open) > self.max_open_files:
            self._open.popitem(last=False)  # only when the open-files limit is too low to keep them all
        return features

    def _map(self, recording: int) -> np.ndarray:
        """Map a feature file; one deleted behind our back (a cache cleaned during training) is rebuilt."""
        path = self.feature_files[recording]
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            pass
        rec = self.recordings[recording]
        try:
            path.unlink(missing_ok=True)  # damaged, if it is there at all
            path = self.cache.rebuild(rec)
            features = np.load(path, mmap_mode="r")
        except (OSError, ValueError, DataError) as e:
            raise DataError(f"{self.feature_files[recording]}: the cached features of {rec.wav_path} vanished "
                            f"during training and could not be rebuilt ({e})") from None
        if features.shape != (self.n_mels, self.n_frames[recording]):
            raise DataError(f"{rec.wav_path}: changed during training (its features now have shape "
                            f"{features.shape}, expected {(self.n_mels, self.n_frames[recording])})")
        self.feature_files[recording] = path
        return features

    def features_on(self, device: str | torch.device) -> "ResidentFeatures":
        """Every recording's features in one tensor on ``device`` (see `ResidentFeatures`)."""
        return ResidentFeatures(self, device)

    def _item(self, x: torch.Tensor, recording: int, index: int) -> Item:
        item = (x, self._targets[recording].clone(), self._masks[recording].clone(), torch.tensor(index, dtype=torch.int64))
        if self.demographics is not None:
            return (*item, self.demographics[recording].clone())
        return item


class TrainWindows(_FeatureWindows):
    """One random window of ``window_seconds`` per recording and epoch.

    The crop of recording ``i`` in epoch ``e`` is `crop_start` ``(seed, e, i)``: a function of those
    three numbers only, so any worker or rank reading it cuts the same window. Items are read by
    ``(epoch, index)`` keys, which `ignite_trainer.data.loaders.EpochSampler` yields, so the epoch
    travels with every request to worker processes (a dataset attribute set in the main process would
    not reach persistent workers, which hold their own copy); a plain ``dataset[i]`` uses ``self.epoch``.
    A recording shorter than the window is zero-padded at the end; the features are z-scored per band,
    so zero is the band's mean. ``index`` in each item is the recording's index.

    Example::

        dataset = TrainWindows(train, cache, window_seconds=4.0, seed=0)
        x, y, mask, index = dataset[(3, 0)]  # epoch 3 (from 0), recording 0: x is [n_mels, frames of 4 s]
    """

    #: Tells `ignite_trainer.data.loaders.EpochSampler` to send ``(epoch, index)`` keys.
    accepts_epoch_keys = True

    def __init__(self, recordings: Sequence[Recording], cache: FeatureCache, window_seconds: float,
                 seed: int = 0, demographics: bool = False) -> None:
        super().__init__(recordings, cache, window_seconds, demographics)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.recordings)

    def crop_start(self, epoch: int, index: int) -> int:
        """First frame of recording ``index``'s crop in ``epoch`` (0 for a recording no longer than a window)."""
        return crop_start(self.seed, epoch, index, self.n_frames[index] - self.window_frames)

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        return self._item(self._window(index, self.crop_start(epoch, index)), index, index)


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
                 hop_seconds: float | None = None, demographics: bool = False) -> None:
        super().__init__(recordings, cache, window_seconds, demographics)
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


# ---------------------------------------------------------------------------------------------- resident
class ResidentFeatures:
    """All of a dataset's features in one tensor on a device, and float32 windows cut from it there.

    With the features resident on the training device an epoch reads no file and copies nothing from the
    host: a batch is one gather. Each recording is stored zero-padded to at least one window, laid end to
    end in ``[n_mels, total frames]``; `windows` cuts exactly the windows `TrainWindows` / `EvalWindows`
    would (bit-identical: the same float32 values, the same zero padding). The tensor keeps the cache's
    dtype and windows are widened after the gather, so a float16 cache takes half the device memory:
    ``2 or 4 * n_mels * frames`` bytes (about 0.9 / 1.8 GB for a CirCor-size set at 64 mels, 10 ms);
    `fits` says whether a device has room.

    Example::

        resident = train_dataset.features_on("cuda")
        x = resident.windows(torch.tensor([0, 3]), torch.tensor([120, 0]))  # [2, n_mels, W] on cuda
    """

    def __init__(self, dataset: _FeatureWindows, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.window_frames = dataset.window_frames
        lengths = [max(n, dataset.window_frames) for n in dataset.n_frames]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        dtype = torch.float16 if dataset.cache.settings.feature_dtype == "float16" else torch.float32
        host = torch.zeros(dataset.n_mels, int(sum(lengths)), dtype=dtype)
        for rec, (offset, n) in enumerate(zip(offsets, dataset.n_frames)):
            host[:, offset:offset + n] = torch.from_numpy(np.array(dataset._features(rec)))
        self.features = host.to(self.device)
        self.offsets = torch.from_numpy(offsets).to(self.device)
        self._frame = torch.arange(self.window_frames, device=self.device)

    @staticmethod
    def nbytes(dataset: _FeatureWindows) -> int:
        """Bytes the resident copy of ``dataset`` takes."""
        width = 2 if dataset.cache.settings.feature_dtype == "float16" else 4
        return width * dataset.n_mels * sum(max(n, dataset.window_frames) for n in dataset.n_frames)

    @staticmethod
    def fits(dataset: _FeatureWindows, device: str | torch.device, headroom: float = 0.5) -> bool:
        """Whether the copy takes at most ``headroom`` of the device's free memory (always true on CPU)."""
        device = torch.device(device)
        if device.type != "cuda":
            return True
        free, _total = torch.cuda.mem_get_info(device)
        return ResidentFeatures.nbytes(dataset) <= headroom * free

    def windows(self, recordings: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """``[B, n_mels, W]``: window ``starts[b]`` of recording ``recordings[b]``, gathered on the device."""
        columns = (self.offsets[recordings.to(self.device)] + starts.to(self.device))[:, None] + self._frame
        return self.features[:, columns].permute(1, 0, 2).float().contiguous()
