"""Batch augmentation: each transform does what it claims, draws depend only on (seed, epoch, index), and an
augmenter with nothing enabled leaves the batch alone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import numpy as np

from ignite_trainer.core.augmentation import AugmentSettings
from ignite_trainer.training.augment import (Augmenter, coloured_noise_shape, gain_offset, mix_in_power, mixup_partners, noise_log_power)
from ignite_trainer.data.features import FeatureSettings, hz_to_mel, mel_to_hz
from ignite_trainer.core.errors import ConfigError

N_MELS, N_FRAMES = 16, 50


def batch(indices=(3, 8, 15, 42), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(indices), N_MELS, N_FRAMES, generator=g)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])[: len(indices)]
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])[: len(indices)]
    return x, y, mask, torch.tensor(indices)


def only(**changes) -> Augmenter:
    return Augmenter(AugmentSettings(**changes), seed=5)


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("changes, field", [
    ({"noise_prob": 1.5}, "augment_noise_prob"),
    ({"mixup_prob": -0.1}, "augment_mixup_prob"),
    ({"noise_snr_low_db": 20.0, "noise_snr_high_db": 10.0}, "augment_noise_snr_low_db"),
    ({"gain_low_db": 3.0, "gain_high_db": -3.0}, "augment_gain_low_db"),
    ({"mixup_alpha": 0.0}, "augment_mixup_alpha"),
    ({"time_mask_width": -1}, "augment_time_mask_width"),
    ({"freq_masks": -2}, "augment_freq_masks"),
    ({"shift_mode": "wrap"}, "augment_shift_mode"),
    ({"stretch_max": 0.9}, "augment_stretch_max"),
    ({"noise_prob": float("nan")}, "augment_noise_prob"),
    ({"time_masks": 1.5}, "augment_time_masks"),
])
def test_bad_settings_name_the_field(changes, field) -> None:
    with pytest.raises(ConfigError, match=rf"^config: {field}="):
        AugmentSettings(**changes)


def test_settings_from_config_fields_and_default_off() -> None:
    assert not AugmentSettings().enabled
    cfg = SimpleNamespace(augment_noise_prob=0.5, augment_mixup_alpha=0.2, seed=1)
    settings = AugmentSettings.from_config(cfg)
    assert settings.enabled and settings.noise_prob == 0.5 and settings.mixup_alpha == 0.2
    with pytest.raises(ConfigError, match=r"^run.yaml: augment_mixup_alpha=-1"):
        AugmentSettings.from_config(SimpleNamespace(augment_mixup_alpha=-1), source="run.yaml")


def test_nothing_enabled_returns_the_batch_untouched() -> None:
    x, y, mask, index = batch()
    out = Augmenter(AugmentSettings(), seed=0)(x, y, mask, index, epoch=1)
    assert out[0] is x and out[1] is y and out[2] is mask


def test_inputs_are_never_modified_in_place() -> None:
    x, y, mask, index = batch()
    copies = (x.clone(), y.clone(), mask.clone())
    everything = dict(gain_prob=1, noise_prob=1, shift_prob=1, stretch_prob=1, time_mask_prob=1, freq_mask_prob=1,
                      mixup_prob=1)
    out = only(**everything)(x, y, mask, index, epoch=2)
    assert out[0].shape == x.shape and out[1].shape == y.shape and out[2].shape == mask.shape
    assert torch.equal(x, copies[0]) and torch.equal(y, copies[1]) and torch.equal(mask, copies[2])
    assert not torch.equal(out[0], x)


# ---------------------------------------------------------------------------------------------- transforms
def test_gain_is_the_documented_offset() -> None:
    x, y, mask, index = batch()
    augment = only(gain_prob=1.0, gain_low_db=-6.0, gain_high_db=6.0)
    out, _, _ = augment(x, y, mask, index, epoch=0)
    for b, i in enumerate(index.tolist()):
        gain = augment.draw(i, 0, N_MELS, N_FRAMES).gain_db
        assert -6.0 <= gain <= 6.0
        expected = gain * math.log(10) / 10 / 3.0
        assert gain_offset(gain, 3.0) == pytest.approx(expected)
        torch.testing.assert_close(out[b] - x[b], torch.full_like(x[b], expected), atol=1e-5, rtol=0)


def test_noise_power_gives_the_sampled_snr() -> None:
    log_power = torch.randn(N_MELS, N_FRAMES, dtype=torch.float64) * 3.0
    shape = torch.rand(N_MELS, N_FRAMES, dtype=torch.float64) + 0.1
    log_power[0, 0] = 120.0  # far beyond float32's exp range: still exact in the log domain
    for snr in (-5.0, 0.0, 12.5, 30.0):
        mixed = mix_in_power(log_power, noise_log_power(log_power, snr, shape))
        added = (mixed.exp() - log_power.exp()).sum()
        measured = 10 * math.log10(float(log_power.exp().sum() / added))
        assert measured == pytest.approx(snr, abs=1e-6)


def test_noise_keeps_band_statistics_and_hurts_more_at_lower_snr() -> None:
    x, y, mask, index = batch()
    outputs = {}
    for snr in (-10.0, 40.0):
        augment = only(noise_prob=1.0, noise_snr_low_db=snr, noise_snr_high_db=snr)
        out, _, _ = augment(x, y, mask, index, epoch=0)
        assert all(augment.draw(i, 0, N_MELS, N_FRAMES).snr_db == snr for i in index.tolist())
        torch.testing.assert_close(out.mean(dim=2), x.mean(dim=2), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.std(dim=2), x.std(dim=2), atol=1e-4, rtol=1e-4)
        outputs[snr] = out
    change = {snr: float((out - x).abs().mean()) for snr, out in outputs.items()}
    assert change[40.0] < change[-10.0] / 5, change


def test_noise_colour_follows_the_band_centres() -> None:
    features = FeatureSettings(n_mels=N_MELS)
    centres = mel_to_hz(np.linspace(hz_to_mel(25.0), hz_to_mel(400.0), N_MELS + 2))[1:-1]
    for beta in (0.0, 1.0, 2.0):
        shape = coloured_noise_shape(np.random.default_rng(0), features, beta, 4000)
        assert shape.shape == (N_MELS, 4000) and (shape > 0).all()
        level = shape.mean(axis=1) / centres ** (-beta)  # what is left once the colour is divided out
        np.testing.assert_allclose(level, 1.0, rtol=0.1)


def test_circular_and_padded_shift() -> None:
    x, y, mask, index = batch()
    shifted = 0
    for mode in ("circular", "pad"):
        augment = only(shift_prob=1.0, shift_max_fraction=0.4, shift_mode=mode)
        out, _, _ = augment(x, y, mask, index, epoch=3)
        for b, i in enumerate(index.tolist()):
            k = augment.draw(i, 3, N_MELS, N_FRAMES).shift_frames
            if k is None:  # a shift of 0 was drawn
                assert torch.equal(out[b], x[b])
                continue
            assert 0 < abs(k) <= 20
            shifted += 1
            rolled = torch.roll(x[b], k, dims=1)
            if mode == "circular":
                assert torch.equal(out[b], rolled)
            else:
                gap = slice(0, k) if k > 0 else slice(N_FRAMES + k, N_FRAMES)
                keep = slice(k, N_FRAMES) if k > 0 else slice(0, N_FRAMES + k)
                assert torch.equal(out[b][:, gap], torch.zeros_like(out[b][:, gap]))
                assert torch.equal(out[b][:, keep], rolled[:, keep])
    assert shifted >= 6


def test_stretch_resamples_frames_around_the_centre() -> None:
    ramp = torch.arange(N_FRAMES, dtype=torch.float32).expand(4, N_MELS, N_FRAMES).contiguous()
    y, mask = torch.zeros(4, 2), torch.ones(4, 2)
    augment = only(stretch_prob=1.0, stretch_max=0.2)
    out, _, _ = augment(ramp, y, mask, torch.tensor([0, 1, 2, 3]), epoch=0)
    centre = (N_FRAMES - 1) / 2
    for b in range(4):
        rate = augment.draw(b, 0, N_MELS, N_FRAMES).stretch_rate
        assert 0.8 <= rate <= 1.2
        t = torch.arange(N_FRAMES, dtype=torch.float64)
        position = centre + (t - centre) * rate
        inside = (position >= 0) & (position <= N_FRAMES - 1)
        torch.testing.assert_close(out[b, 0, inside].double(), position[inside], atol=1e-4, rtol=0)
        assert out[b].min() >= 0 and out[b].max() <= N_FRAMES - 1  # reflected, never extrapolated


def test_spec_augment_masks_zero_exactly_the_drawn_regions() -> None:
    x, y, mask, index = batch()
    x = x + 5.0  # no input value is zero by chance
    augment = only(time_mask_prob=1.0, time_masks=2, time_mask_width=12, freq_mask_prob=1.0, freq_masks=2,
                   freq_mask_width=5)
    out, _, _ = augment(x, y, mask, index, epoch=4)
    widths = []
    for b, i in enumerate(index.tolist()):
        d = augment.draw(i, 4, N_MELS, N_FRAMES)
        assert len(d.time_masks) == 2 and len(d.freq_masks) == 2
        expected = torch.ones(N_MELS, N_FRAMES, dtype=torch.bool)
        for start, width in d.time_masks:
            assert 0 <= width <= 12 and start + width <= N_FRAMES
            expected[:, start:start + width] = False
            widths.append(width)
        for start, width in d.freq_masks:
            assert 0 <= width <= 5 and start + width <= N_MELS
            expected[start:start + width, :] = False
        assert torch.equal(out[b] == 0, ~expected)
        assert torch.equal(out[b][expected], x[b][expected])
    assert max(widths) > 0


def test_mixup_weights_labels_and_masks() -> None:
    x, y, mask, index = batch()
    augment = only(mixup_prob=1.0, mixup_alpha=0.4)
    out_x, out_y, out_mask = augment(x, y, mask, index, epoch=1)
    partners = mixup_partners(5, 1, index.tolist())
    assert sorted(partners) == [0, 1, 2, 3] and all(p != b for b, p in enumerate(partners))
    for b, i in enumerate(index.tolist()):
        lam = augment.draw(i, 1, N_MELS, N_FRAMES).mixup_lam
        assert 0.5 <= lam <= 1.0
        p = partners[b]
        torch.testing.assert_close(out_x[b], lam * x[b] + (1 - lam) * x[p])
        torch.testing.assert_close(out_y[b], lam * y[b] + (1 - lam) * y[p])
        assert torch.equal(out_mask[b], mask[b] * mask[p])  # known only where both are known
    assert out_mask[:, 1].sum() < mask[:, 1].sum()  # sample 2's missing murmur spreads to its partner


def test_mixup_pairing_does_not_depend_on_batch_order() -> None:
    x, y, mask, index = batch()
    augment = only(mixup_prob=1.0)
    out = augment(x, y, mask, index, epoch=6)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = augment(x[order], y[order], mask[order], index[order], epoch=6)
    for got, want in zip(shuffled, out):
        torch.testing.assert_close(got, want[order])


# ---------------------------------------------------------------------------------------------- determinism
ALL_BUT_MIXUP = dict(gain_prob=0.7, noise_prob=0.7, shift_prob=0.7, stretch_prob=0.7, time_mask_prob=0.7,
                     freq_mask_prob=0.7)


def test_same_seed_epoch_index_same_output_in_any_batch() -> None:
    x, y, mask, index = batch()
    augment = only(**ALL_BUT_MIXUP)
    full, _, _ = augment(x, y, mask, index, epoch=9)
    for rows in ([2], [3, 1], [1, 0, 2]):
        part, _, _ = augment(x[rows], y[rows], mask[rows], index[rows], epoch=9)
        torch.testing.assert_close(part, full[rows], atol=1e-6, rtol=0)
    again, _, _ = Augmenter(AugmentSettings(**ALL_BUT_MIXUP), seed=5)(x, y, mask, index, epoch=9)
    assert torch.equal(again, full)
    other_epoch, _, _ = augment(x, y, mask, index, epoch=10)
    other_seed, _, _ = Augmenter(AugmentSettings(**ALL_BUT_MIXUP), seed=6)(x, y, mask, index, epoch=9)
    assert not torch.equal(other_epoch, full) and not torch.equal(other_seed, full)


def test_one_transform_setting_does_not_move_another_transforms_draws() -> None:
    a = only(gain_prob=1.0).draw(7, 2, N_MELS, N_FRAMES)
    b = only(gain_prob=1.0, time_mask_prob=1.0, mixup_prob=0.5, stretch_max=0.3).draw(7, 2, N_MELS, N_FRAMES)
    assert a.gain_db == b.gain_db


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu() -> None:
    x, y, mask, index = batch()
    augment = only(**ALL_BUT_MIXUP, mixup_prob=0.5)
    cpu = augment(x, y, mask, index, epoch=1)
    gpu = augment(x.cuda(), y.cuda(), mask.cuda(), index, epoch=1)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
