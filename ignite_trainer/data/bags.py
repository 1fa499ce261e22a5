"""Patients as bags of windows, for a patient model (`model.mil.PatientMIL`, ``patient_model: true``).

A window model's item is one window of one recording; a patient model's item is one *patient*, a bag of
windows from all of its recordings, with the patient's own labels (`splits.patient_labels`, the one owner:
an Unknown murmur stays masked under the ``mask`` policy exactly as for a window model's patients).

- `TrainBags`: one random crop per recording of the patient and epoch. The crop of recording ``r`` in epoch
  ``e`` is the same `datasets.crop_start` ``(seed, e, r)`` a window model's `TrainWindows` cuts (``r`` the
  recording's index in the training set), a function of those numbers only: independent of DataLoader
  workers, process count and resume, like every draw of the data path.
- `EvalBags`: every window `EvalWindows` cuts, of every recording of the patient.

Items are ``(x [N, n_mels, W], y [2], mask [2], index)``, ``N`` the patient's instances and ``index`` the
patient's; `collate_bags` pads a batch to its largest bag and adds ``{"instance_mask": [B, N]}`` (True on a
real instance) as the batch's fifth element, which the engines hand to the model as keyword arguments
(`training.engine.run_model`). The loaders take `collate_fn` from the dataset.

`EvalBags` is a patient-level validation set for the code that reads a validation set's predictions
(threshold tuning, the decision layer, per-epoch scores): its ``recordings`` are one record per patient
(`patient_record`: the patient's id and labels) and its ``window_recording`` maps item ``i`` to record
``i``, so aggregating its predictions "to recordings" and then "to patients" leaves the patient
probabilities exactly as the model gave them: thresholds and the decision layer are fitted on patients.
The patients' real recordings are ``windows.recordings``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ignite_trainer.data.datasets import EvalWindows, Item, TrainWindows
from ignite_trainer.data.features import FeatureCache
from ignite_trainer.data.loaders import make_eval_loader, make_train_loader
from ignite_trainer.data.records import Recording
from ignite_trainer.data.splits import patient_labels

__all__ = [
    "INSTANCE_MASK",
    "EvalBags",
    "TrainBags",
    "bag_loaders",
    "collate_bags",
    "patient_groups",
    "patient_record",
    "training_items",
]

log = logging.getLogger("ignite_trainer")

#: The keyword under which a bag batch hands its instance mask to the model.
INSTANCE_MASK = "instance_mask"


def patient_groups(recordings: Sequence[Recording]) -> list[list[int]]:
    """Indices of ``recordings`` grouped by patient, patients in order of first appearance.

    Example:

        >>> from pathlib import Path
        >>> r = lambda rid, pid: Recording(rid, pid, Path("x.wav"), (0.0, 0.0), (True, True))
        >>> patient_groups([r("a1", "a"), r("b1", "b"), r("a2", "a")])
        [[0, 2], [1]]
    """
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(recordings):
        groups.setdefault(r.patient_id, []).append(i)
    return list(groups.values())


def patient_record(recordings: Sequence[Recording]) -> Recording:
    """One `Recording` standing for a whole patient: its id as recording and patient id, its labels, mask and
    murmur class from `patient_labels`, so that `patient_labels` of this one record gives them back unchanged."""
    labels, mask, murmur_class = patient_labels(recordings)
    first = recordings[0]
    return Recording(recording_id=first.patient_id, patient_id=first.patient_id, wav_path=first.wav_path,
                     labels=labels, mask=mask, murmur_class=murmur_class, demographics=first.demographics)


def training_items(config: Any, recordings: Sequence[Recording]) -> tuple[int, str]:
    """What one training item is and how many there are: patients for a patient model, else recordings."""
    if getattr(config, "patient_model", False):
        return len(patient_groups(recordings)), "patients"
    return len(recordings), "recordings"


class _Bags(Dataset):
    """Shared: patient groups, one record per patient, labels as tensors, the padding collate."""

    def _set_patients(self, recordings: Sequence[Recording]) -> None:
        self.groups = patient_groups(recordings)
        self.recordings = [patient_record([recordings[i] for i in g]) for g in self.groups]
        self.window_recording = list(range(len(self.recordings)))
        self._targets = torch.tensor([[v if m else 0.0 for v, m in zip(r.labels, r.mask)] for r in self.recordings],
                                     dtype=torch.float32).reshape(-1, 2)
        self._masks = torch.tensor([[float(m) for m in r.mask] for r in self.recordings],
                                   dtype=torch.float32).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.groups)

    def _item(self, x: torch.Tensor, patient: int) -> Item:
        return x, self._targets[patient].clone(), self._masks[patient].clone(), torch.tensor(patient, dtype=torch.int64)

    @staticmethod
    def collate_fn(items: Sequence[Item]) -> tuple[Any, ...]:
        return collate_bags(items)


def collate_bags(items: Sequence[Item]) -> tuple[Any, ...]:
    """``(x [B, N, n_mels, W], y [B, 2], mask [B, 2], index [B], {"instance_mask": [B, N]})``, ``N`` the
    largest bag; a smaller bag's extra slots are zeros and False in the mask."""
    slots = max(int(item[0].shape[0]) for item in items)
    first = items[0][0]
    x = first.new_zeros((len(items), slots) + tuple(first.shape[1:]))
    instance_mask = torch.zeros(len(items), slots, dtype=torch.bool)
    for b, item in enumerate(items):
        n = int(item[0].shape[0])
        x[b, :n] = item[0]
        instance_mask[b, :n] = True
    return (x, torch.stack([item[1] for item in items]), torch.stack([item[2] for item in items]),
            torch.stack([item[3] for item in items]), {INSTANCE_MASK: instance_mask})


class TrainBags(_Bags):
    """Per patient and epoch, one random crop of every recording (`TrainWindows`' crops).

    Read by ``(epoch, patient)`` keys from `loaders.EpochSampler` (``accepts_epoch_keys``), so the epoch
    reaches every worker with the request; ``index`` in each item is the patient's.

    Example::

        bags = TrainBags(train, cache, window_seconds=4.0, seed=0)
        x, y, mask, index = bags[(3, 0)]      # epoch 3, patient 0: x is [its recordings, n_mels, frames]
    """

    accepts_epoch_keys = True

    def __init__(self, recordings: Sequence[Recording], cache: FeatureCache, window_seconds: float,
                 seed: int = 0) -> None:
        self.windows = TrainWindows(recordings, cache, window_seconds, seed=seed)
        self.seed = int(seed)
        self.epoch = 0
        self._set_patients(self.windows.recordings)

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        epoch, patient = key if isinstance(key, tuple) else (self.epoch, key)
        w = self.windows
        x = torch.stack([w._window(r, w.crop_start(epoch, r)) for r in self.groups[patient]])
        return self._item(x, patient)


class EvalBags(_Bags):
    """Per patient, every window of every recording as `EvalWindows` cuts them (``windows``).

    ``instances[p]`` lists patient ``p``'s window indices into ``windows`` (recording by recording, in
    order); ``recordings`` / ``window_recording`` present the patients as the items (see the module).

    Example::

        bags = EvalBags(EvalWindows(val, cache, 4.0))
        x, y, mask, index = bags[0]           # x is [every window of patient 0, n_mels, frames]
    """

    def __init__(self, windows: EvalWindows) -> None:
        self.windows = windows
        self._set_patients(windows.recordings)
        by_recording: list[list[int]] = [[] for _ in windows.recordings]
        for i, r in enumerate(windows.window_recording):
            by_recording[r].append(i)
        self.instances = [[i for r in g for i in by_recording[r]] for g in self.groups]

    @classmethod
    def build(cls, recordings: Sequence[Recording], cache: FeatureCache, window_seconds: float,
              hop_seconds: float | None = None) -> EvalBags:
        """The bags of ``recordings``' windows (`EvalWindows` with these arguments)."""
        return cls(EvalWindows(recordings, cache, window_seconds, hop_seconds))

    def __getitem__(self, patient: int) -> Item:
        w = self.windows
        x = torch.stack([w._window(w.window_recording[i], w.window_start[i]) for i in self.instances[patient]])
        return self._item(x, patient)


def bag_loaders(config: Any, data: Any, device: torch.device) -> tuple[Any, EvalBags, Any]:
    """``(train loader, validation bags, validation loader)`` of a patient model's run: `loaders`' samplers
    (order, sharding and mid-epoch resume as for windows) over patients; ``batch_size`` and
    ``eval_batch_size`` count patients. Features are read from the cache (``resident_features`` cuts windows
    of single recordings and is not used here; the batches are the same either way)."""
    cache = data.feature_cache()
    train = TrainBags(data.train, cache, config.window_seconds, seed=config.seed)
    val = EvalBags.build(data.val, cache, config.window_seconds)
    if config.resident_features:
        log.info("resident_features: a patient model reads its bags from the feature cache")
    eval_batch_size = config.eval_batch_size or config.batch_size
    return (make_train_loader(train, config.batch_size, config.num_workers, device), val,
            make_eval_loader(val, eval_batch_size, config.num_workers, device))
