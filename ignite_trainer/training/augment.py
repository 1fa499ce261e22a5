"""Training-time augmentation of a batch of cached log-mel features, on the device the model trains on.

The feature cache holds, per recording, ``z = (L - mean_t L) / std_t L`` for every mel band, where ``L`` is
the natural log of mel-band power (see `ignite_trainer.data.features`). The band means and stds are not
kept, so transforms defined on the waveform are expressed here on ``z``, through one documented assumption:
a z unit stands for ``log_power_scale`` nepers of log power (3.0 by default: the median per-band std of
``L`` measured on the embedded synthetic set is 2.9, its 10-90 % range 1.8-4.2). With it:

* **gain** of ``g`` dB applied to a window (a change of contact pressure relative to the rest of the
  recording; a gain of the *whole* recording is removed exactly by the per-band z-score, so it is no
  augmentation at all) is the offset ``g * ln(10) / 10 / log_power_scale`` added to every value;
* **coloured noise** at ``snr`` dB is mixed where noise mixes, in power: ``P = exp(log_power_scale * z)``,
  ``P' = P + N`` with ``N`` a 1/f^beta spectrum over the band centres, fluctuating per frame as a sum of
  squared DFT bins does (a gamma law with each band's effective number of bins), scaled so that
  ``sum(N) = sum(P) * 10^(-snr / 10)`` over the window exactly. Back in the log, each band is standardised
  to the mean and std the window had, as the per-recording z-score of a noisy recording would do. Because
  the z-score equalised the bands' levels, "SNR" is measured on that equalised spectrum, and ``beta``
  tilts the noise relative to it;
* **time shift** rolls the window (``"circular"``) or moves it and fills the gap with zeros, the band
  means (``"pad"``);
* **time stretch** by a rate ``r`` resamples the frames linearly around the window's centre
  (``out[t] = z[c + (t - c) * r]``), reflecting at the edges where ``r > 1`` reads past them; it changes the
  apparent heart rate;
* **SpecAugment** time and frequency masks set whole frames or bands to zero (the band mean);
* **mixup** mixes each sample with a partner of the same batch, ``lam * a + (1 - lam) * b`` with
  ``lam ~ Beta(alpha, alpha)`` folded to ``>= 0.5`` (the sample stays the dominant one); targets mix the
  same way and the label mask of a mixed sample is the AND of both masks, so a label missing in either
  sample stays out of the loss.

Order per sample: stretch, shift, noise, gain, then mixup over the batch, then the masks (so a masked
region is really blank).

Every random number is a function of ``(seed, epoch, sample index)`` only: each sample draws from
``numpy.random.default_rng([seed, epoch, index, stream])`` (a hash-free seed sequence), never from a
global or per-worker generator, so the result does not depend on the worker count, the process count,
the batch size or order, or where a run was resumed. Mixup's pairing needs the batch: it is a random
cyclic pairing drawn from ``(seed, epoch, sorted indices of the batch)``, so it depends on which samples
share the batch, not on their order. Evaluation never calls the augmenter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ignite_trainer.data.features import FeatureSettings, hz_to_mel, mel_filterbank, mel_to_hz
from ignite_trainer.core.augmentation import AugmentSettings

_MASK64 = (1 << 64) - 1
# Independent random streams of one sample: adding a transform never changes another's draws.
_STREAM_SCALARS, _STREAM_NOISE, _STREAM_TIME_MASKS, _STREAM_PAIRING, _STREAM_FREQ_MASKS = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class SampleDraw:
    """Everything drawn for one sample in one epoch; ``None`` / empty where the transform does not fire."""

    stretch_rate: float | None
    shift_frames: int | None
    snr_db: float | None
    noise_beta: float | None
    gain_db: float | None
    mixup_lam: float | None
    time_masks: tuple[tuple[int, int], ...]  # (start, width) in frames
    freq_masks: tuple[tuple[int, int], ...]  # (start, width) in bands


def sample_generator(seed: int, epoch: int, index: int, stream: int = _STREAM_SCALARS) -> np.random.Generator:
    """The generator of one sample in one epoch: a function of its arguments only (no hashing, no state)."""
    return np.random.default_rng([int(seed) & _MASK64, int(epoch) & _MASK64, int(index) & _MASK64, stream])


def mixup_partners(seed: int, epoch: int, indices: Sequence[int]) -> list[int]:
    """Batch position of each sample's mixup partner: a random cycle over the batch, never the sample itself
    (with two or more samples), drawn from ``(seed, epoch, sorted indices)`` so the batch's order does not
    matter."""
    n = len(indices)
    if n < 2:
        return list(range(n))
    order = sorted(range(n), key=lambda i: (int(indices[i]), i))
    entropy = [int(seed) & _MASK64, int(epoch) & _MASK64, _STREAM_PAIRING] + [int(indices[i]) & _MASK64 for i in order]
    cycle = np.random.default_rng(entropy).permutation(n)
    partners = [0] * n
    for k in range(n):
        partners[order[cycle[k]]] = order[cycle[(k + 1) % n]]
    return partners


def noise_log_power(log_power: torch.Tensor, snr_db: torch.Tensor | float, shape: torch.Tensor) -> torch.Tensor:
    """Log of the noise power ``[..., n_mels, T]`` of the given ``shape`` (positive), scaled so that its total
    over the window is the total signal power ``exp(log_power)`` times ``10^(-snr_db / 10)``.

    Works in the log domain throughout (``logsumexp``), so large log powers cannot overflow.
    """
    dims = (-2, -1)
    snr = torch.as_tensor(snr_db, dtype=log_power.dtype, device=log_power.device)
    level = torch.logsumexp(log_power, dim=dims) - snr * (math.log(10.0) / 10.0)
    log_shape = torch.log(shape) - torch.logsumexp(torch.log(shape), dim=dims, keepdim=True)
    return log_shape + level[..., None, None]


def mix_in_power(log_power: torch.Tensor, log_noise: torch.Tensor) -> torch.Tensor:
    """``log(exp(log_power) + exp(log_noise))``: signal and noise add as powers, not as log powers."""
    return torch.logaddexp(log_power, log_noise)


def gain_offset(gain_db: float, log_power_scale: float) -> float:
    """The z-unit offset of a power gain of ``gain_db`` dB: ``gain_db * ln(10) / 10 / log_power_scale``."""
    return gain_db * math.log(10.0) / 10.0 / log_power_scale


class Augmenter:
    """Applies `AugmentSettings` to a training batch ``(x [B, n_mels, T], y [B, L], mask [B, L])``.

    ``feature_settings`` gives the band centre frequencies and filter widths the noise is shaped by
    (default: `FeatureSettings` with the batch's number of mel bands). Inputs are never modified in place.

    Example::

        augment = Augmenter(AugmentSettings(time_mask_prob=0.5, mixup_prob=0.2), seed=cfg.seed)
        x, y, mask = augment(x, y, mask, index, engine.state.epoch)
    """

    def __init__(self, settings: AugmentSettings, seed: int,
                 feature_settings: FeatureSettings | None = None) -> None:
        self.settings = settings
        self.seed = int(seed)
        self.feature_settings = feature_settings

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # ------------------------------------------------------------------ drawing
    def draw(self, index: int, epoch: int, n_mels: int, n_frames: int) -> SampleDraw:
        """What sample ``index`` gets in ``epoch``; the same arguments always give the same draw."""
        s = self.settings
        rng = sample_generator(self.seed, epoch, index, _STREAM_SCALARS)
        # A fixed number of draws per transform, whether it is on or not: one setting never moves another's.
        u = rng.random(6)
        stretch = float(rng.uniform(1.0 - s.stretch_max, 1.0 + s.stretch_max))
        max_shift = int(round(s.shift_max_fraction * n_frames))
        shift = int(rng.integers(-max_shift, max_shift + 1))
        snr = float(rng.uniform(s.noise_snr_low_db, s.noise_snr_high_db))
        beta = float(rng.uniform(s.noise_beta_low, s.noise_beta_high))
        gain = float(rng.uniform(s.gain_low_db, s.gain_high_db))
        lam = float(rng.beta(s.mixup_alpha, s.mixup_alpha))
        time_masks = freq_masks = ()
        if u[4] < s.time_mask_prob:
            time_rng = sample_generator(self.seed, epoch, index, _STREAM_TIME_MASKS)
            time_masks = _masks(time_rng, s.time_masks, s.time_mask_width, n_frames)
        if u[5] < s.freq_mask_prob:
            freq_rng = sample_generator(self.seed, epoch, index, _STREAM_FREQ_MASKS)
            freq_masks = _masks(freq_rng, s.freq_masks, s.freq_mask_width, n_mels)
        return SampleDraw(
            stretch_rate=stretch if u[0] < s.stretch_prob and s.stretch_max > 0 else None,
            shift_frames=shift if u[1] < s.shift_prob and shift != 0 else None,
            snr_db=snr if u[2] < s.noise_prob else None,
            noise_beta=beta if u[2] < s.noise_prob else None,
            gain_db=gain if u[3] < s.gain_prob else None,
            mixup_lam=max(lam, 1.0 - lam) if rng.random() < s.mixup_prob else None,
            time_masks=time_masks,
            freq_masks=freq_masks,
        )

    # ------------------------------------------------------------------ applying
    def __call__(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | Sequence[int],
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented batch ``(x, y, mask)``; the inputs themselves when nothing is enabled."""
        if not self.enabled:
            return x, y, mask
        if x.dim() != 3:
            raise ValueError(f"expected features [B, n_mels, T], got shape {tuple(x.shape)}")
        indices = [int(i) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        batch, n_mels, n_frames = x.shape
        if len(indices) != batch:
            raise ValueError(f"{len(indices)} indices for a batch of {batch}")
        draws = [self.draw(i, epoch, n_mels, n_frames) for i in indices]
        x = x.clone()
        self._stretch(x, draws)
        self._shift(x, draws)
        self._noise(x, draws, indices, epoch)
        for b, d in enumerate(draws):
            if d.gain_db is not None:
                x[b] += gain_offset(d.gain_db, self.settings.log_power_scale)
        x, y, mask = self._mixup(x, y, mask, draws, indices, epoch)
        self._mask(x, draws)
        return x, y, mask

    def _stretch(self, x: torch.Tensor, draws: list[SampleDraw]) -> None:
        rows = [b for b, d in enumerate(draws) if d.stretch_rate is not None]
        if not rows:
            return
        n_frames = x.shape[2]
        rates = torch.tensor([draws[b].stretch_rate for b in rows], dtype=torch.float64, device=x.device)
        centre = (n_frames - 1) / 2
        t = torch.arange(n_frames, dtype=torch.float64, device=x.device)
        position = _reflect(centre + (t[None, :] - centre) * rates[:, None], n_frames - 1)
        low = position.floor().long().clamp(0, n_frames - 1)
        high = (low + 1).clamp(max=n_frames - 1)
        frac = (position - low).to(x.dtype)[:, None, :]
        src = x[rows]
        expand = lambda i: i[:, None, :].expand(-1, x.shape[1], -1)  # noqa: E731
        x[rows] = src.gather(2, expand(low)) * (1 - frac) + src.gather(2, expand(high)) * frac

    def _shift(self, x: torch.Tensor, draws: list[SampleDraw]) -> None:
        for b, d in enumerate(draws):
            if d.shift_frames is None:
                continue
            k = d.shift_frames
            if self.settings.shift_mode == "circular":
                x[b] = torch.roll(x[b], k, dims=1)
            else:
                moved = torch.zeros_like(x[b])
                if k > 0:
                    moved[:, k:] = x[b, :, :-k]
                else:
                    moved[:, :k] = x[b, :, -k:]
                x[b] = moved

    def _noise(self, x: torch.Tensor, draws: list[SampleDraw], indices: list[int], epoch: int) -> None:
        rows = [b for b, d in enumerate(draws) if d.snr_db is not None]
        if not rows:
            return
        n_mels, n_frames = x.shape[1], x.shape[2]
        features = self.feature_settings or FeatureSettings(n_mels=n_mels)
        if features.n_mels != n_mels:
            raise ValueError(f"feature settings have {features.n_mels} mel bands, the batch has {n_mels}")
        shapes = [coloured_noise_shape(sample_generator(self.seed, epoch, indices[b], _STREAM_NOISE), features,
                                       draws[b].noise_beta, n_frames) for b in rows]
        shape = torch.from_numpy(np.stack(shapes)).to(x.device, x.dtype)
        snr = torch.tensor([draws[b].snr_db for b in rows], dtype=x.dtype, device=x.device)
        scale = self.settings.log_power_scale
        z = x[rows]
        log_power = z * scale
        noisy = mix_in_power(log_power, noise_log_power(log_power, snr, shape)) / scale
        x[rows] = _restandardise(noisy, z)

    def _mixup(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, draws: list[SampleDraw],
               indices: list[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [b for b, d in enumerate(draws) if d.mixup_lam is not None]
        if not rows or len(draws) < 2:
            return x, y, mask
        partners = mixup_partners(self.seed, epoch, indices)
        src = torch.tensor([partners[b] for b in rows], device=x.device)
        at = torch.tensor(rows, device=x.device)
        lam = torch.tensor([draws[b].mixup_lam for b in rows], dtype=x.dtype, device=x.device)
        x_mixed, y_mixed, mask_mixed = x.clone(), y.clone(), mask.clone()
        x_mixed[at] = lam[:, None, None] * x[at] + (1 - lam[:, None, None]) * x[src]
        lam_y = lam.to(y.dtype)[:, None]
        y_mixed[at] = lam_y * y[at] + (1 - lam_y) * y[src]
        mask_mixed[at] = (mask[at].bool() & mask[src].bool()).to(mask.dtype)
        return x_mixed, y_mixed, mask_mixed

    def _mask(self, x: torch.Tensor, draws: list[SampleDraw]) -> None:
        for b, d in enumerate(draws):
            for start, width in d.time_masks:
                x[b, :, start:start + width] = 0.0
            for start, width in d.freq_masks:
                x[b, start:start + width, :] = 0.0


def coloured_noise_shape(rng: np.random.Generator, features: FeatureSettings, beta: float,
                         n_frames: int) -> np.ndarray:
    """Relative mel-band power ``[n_mels, n_frames]`` of 1/f^beta noise: each band's mean follows its centre
    frequency to the power ``-beta``, and each frame fluctuates around it as a gamma law whose shape is the
    band's effective number of DFT bins (the band power of Gaussian noise)."""
    centres, dof = _band_model(features)
    shape = np.broadcast_to(dof[:, None].astype(np.float32), (len(centres), n_frames))
    fluctuation = rng.standard_gamma(shape, dtype=np.float32) / shape
    return (centres[:, None] ** (-beta)).astype(np.float32) * fluctuation


def _masks(rng: np.random.Generator, count: int, max_width: int, size: int) -> tuple[tuple[int, int], ...]:
    """``count`` SpecAugment masks: width uniform in ``[0, max_width]`` (at most ``size``), start uniform."""
    out = []
    for _ in range(count):
        width = int(rng.integers(0, min(max_width, size) + 1))
        start = int(rng.integers(0, size - width + 1))
        out.append((start, width))
    return tuple(out)


def _reflect(position: torch.Tensor, last: int) -> torch.Tensor:
    """Fold positions into ``[0, last]`` by mirroring at both ends."""
    if last == 0:
        return torch.zeros_like(position)
    period = 2 * last
    folded = torch.remainder(position, period)
    return last - (folded - last).abs()


def _restandardise(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` with each band's mean and std over the window set to those of ``like``."""
    def spread(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = t.mean(dim=-1, keepdim=True)
        return mean, (t - mean).square().mean(dim=-1, keepdim=True).sqrt()  # several times faster than std()

    (mean, std), (target_mean, target_std) = spread(values), spread(like)
    return (values - mean) / std.clamp_min(1e-6) * target_std + target_mean


@functools.lru_cache(maxsize=8)
def _band_model(settings: FeatureSettings) -> tuple[np.ndarray, np.ndarray]:
    """Centre frequency (Hz) of each mel band, and its effective number of DFT bins ``(sum w)^2 / sum w^2``:
    the band power of Gaussian noise is then close to a gamma law of that shape."""
    edges = mel_to_hz(np.linspace(hz_to_mel(settings.band_low_hz, settings.mel_scale),
                                  hz_to_mel(settings.band_high_hz, settings.mel_scale), settings.n_mels + 2),
                      settings.mel_scale)
    weights = mel_filterbank(settings.n_fft, settings.sample_rate, settings.n_mels, settings.band_low_hz,
                             settings.band_high_hz, settings.mel_scale).double().numpy()
    dof = weights.sum(axis=0) ** 2 / np.maximum((weights ** 2).sum(axis=0), 1e-30)
    return np.asarray(edges[1:-1], dtype=np.float64), np.maximum(dof, 1.0)
