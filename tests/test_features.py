"""Feature pipeline: mel filterbank, filters, resampling, and the content-addressed cache."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data import wav as wav_module
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.features import (
    FeatureCache,
    FeatureSettings,
    bandpass,
    compute_features,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    resample,
)
from ignite_trainer.data.records import Recording
from ignite_trainer.core.errors import DataError


# ---------------------------------------------------------------------------------------------- helpers
def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def write_wav(path: Path, samples: np.ndarray, rate: int = 4000, age_s: float = 60.0) -> Path:
    """16-bit PCM like CirCor; the mtime is set in the past, as for any dataset not written this instant."""
    wavfile.write(path, rate, np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16))
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def recording(path: Path, pid: str = "p1") -> Recording:
    return Recording(recording_id=path.stem, patient_id=pid, wav_path=path, labels=(1.0, 0.0), mask=(True, True))


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path passed to ``read_wav`` (the cache must call it only on a miss)."""
    calls: list[str] = []
    original = wav_module.read_wav

    def counting(path):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return original(path)

    monkeypatch.setattr(wav_module, "read_wav", counting)
    return calls


_WATCH: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCH and isinstance(args[0], (str, bytes, os.PathLike)):
        name = os.fsdecode(args[0])
        if name.lower().endswith(".wav"):
            _WATCH[-1].append(name)


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records while a test watches


class WavOpens:
    """Context manager listing every ``open()`` of a ``.wav`` path in this process (any API: builtins,
    io, os, pathlib, scipy), through Python's audit hook for the ``open`` event."""

    def __enter__(self) -> list[str]:
        self.opened: list[str] = []
        _WATCH.append(self.opened)
        return self.opened

    def __exit__(self, *exc: object) -> None:
        _WATCH.remove(self.opened)


# ---------------------------------------------------------------------------------------------- settings
def test_settings_from_config_and_key_is_canonical() -> None:
    assert FeatureSettings.from_config(TrainConfig()) == FeatureSettings()
    assert FeatureSettings(band_low_hz=25).key() == FeatureSettings(band_low_hz=25.0).key()
    keys = {FeatureSettings().key(), FeatureSettings(n_mels=32).key(), FeatureSettings(mel_scale="slaney").key(),
            FeatureSettings(hop_ms=12).key(), FeatureSettings(filter_order=2).key()}
    assert len(keys) == 5
    assert FeatureSettings().win_length == 50 and FeatureSettings().hop_length == 20


# ---------------------------------------------------------------------------------------------- mel filterbank
def _triangles_by_formula(n_fft: int, rate: int, n_mels: int, f_min: float, f_max: float, mel, inv) -> np.ndarray:
    """The textbook definition, written out with loops: [n_bins, n_mels]."""
    m_lo, m_hi = mel(f_min), mel(f_max)
    edges = [inv(m_lo + (m_hi - m_lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = np.zeros((n_fft // 2 + 1, n_mels))
    for k in range(n_fft // 2 + 1):
        f = k * rate / n_fft
        for m in range(n_mels):
            lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
            if lo <= f <= c:
                out[k, m] = (f - lo) / (c - lo)
            elif c < f <= hi:
                out[k, m] = (hi - f) / (hi - c)
    return out


def test_htk_filterbank_matches_formula() -> None:
    def mel(f: float) -> float:
        return 2595 * math.log10(1 + f / 700)

    def inv(m: float) -> float:
        return 700 * (10 ** (m / 2595) - 1)

    assert hz_to_mel(1000.0) == pytest.approx(999.99, abs=0.01)  # the scale's anchor: 1 kHz ~ 1000 mel
    expected = _triangles_by_formula(512, 2000, 64, 25.0, 400.0, mel, inv)
    got = mel_filterbank(512, 2000, 64, 25.0, 400.0, "htk").numpy()
    assert got.shape == (257, 64)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (got.sum(axis=0) > 0).all()  # no empty band at the default settings
    assert got.max() <= 1.0 + 1e-6


def test_slaney_filterbank_matches_formula() -> None:
    def mel(f: float) -> float:  # linear below 1 kHz (3 per 200 Hz), log above with 27 steps per factor 6.4
        return f * 3 / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)

    def inv(m: float) -> float:
        return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)

    assert hz_to_mel(2000.0, "slaney") == pytest.approx(15 + 27 * math.log(2) / math.log(6.4))
    assert mel_to_hz(hz_to_mel(1234.5, "slaney"), "slaney") == pytest.approx(1234.5)
    expected = _triangles_by_formula(1024, 8000, 40, 50.0, 3000.0, mel, inv)  # spans the 1 kHz knee
    got = mel_filterbank(1024, 8000, 40, 50.0, 3000.0, "slaney").numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    htk = mel_filterbank(1024, 8000, 40, 50.0, 3000.0, "htk").numpy()
    assert np.abs(got - htk).max() > 0.1


# ---------------------------------------------------------------------------------------------- signal steps
def _rms(x: np.ndarray) -> float:
    core = x[len(x) // 4: -len(x) // 4]  # away from the edges
    return float(np.sqrt(np.mean(core ** 2)))


def test_bandpass_attenuates_out_of_band_tones_and_keeps_phase() -> None:
    rate = 2000
    for freq in (8.0, 900.0):
        out = bandpass(tone(freq, rate, 4), rate, 25, 400)
        assert _rms(out) / _rms(tone(freq, rate, 4)) < 0.01, freq
    inside = tone(120.0, rate, 4)
    out = bandpass(inside, rate, 25, 400)
    assert _rms(out) / _rms(inside) == pytest.approx(1.0, abs=0.03)
    core = slice(len(inside) // 4, -len(inside) // 4)
    np.testing.assert_allclose(out[core], inside[core], atol=0.03)  # zero-phase: no delay


@pytest.mark.parametrize("from_rate", [4000, 44100, 1000])
def test_resample_keeps_tone_frequency(from_rate: int) -> None:
    x = resample(tone(150.0, from_rate, 3), from_rate, 2000)
    assert len(x) == 6000
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak_hz = np.argmax(spectrum) * 2000 / len(x)
    assert peak_hz == pytest.approx(150.0, abs=0.5)


def test_log_mel_frames_and_tone_lands_in_its_band() -> None:
    s = FeatureSettings()
    x = tone(200.0, 2000, 4.0)
    lm = log_mel(x, s)
    assert tuple(lm.shape) == (64, 400)  # exactly one frame per 10 ms hop
    edges = mel_to_hz(np.linspace(hz_to_mel(25.0), hz_to_mel(400.0), 66))
    centres = edges[1:-1]
    level = lm[:, 1:-1].mean(dim=1).numpy()
    # A 25 ms window smears the tone over ~80 Hz, so the peak may sit one narrow band off the nearest centre.
    assert abs(int(level.argmax()) - int(np.argmin(np.abs(centres - 200.0)))) <= 1
    assert level.max() - level[np.argmin(np.abs(centres - 50.0))] > 8.0  # > 35 dB above a band far away


def test_log_mel_equals_torch_stft_with_frames_centred_on_each_hop() -> None:
    """The band-limited DFT product must give what a full STFT gives; frame t is centred at (t + 1/2) hops."""
    s = FeatureSettings()
    audio = np.random.default_rng(8).standard_normal(2000 * 3)
    ours = log_mel(audio, s)
    half_hop = s.hop_length // 2
    spec = torch.stft(torch.from_numpy(audio[half_hop:]).float(), n_fft=s.n_fft, hop_length=s.hop_length,
                      win_length=s.win_length, window=torch.hann_window(s.win_length), center=True,
                      return_complex=True)
    fb = mel_filterbank(s.n_fft, s.sample_rate, s.n_mels, s.band_low_hz, s.band_high_hz)
    reference = torch.log(spec.abs().square().T @ fb + 1e-10).T
    inner = slice(2, 290)  # away from the edges, where the two pad differently
    torch.testing.assert_close(ours[:, inner], reference[:, inner], rtol=1e-4, atol=1e-3)


def test_compute_features_shape_and_band_normalisation() -> None:
    rng = np.random.default_rng(0)
    audio = 0.1 * rng.standard_normal(4000 * 5) + tone(60.0, 4000, 5, 0.2)
    f = compute_features(audio, 4000, FeatureSettings())
    assert f.dtype == np.float32 and f.shape == (64, 500)
    np.testing.assert_allclose(f.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(f.std(axis=1), 1.0, atol=1e-3)


def test_compute_features_rejects_unusable_audio() -> None:
    with pytest.raises(DataError, match="too short"):
        compute_features(np.zeros(20), 4000, FeatureSettings(), source="x.wav")
    with pytest.raises(DataError, match="NaN"):
        compute_features(np.array([0.0, np.nan] * 2000), 4000, FeatureSettings(), source="x.wav")


# ---------------------------------------------------------------------------------------------- cache
def test_cache_hits_and_misses_on_content_and_settings(tmp_path: Path, count_reads: list[str]) -> None:
    rng = np.random.default_rng(1)
    wav = write_wav(tmp_path / "a.wav", 0.3 * rng.standard_normal(4000 * 3))
    rec = recording(wav)
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    first = np.array(cache.get(rec))
    assert first.shape == (64, 300) and len(count_reads) == 1

    again = cache.get(rec)
    assert isinstance(again, np.memmap) and len(count_reads) == 1  # hit: no decode
    np.testing.assert_array_equal(again, first)

    # Same size, new content and an older mtime than before: the index entry no longer matches.
    write_wav(wav, 0.3 * rng.standard_normal(4000 * 3), age_s=30)
    changed = np.array(cache.get(rec))
    assert len(count_reads) == 2 and not np.allclose(changed, first)

    # Different length.
    write_wav(wav, 0.3 * rng.standard_normal(4000 * 4))
    assert cache.get(rec).shape == (64, 400) and len(count_reads) == 3

    # A different setting is a different key; going back to the first setting hits again.
    other = FeatureCache(tmp_path / "cache", FeatureSettings(n_mels=32))
    assert other.get(rec).shape == (32, 400) and len(count_reads) == 4
    assert FeatureCache(tmp_path / "cache", FeatureSettings()).get(rec).shape == (64, 400)
    assert len(count_reads) == 4


def test_cache_notices_a_same_size_rewrite_right_after_hashing(tmp_path: Path, count_reads: list[str]) -> None:
    """File clocks are coarse: a rewrite in the same tick can keep size and mtime, so fresh entries are
    re-hashed once before they are trusted."""
    rng = np.random.default_rng(2)
    wav = tmp_path / "a.wav"
    wavfile.write(wav, 4000, (rng.standard_normal(8000) * 3000).astype(np.int16))
    rec = recording(wav)
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    first = np.array(cache.get(rec))
    st = os.stat(wav)
    wavfile.write(wav, 4000, (rng.standard_normal(8000) * 3000).astype(np.int16))
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content changed
    assert not np.allclose(np.array(cache.get(rec)), first)


def test_cached_prepare_and_reads_open_no_wav(tmp_path: Path, count_reads: list[str]) -> None:
    rng = np.random.default_rng(3)
    recs = [recording(write_wav(tmp_path / f"r{i}.wav", 0.2 * rng.standard_normal(4000 * 2)), f"p{i}")
            for i in range(4)]
    with WavOpens() as opened:
        FeatureCache(tmp_path / "cache", FeatureSettings()).prepare(recs)
    assert len(opened) >= 4  # the watcher does see WAV opens (hashing and decoding)

    cache = FeatureCache(tmp_path / "cache", FeatureSettings())  # a new process would start like this
    with WavOpens() as opened:
        assert cache.prepare(recs) == recs
        total = sum(float(np.asarray(cache.get(r)).sum()) for r in recs)
    assert opened == [] and len(count_reads) == 4
    assert math.isfinite(total)


def test_identical_files_share_one_feature_file(tmp_path: Path) -> None:
    audio = 0.2 * np.random.default_rng(4).standard_normal(4000 * 2)
    a, b = write_wav(tmp_path / "a.wav", audio), write_wav(tmp_path / "b.wav", audio)
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    assert cache.feature_path(recording(a)) == cache.feature_path(recording(b))
    assert len(list(cache.feature_dir.glob("*.npy"))) == 1
    assert not list(cache.feature_dir.glob("*.partial"))


def test_damaged_feature_file_is_recomputed(tmp_path: Path) -> None:
    rec = recording(write_wav(tmp_path / "a.wav", 0.2 * np.random.default_rng(5).standard_normal(8000)))
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    good = np.array(cache.get(rec))
    path = cache.feature_path(rec)
    path.write_bytes(path.read_bytes()[:100])
    np.testing.assert_array_equal(cache.get(rec), good)


def test_bad_wavs_are_skipped_and_counted_or_stop_the_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    good = [recording(write_wav(tmp_path / f"g{i}.wav", 0.2 * rng.standard_normal(8000)), f"p{i}") for i in range(3)]
    truncated = tmp_path / "cut.wav"
    write_wav(truncated, 0.2 * rng.standard_normal(8000))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    garbage = tmp_path / "junk.wav"
    garbage.write_bytes(b"not a wav at all")
    missing = tmp_path / "gone.wav"
    recs = [good[0], recording(truncated, "px"), good[1], recording(garbage, "py"), recording(missing, "pz"), good[2]]

    policy = BadInputPolicy(skip=True)
    kept = FeatureCache(tmp_path / "c1", FeatureSettings()).prepare(recs, policy=policy, workers=2)
    assert kept == good
    assert len(policy.skipped) == 3
    for name, message in zip(("cut.wav", "gone.wav", "junk.wav"), sorted(policy.skipped)):
        assert name in message
    assert policy.summary() is not None and "3" in policy.summary()

    with pytest.raises(DataError, match="cut.wav"):
        FeatureCache(tmp_path / "c2", FeatureSettings()).prepare(recs)


def test_parallel_prepare_gives_the_same_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    recs = [recording(write_wav(tmp_path / f"r{i}.wav", 0.2 * rng.standard_normal(4000 * 3)), f"p{i}")
            for i in range(6)]
    serial = FeatureCache(tmp_path / "serial", FeatureSettings())
    parallel = FeatureCache(tmp_path / "parallel", FeatureSettings())
    assert serial.prepare(recs, workers=1) == parallel.prepare(recs, workers=2) == recs
    for r in recs:
        np.testing.assert_array_equal(serial.get(r), parallel.get(r))


# ---------------------------------------------------------------------------------------------- cache robustness
def test_float16_cache_halves_the_files_keeps_the_float32_key_and_reads_as_float32(tmp_path: Path) -> None:
    import dataclasses
    import hashlib
    import json

    from ignite_trainer.data.datasets import TrainWindows
    from ignite_trainer.data.features import FEATURE_VERSION

    old_payload = {"version": FEATURE_VERSION, **{k: v for k, v in dataclasses.asdict(FeatureSettings()).items()
                                                  if k != "feature_dtype"}}
    old_key = hashlib.blake2b(json.dumps(old_payload, sort_keys=True).encode(), digest_size=8).hexdigest()
    assert FeatureSettings().key() == old_key  # caches written before the option stay valid
    half_settings = FeatureSettings(feature_dtype="float16")
    assert half_settings.key() != old_key
    with pytest.raises(Exception, match="feature_dtype='float64'"):
        FeatureSettings(feature_dtype="float64")

    rec = recording(write_wav(tmp_path / "a.wav", 0.2 * np.random.default_rng(8).standard_normal(4000 * 6)))
    full, half = FeatureCache(tmp_path / "c", FeatureSettings()), FeatureCache(tmp_path / "c", half_settings)
    full.prepare([rec]), half.prepare([rec])
    assert half.get(rec).dtype == np.float16 and full.get(rec).dtype == np.float32
    assert half.feature_path(rec).stat().st_size < 0.52 * full.feature_path(rec).stat().st_size
    x16 = TrainWindows([rec], half, 4.0)[(0, 0)][0]
    x32 = TrainWindows([rec], full, 4.0)[(0, 0)][0]
    assert x16.dtype == torch.float32
    torch.testing.assert_close(x16, x32, atol=1e-2, rtol=2e-3)


def test_cache_files_honour_the_umask(tmp_path: Path) -> None:
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    rec = recording(write_wav(tmp_path / "a.wav", 0.2 * np.random.default_rng(9).standard_normal(8000)))
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    path = cache.feature_path(rec)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_an_interrupted_prepare_leaves_no_temporary_file_and_stray_ones_are_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ignite_trainer.data import features

    rng = np.random.default_rng(10)
    recs = [recording(write_wav(tmp_path / f"r{i}.wav", 0.2 * rng.standard_normal(8000)), f"p{i}") for i in range(3)]
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    cache.feature_dir.mkdir(parents=True)
    old_stray = cache.feature_dir / ".0123.npy.x1.partial"
    fresh_stray = cache.feature_dir / ".4567.npy.x2.partial"  # may belong to a run filling the cache right now
    for p in (old_stray, fresh_stray):
        p.write_bytes(b"")
    os.utime(old_stray, (time.time() - 7200,) * 2)
    original = features._write_entry

    def interrupted(target: Path, data: bytes, token: str = "") -> None:
        (target.parent / f".{target.name}.{token}.half.partial").write_bytes(data[:10])  # what a Ctrl-C leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "_write_entry", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare(recs)
    assert sorted(p.name for p in cache.feature_dir.glob("*.partial")) == [fresh_stray.name]
    monkeypatch.setattr(features, "_write_entry", original)
    assert cache.prepare(recs) == recs
    assert len(list(cache.feature_dir.glob("*.npy"))) == 3


def test_a_cache_folder_that_cannot_be_written_is_blamed_not_the_wav(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from ignite_trainer.data import features

    def disk_full(target: Path, data: bytes, token: str = "") -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(features, "_write_entry", disk_full)
    rng = np.random.default_rng(11)
    recs = [recording(write_wav(tmp_path / f"r{i}.wav", 0.2 * rng.standard_normal(8000)), f"p{i}") for i in range(2)]
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    for policy in (None, BadInputPolicy(skip=True)):  # never skipped as a bad recording
        with pytest.raises(DataError) as caught:
            cache.prepare(recs, policy=policy)
        message = str(caught.value)
        assert message.startswith(str(cache.feature_dir)) and "cannot write the feature cache" in message
        assert "No space left" in message and ".wav" not in message


def test_a_cache_entry_deleted_during_training_is_rebuilt_or_named(tmp_path: Path) -> None:
    import pickle

    from ignite_trainer.data.datasets import TrainWindows

    rec = recording(write_wav(tmp_path / "a.wav", 0.2 * np.random.default_rng(12).standard_normal(4000 * 6)))
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    cache.prepare([rec])
    dataset = TrainWindows([rec], cache, 4.0)
    expected = dataset[(0, 0)][0]
    worker_copy = pickle.loads(pickle.dumps(dataset))  # as a DataLoader worker gets it: nothing mapped yet
    cache.feature_path(rec).unlink()
    assert torch.equal(worker_copy[(0, 0)][0], expected)
    assert cache.feature_path(rec).exists()

    gone = pickle.loads(pickle.dumps(dataset))
    cache.feature_path(rec).unlink()
    rec.wav_path.unlink()
    with pytest.raises(DataError, match=r"vanished during training and could not be rebuilt"):
        gone[(0, 0)]


def test_a_cache_root_that_is_a_file_is_one_line_naming_it(tmp_path: Path) -> None:
    rec = recording(write_wav(tmp_path / "a.wav", 0.2 * np.random.default_rng(13).standard_normal(8000)))
    (tmp_path / "file").write_text("not a folder")
    cache = FeatureCache(tmp_path / "file" / "features", FeatureSettings())
    with pytest.raises(DataError, match=r"file/features: cannot use this folder as the feature cache"):
        cache.prepare([rec])
