"""The targets of the auxiliary heads for the samples of a window dataset, looked up by sample index.

A batch carries ``(x, y, mask, index)``; the heads' targets are not in it but are found from ``index`` (and,
for a training crop, the epoch) on the device the model runs on: a recording's murmur descriptors (one class
per head, `annotations.attribute_targets`) and the heart-cycle state of every frame of its window
(`annotations.frame_states`, cut at the same start frame `TrainWindows` / `EvalWindows` cut). Looking them up
keeps the batch layout, the loaders and the resident-feature path unchanged, and a crop's states come from
the same ``(seed, epoch, index)`` rule as its features, so they agree in any worker and after a resume.

Example::

    targets = HeadTargets(train_dataset, ("systolic_timing", "segmentation")).to(device)
    found = targets.lookup(index, epoch=0)   # {"attributes": [B, 1] int64, "states": [B, W] int64}
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ignite_trainer.core.vocabulary import SEGMENTATION
from ignite_trainer.data.annotations import MISSING, attribute_heads, attribute_targets, frame_states, read_states
from ignite_trainer.data.datasets import TrainWindows, _FeatureWindows

#: Keys of `HeadTargets.lookup`'s result.
ATTRIBUTES = "attributes"
STATES = "states"


class HeadTargets:
    """Descriptor classes ``[recordings, A]`` and frame states (all recordings end to end) of one dataset."""

    def __init__(self, dataset: _FeatureWindows, heads: Sequence[str]) -> None:
        self.attribute_heads = attribute_heads(heads)
        self.segmentation = SEGMENTATION in heads
        self.window_frames = dataset.window_frames
        self._dataset = dataset
        self.device = torch.device("cpu")
        self.attributes = torch.from_numpy(attribute_targets(dataset.recordings, self.attribute_heads))
        self.states: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        if self.segmentation:
            fps = dataset.cache.settings.frames_per_second
            pieces, offsets, total = [], [], 0
            for rec, n in zip(dataset.recordings, dataset.n_frames):
                length = max(n, dataset.window_frames)  # room for a padded window, as the features have
                states = np.full(length, MISSING, dtype=np.int8)
                if rec.segmentation_path is not None:
                    states[:n] = frame_states(read_states(rec.segmentation_path), n, fps)
                pieces.append(states)
                offsets.append(total)
                total += length
            self.states = torch.from_numpy(np.concatenate(pieces)).to(torch.int64)
            self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self._frame = torch.arange(self.window_frames)

    def to(self, device: str | torch.device) -> "HeadTargets":
        """Move the tables to ``device`` (where the model runs); returns self."""
        self.device = torch.device(device)
        self.attributes = self.attributes.to(self.device)
        self._frame = self._frame.to(self.device)
        if self.states is not None:
            self.states, self.offsets = self.states.to(self.device), self.offsets.to(self.device)
        return self

    def _where(self, index: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(recording, start frame) of each sample: the crop of ``epoch`` (from 0) or the evaluation window."""
        ds = self._dataset
        indices = [int(i) for i in index.tolist()]
        if isinstance(ds, TrainWindows):
            recordings, starts = indices, [ds.crop_start(epoch, i) for i in indices]
        else:
            recordings = [ds.window_recording[i] for i in indices]
            starts = [ds.window_start[i] for i in indices]
        return (torch.tensor(recordings, dtype=torch.int64, device=self.device),
                torch.tensor(starts, dtype=torch.int64, device=self.device))

    def lookup(self, index: torch.Tensor, epoch: int = 0) -> dict[str, torch.Tensor]:
        """The targets of the samples ``index`` (an item's ``index``), for training epoch ``epoch`` (from 0)."""
        recordings, starts = self._where(index, epoch)
        found = {ATTRIBUTES: self.attributes[recordings]}
        if self.states is not None:
            columns = (self.offsets[recordings] + starts)[:, None] + self._frame
            found[STATES] = self.states[columns]
        return found
