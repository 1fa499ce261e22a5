"""The two views of a window that BYOL-A pretraining compares, every draw a function of (seed, epoch, index, view).

Each view of a batch of cached log-mel windows ``x [B, n_mels, T]`` (per-band z-scores) is, in order:

1. the project's own augmentation (`augment.Augmenter` with the config's ``augment_*`` settings), each view
   with its own seed, so that the two views of a window get different draws;
2. BYOL-A's *mixup with another window* (log-mixup-exp): ``log((1 - lam) exp(x) + lam exp(x_other))`` with
   ``lam ~ U(0, pretrain_mixup)`` and the other window a partner of the same batch (`augment.mixup_partners`,
   drawn from the sorted indices of the batch, so not from the batch's order); BYOL-A draws the other window
   from a queue of past batches, which would make a view depend on what came before;
3. BYOL-A's *random resize crop*: the window is placed in the middle of a zero canvas 1.5 times as long
   (zero is the band mean), a region of 0.6-1.5 times the window's bands and frames (clipped to the canvas)
   is cut at a random place and resized back to the window's shape (bilinear).

Every random number comes from ``numpy.random.default_rng([seed, epoch, index, view, stream])``: the views do
not depend on the worker count, on the batch's order, or on where a run was resumed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ignite_trainer.core.augmentation import AugmentSettings
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.features import FeatureSettings
from ignite_trainer.training.augment import Augmenter, mixup_partners

__all__ = ["ViewMaker", "VIRTUAL_TIME_SCALE", "CROP_SCALE"]

_MASK64 = (1 << 64) - 1
_STREAM_MIXUP, _STREAM_CROP, _STREAM_SEED = 10, 11, 12
#: BYOL-A's random resize crop: canvas length (time) relative to the window, and the range of the crop's size.
VIRTUAL_TIME_SCALE = 1.5
CROP_SCALE = (0.6, 1.5)


def _rng(seed: int, epoch: int, index: int, view: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & _MASK64, int(epoch) & _MASK64, int(index) & _MASK64, view, stream])


def view_seed(seed: int, view: int) -> int:
    """The seed of view ``view``'s `Augmenter`: unrelated to ``seed`` and to the other view's."""
    return int(_rng(seed, 0, 0, view, _STREAM_SEED).integers(0, 2**63 - 1))


class ViewMaker:
    """``views(x, index, epoch) -> (view1, view2)``, each ``[B, n_mels, T]`` on ``x``'s device.

    Example::

        views = ViewMaker.from_config(config)
        v1, v2 = views(x, index, engine.state.epoch)
    """

    def __init__(self, settings: AugmentSettings, seed: int, *, mixup: float = 0.4, crop: bool = True,
                 feature_settings: FeatureSettings | None = None) -> None:
        self.seed = int(seed)
        self.mixup = float(mixup)
        self.crop = bool(crop)
        self.augmenters = [Augmenter(settings, view_seed(seed, v), feature_settings) for v in (0, 1)]

    @classmethod
    def from_config(cls, config: TrainConfig) -> "ViewMaker":
        return cls(AugmentSettings.from_config(config), config.seed, mixup=config.pretrain_mixup,
                   crop=config.pretrain_crop, feature_settings=FeatureSettings.from_config(config))

    def __call__(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = [int(i) for i in index.tolist()]
        return self.view(x, indices, epoch, 0), self.view(x, indices, epoch, 1)

    def view(self, x: torch.Tensor, indices: list[int], epoch: int, view: int) -> torch.Tensor:
        augmenter = self.augmenters[view]
        out = x
        if augmenter.enabled:
            dummy = x.new_zeros(x.shape[0], 2)
            out, _, _ = augmenter(x, dummy, dummy, indices, epoch)
        if self.mixup > 0 and len(indices) > 1:
            out = self._mixup(out, x, indices, epoch, view)
        if self.crop:
            out = self._crop(out, indices, epoch, view)
        return out

    def _mixup(self, out: torch.Tensor, x: torch.Tensor, indices: list[int], epoch: int, view: int) -> torch.Tensor:
        partners = mixup_partners(self.seed ^ (view + 1), epoch, indices)
        lam = torch.tensor([_rng(self.seed, epoch, i, view, _STREAM_MIXUP).uniform(0.0, self.mixup) for i in indices],
                           dtype=x.dtype, device=x.device)[:, None, None]
        other = x[torch.tensor(partners, device=x.device)]
        return torch.logaddexp(torch.log1p(-lam) + out, torch.log(lam) + other)

    def _crop(self, x: torch.Tensor, indices: list[int], epoch: int, view: int) -> torch.Tensor:
        _, n_mels, n_frames = x.shape
        canvas_t = int(round(n_frames * VIRTUAL_TIME_SCALE))
        left = (canvas_t - n_frames) // 2
        canvas = x.new_zeros(x.shape[0], n_mels, canvas_t)
        canvas[:, :, left:left + n_frames] = x
        rows = []
        for b, i in enumerate(indices):
            rng = _rng(self.seed, epoch, i, view, _STREAM_CROP)
            h = min(n_mels, max(1, int(round(n_mels * rng.uniform(*CROP_SCALE)))))
            w = min(canvas_t, max(1, int(round(n_frames * rng.uniform(*CROP_SCALE)))))
            top = int(rng.integers(0, n_mels - h + 1))
            start = int(rng.integers(0, canvas_t - w + 1))
            region = canvas[b:b + 1, None, top:top + h, start:start + w]
            rows.append(F.interpolate(region, size=(n_mels, n_frames), mode="bilinear", align_corners=False)[:, 0])
        return torch.cat(rows)
