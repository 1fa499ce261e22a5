"""Recording -> normalised log-mel features, computed once and read memory-mapped every epoch after that.

Pipeline per recording: resample to ``sample_rate`` -> zero-phase Butterworth band-pass -> power STFT ->
mel filterbank (written here: torchaudio is not a dependency) -> log -> z-score per mel band.

`FeatureCache` keys every feature file by the *content* of the WAV and the `FeatureSettings`, so an edited
recording or a changed setting can never be served stale features. Hashing content means reading the WAV,
which a cached epoch must not do, so the cache also keeps an index ``(path, size, mtime_ns) -> content
hash``: a warm lookup costs one ``stat``.

Features are stored as float32 or, with ``feature_dtype="float16"``, as float16: half the disk and page
cache (z-scored log-mel values lie within about +-10, where float16 keeps 3 significant digits, far below
the recordings' own noise); readers always get float32 windows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import secrets
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, NamedTuple

import numpy as np
import scipy.signal
import torch
from tqdm import tqdm

from ignite_trainer.core.atomic import PARTIAL_SUFFIX, atomic_write
from ignite_trainer.data import wav as wav_io
from ignite_trainer.data.records import Recording
from ignite_trainer.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from ignite_trainer.core.config import TrainConfig
    from ignite_trainer.data.bad_input import BadInputPolicy

#: Bump when the feature computation changes in a way `FeatureSettings` does not capture: old cache files
#: then stop matching instead of being served.
FEATURE_VERSION = 1

MelScale = Literal["htk", "slaney"]
FeatureDtype = Literal["float32", "float16"]

_LOG_FLOOR = 1e-10  # added before the log so that digital silence stays finite
_STD_FLOOR = 1e-3  # a band that is constant over a recording is centred, not blown up


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FeatureSettings:
    """Everything that changes the numbers in a feature file; `key` names the cache folder for it.

    Example::

        settings = FeatureSettings.from_config(TrainConfig())
        cache = FeatureCache(Path("cache/features"), settings)
        features = cache.get(cache.prepare(recordings)[0])  # float32 [n_mels, frames], memory-mapped
    """

    sample_rate: int = 2000
    band_low_hz: float = 25.0
    band_high_hz: float = 400.0
    n_mels: int = 64
    n_fft: int = 512
    win_ms: float = 25.0
    hop_ms: float = 10.0
    filter_order: int = 4
    mel_scale: MelScale = "htk"
    feature_dtype: FeatureDtype = "float32"

    def __post_init__(self) -> None:
        # Canonical types, so that FeatureSettings(band_low_hz=25) and (band_low_hz=25.0) share one key.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                object.__setattr__(self, f.name, int(value))
            elif f.type in ("float", float):
                object.__setattr__(self, f.name, float(value))
        if self.mel_scale not in ("htk", "slaney"):
            raise ConfigError(f"mel_scale={self.mel_scale!r} is not one of: htk, slaney")
        if self.feature_dtype not in ("float32", "float16"):
            raise ConfigError(f"feature_dtype={self.feature_dtype!r} is not one of: float32, float16")
        if not 0 < self.band_low_hz < self.band_high_hz < self.sample_rate / 2:
            raise ConfigError(
                f"band {self.band_low_hz:g}-{self.band_high_hz:g} Hz must satisfy 0 < low < high < "
                f"Nyquist ({self.sample_rate / 2:g} Hz)"
            )
        if self.filter_order < 1 or self.n_mels < 1 or self.hop_length < 1 or self.win_length < 1:
            raise ConfigError(f"feature settings out of range: {self}")
        if self.win_length > self.n_fft:
            raise ConfigError(f"win_ms={self.win_ms:g} ({self.win_length} samples) is longer than n_fft={self.n_fft}")

    @classmethod
    def from_config(cls, cfg: "TrainConfig") -> "FeatureSettings":
        return cls(
            sample_rate=cfg.sample_rate,
            band_low_hz=cfg.band_low_hz,
            band_high_hz=cfg.band_high_hz,
            n_mels=cfg.n_mels,
            n_fft=cfg.n_fft,
            win_ms=cfg.win_ms,
            hop_ms=cfg.hop_ms,
            feature_dtype=getattr(cfg, "feature_dtype", "float32"),
        )

    @property
    def win_length(self) -> int:
        """STFT window in samples at ``sample_rate``."""
        return int(round(self.win_ms * self.sample_rate / 1000))

    @property
    def hop_length(self) -> int:
        """STFT hop in samples at ``sample_rate``; one feature frame covers exactly one hop."""
        return int(round(self.hop_ms * self.sample_rate / 1000))

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def key(self) -> str:
        """A short hash that is the same for equal settings in every process and every Python run.

        The float32 default stays out of the hash, so caches written before ``feature_dtype`` existed
        keep their key; float16 files get a folder of their own.
        """
        fields = dataclasses.asdict(self)
        if fields["feature_dtype"] == "float32":
            del fields["feature_dtype"]
        payload = json.dumps({"version": FEATURE_VERSION, **fields}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


# ---------------------------------------------------------------------------------------------- mel scale
def hz_to_mel(hz: np.ndarray | float, scale: MelScale = "htk") -> np.ndarray:
    """HTK: ``2595 log10(1 + f/700)``. Slaney (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(hz, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = f / f_sp
    log_part = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, linear)


def mel_to_hz(mel: np.ndarray | float, scale: MelScale = "htk") -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    m = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=16)
def mel_filterbank(
    n_fft: int, sample_rate: int, n_mels: int, f_min: float, f_max: float, scale: MelScale = "htk"
) -> torch.Tensor:
    """Triangular filters ``[n_fft // 2 + 1, n_mels]``: ``power_spectrum @ fb`` gives mel-band power.

    Band edges are ``n_mels + 2`` points equally spaced on the mel scale between ``f_min`` and ``f_max``;
    filter m rises linearly from edge m to 1 at edge m+1 and falls to 0 at edge m+2, evaluated at each FFT
    bin's frequency. There is no per-band area normalisation: after the log a constant gain per band is an
    additive offset, which the per-band z-score removes anyway. Cached: treat the result as read-only.
    """
    bin_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min, scale), hz_to_mel(f_max, scale), n_mels + 2), scale)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    weights = np.clip(np.minimum(rising, falling), 0.0, None)  # [n_mels, n_bins]
    return torch.from_numpy(np.ascontiguousarray(weights.T, dtype=np.float32))


# ---------------------------------------------------------------------------------------------- signal steps
def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling by the exact rational factor ``to_rate / from_rate`` (its own anti-alias filter)."""
    if from_rate == to_rate:
        return audio
    g = math.gcd(int(from_rate), int(to_rate))
    up, down = to_rate // g, from_rate // g
    return scipy.signal.resample_poly(audio, up, down, window=_resample_filter(up, down))


@functools.lru_cache(maxsize=16)
def _resample_filter(up: int, down: int) -> np.ndarray:
    """``resample_poly``'s own default low-pass, designed once per ratio instead of once per call."""
    rate = max(up, down)
    return scipy.signal.firwin(2 * 10 * rate + 1, 1.0 / rate, window=("kaiser", 5.0))


@functools.lru_cache(maxsize=16)
def _bandpass_sos(order: int, low_hz: float, high_hz: float, rate: int) -> np.ndarray:
    return scipy.signal.butter(order, [low_hz, high_hz], btype="bandpass", fs=rate, output="sos")


def bandpass(audio: np.ndarray, rate: int, low_hz: float, high_hz: float, order: int = 4) -> np.ndarray:
    """Zero-phase Butterworth band-pass: filtering forwards and backwards keeps S1/S2 onsets where they are."""
    sos = _bandpass_sos(order, float(low_hz), float(high_hz), int(rate))
    return scipy.signal.sosfiltfilt(sos, audio)


def _min_samples(settings: FeatureSettings) -> int:
    sos = _bandpass_sos(settings.filter_order, settings.band_low_hz, settings.band_high_hz, settings.sample_rate)
    return max(settings.win_length, 3 * (2 * len(sos) + 1) + 1)  # sosfiltfilt's default edge padding needs this


@functools.lru_cache(maxsize=16)
def _band_stft(settings: FeatureSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """A Hann-windowed DFT basis ``[win, 2 * bins]`` (cos | -sin) for the FFT bins the mel filters reach,
    and those filters' rows ``[bins, n_mels]``.

    ``frames @ basis`` equals ``rfft(frames * hann, n=n_fft)`` on those bins. It is one matrix product
    instead of an FFT over all ``n_fft // 2 + 1`` bins: with a 25 ms window at 2 kHz (50 samples) and
    a 25-400 Hz band (96 of 257 bins), about three times faster, and this is the hot loop of a cold cache.
    """
    fb = mel_filterbank(settings.n_fft, settings.sample_rate, settings.n_mels,
                        settings.band_low_hz, settings.band_high_hz, settings.mel_scale)
    used = torch.nonzero(fb.sum(dim=1)).flatten()
    lo, hi = int(used[0]), int(used[-1]) + 1
    win = settings.win_length
    angle = 2 * np.pi * np.arange(win)[:, None] * np.arange(lo, hi)[None, :] / settings.n_fft
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann
    basis = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1) * window[:, None]
    return torch.from_numpy(basis.astype(np.float32)), fb[lo:hi].contiguous()


def log_mel(audio: np.ndarray, settings: FeatureSettings) -> torch.Tensor:
    """Log mel-band power ``[n_mels, ceil(len / hop)]`` of audio already at ``settings.sample_rate``.

    Frame t is the Hann-windowed ``win_length`` samples centred on the hop interval ``[t*hop, (t+1)*hop)``,
    so a recording of exactly W seconds has exactly ``W * frames_per_second`` frames. The window is
    zero-padded to ``n_fft`` for the DFT; the mel bands span the band-pass range, where all the signal is.
    """
    hop, win = settings.hop_length, settings.win_length
    n = len(audio)
    n_frames = -(-n // hop)
    offset = (hop - win) // 2  # start of frame 0 relative to sample 0 (negative: it reaches before the start)
    pad_left = max(0, -offset)
    pad_right = max(0, (n_frames - 1) * hop + offset + win - n)
    mode = "reflect" if max(pad_left, pad_right) < n else "constant"
    padded = np.pad(np.asarray(audio, dtype=np.float32), (pad_left, pad_right), mode=mode)
    frames = torch.from_numpy(padded[offset + pad_left:]).unfold(0, win, hop)[:n_frames]  # [frames, win], a view
    basis, filters = _band_stft(settings)
    spectrum = frames @ basis
    bins = filters.shape[0]
    power = spectrum[:, :bins].square() + spectrum[:, bins:].square()  # [frames, bins]
    return torch.log(power @ filters + _LOG_FLOOR).T.contiguous()


def normalise_bands(features: torch.Tensor) -> torch.Tensor:
    """Z-score each band over the recording.

    Stethoscope, contact pressure and chest wall give each recording its own gain per frequency; after the
    log that is an offset per band, and their spread differs too. Centring and scaling each band leaves the
    model what matters for heart sounds, how energy moves over time within a band (S1/S2 beats, a murmur
    filling systole), and makes recordings from different devices and campaigns comparable.
    """
    centred = features - features.mean(dim=1, keepdim=True)
    std = centred.square().mean(dim=1, keepdim=True).sqrt()  # two passes: ~10x faster than torch.std here
    return centred / std.clamp_min(_STD_FLOOR)


def compute_features(audio: np.ndarray, rate: int, settings: FeatureSettings, source: str = "audio") -> np.ndarray:
    """The whole pipeline for one mono recording: float32 ``[n_mels, frames]``. ``source`` names it in errors.

    Resampling comes before the band-pass so that the filter always runs at the one target rate (designed
    once, and on half the samples for CirCor's 4 kHz); the resampler's own low-pass already removes
    everything above the target's Nyquist frequency.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise DataError(f"{source}: expected mono audio, got shape {audio.shape}")
    if audio.size == 0:
        raise DataError(f"{source}: no audio samples")
    if not np.isfinite(audio).all():
        raise DataError(f"{source}: audio contains NaN or infinite samples")
    x = resample(audio.astype(np.float64, copy=False), int(rate), settings.sample_rate)
    need = _min_samples(settings)
    if len(x) < need:
        seconds = len(audio) / rate
        raise DataError(f"{source}: too short ({seconds * 1000:.0f} ms; need at least "
                        f"{need / settings.sample_rate * 1000:.0f} ms)")
    x = bandpass(x, settings.sample_rate, settings.band_low_hz, settings.band_high_hz, settings.filter_order)
    with torch.no_grad():
        features = normalise_bands(log_mel(x, settings))
    return features.numpy().astype(np.float32, copy=False)


def features_of_file(path: Path, settings: FeatureSettings) -> np.ndarray:
    """Read a WAV and run `compute_features`, without any cache (predicting on a single new file)."""
    rate, audio = wav_io.read_wav(path)
    return compute_features(audio, rate, settings, source=str(path))


# ---------------------------------------------------------------------------------------------- cache
#: An index entry is trusted only if the file's mtime lies this far before the moment it was hashed: file
#: timestamps come from a coarse clock, so a rewrite right after hashing could keep size and mtime (the
#: "racy git" problem). Such entries are hashed again once, after which they are trusted.
_RACY_MARGIN_NS = 100_000_000


class _IndexEntry(NamedTuple):
    size: int
    mtime_ns: int
    content_hash: str
    hashed_ns: int

    def matches(self, st: os.stat_result) -> bool:
        return (st.st_size == self.size and st.st_mtime_ns == self.mtime_ns
                and self.mtime_ns < self.hashed_ns - _RACY_MARGIN_NS)


class _Done(NamedTuple):
    """What a (possibly remote) feature job hands back: an index entry, or the one-line problem.

    ``cache_error`` marks a problem of the cache folder (read-only, full), not of the recording: it stops
    the run whatever the bad-input policy, since skipping would skip every recording.
    """

    path: str
    entry: _IndexEntry | None
    error: str | None
    cache_error: bool = False


def feature_workers() -> int:
    """Processes for filling the cache: one per core, at most 4 (more only contend for the disk)."""
    return min(4, os.cpu_count() or 1)


class FeatureCache:
    """Features for recordings, in ``root``: computed on a miss, memory-mapped on a hit.

    Layout: ``root/index.jsonl`` (path, size, mtime_ns -> content hash, shared by all settings) and
    ``root/<settings.key()>/<content hash>.npy``. Every file is written to a temporary name and renamed, so a
    killed run or two processes filling the same cache never leave a half-written feature file; temporary
    files of an interrupted ``prepare`` are removed (and stray ones from a killed run are ignored, and
    removed once an hour old). Files get the permissions the umask allows, as any other file would. The
    index is an append-only log, one JSON line per hashed file; a lost or stale line only costs a re-hash.
    A cache folder that cannot be written is reported as such (one `DataError` naming it), never as a
    problem of the recording.

    Example::

        cache = FeatureCache(Path("~/.cache/ignite_trainer/features").expanduser(), FeatureSettings())
        usable = cache.prepare(recordings, policy=BadInputPolicy(skip=True), workers=2)
        x = cache.get(usable[0])        # np.memmap float32 [n_mels, frames]
    """

    def __init__(self, root: Path, settings: FeatureSettings) -> None:
        self.root = Path(root)
        self.settings = settings
        self.feature_dir = self.root / settings.key()
        self._index_path = self.root / "index.jsonl"
        self._index: dict[str, _IndexEntry] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_index"] = None  # reloaded on demand: a dataset sent to workers stays small
        return state

    # ------------------------------------------------------------------ public
    def get(self, recording: Recording) -> np.ndarray:
        """``[n_mels, frames]`` in ``settings.feature_dtype``, memory-mapped read-only; computed first on a miss."""
        path = self.feature_path(recording)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):  # deleted or damaged behind our back: compute it again
            path.unlink(missing_ok=True)
            return np.load(self.feature_path(recording), mmap_mode="r")

    def feature_path(self, recording: Recording) -> Path:
        """Where ``recording``'s features lie, computing them first on a miss (DataError if it is unusable)."""
        path = self.cached_path(recording)
        if path is not None:
            return path
        done = _compute_one(_wav_key(recording.wav_path), self.settings, str(self.feature_dir))
        if done.error is not None:
            raise DataError(done.error)
        assert done.entry is not None
        self._remember(done.path, done.entry)
        return self._file_for(done.entry.content_hash)

    def rebuild(self, recording: Recording) -> Path:
        """Compute ``recording``'s features again (its file was deleted or damaged) and return the new path."""
        done = _compute_one(_wav_key(recording.wav_path), self.settings, str(self.feature_dir))
        if done.error is not None:
            raise DataError(done.error)
        assert done.entry is not None
        return self._file_for(done.entry.content_hash)

    def cached_path(self, recording: Recording) -> Path | None:
        """The feature file if the index and the folder already hold it; only ``stat`` calls, never a WAV read."""
        key = _wav_key(recording.wav_path)
        entry = self._load_index().get(key)
        if entry is None:
            return None
        try:
            st = os.stat(key)
        except OSError:
            return None
        if not entry.matches(st):
            return None
        path = self._file_for(entry.content_hash)
        return path if path.exists() else None

    def prepare(
        self, recordings: Iterable[Recording], policy: "BadInputPolicy | None" = None, workers: int = 1,
        progress: bool | None = None,
    ) -> list[Recording]:
        """Make sure every recording has features; return those that do, in the given order.

        Misses are computed with ``workers`` processes. A recording that cannot be used is reported to
        ``policy`` (``None``: strict, the `DataError` propagates) and left out of the result. Filling a
        cold cache takes a while (about a minute for the embedded set on two cores), so it shows a tqdm bar
        with counts, rate and time left: ``progress`` None draws it only when stderr is a terminal (never
        ``\r`` fragments in a log file), True always, False never. A warm cache draws nothing.
        """
        recordings = list(recordings)
        missing = [r for r in recordings if self.cached_path(r) is None]
        failed: set[str] = set()
        jobs = sorted({_wav_key(r.wav_path) for r in missing})
        if not jobs:
            return recordings
        self._remove_stale_temp_files()
        token = secrets.token_hex(4)  # names this call's temporary files, to remove them if it is interrupted
        bar = tqdm(total=len(jobs), desc="feature cache", unit="recording", file=sys.stderr, dynamic_ncols=True,
                   leave=False, disable=None if progress is None else not progress)
        try:
            with bar, contextlib.closing(self._compute_many(jobs, workers, token)) as results:
                for done in results:
                    bar.update(1)
                    if done.cache_error:
                        raise DataError(done.error)
                    if done.error is not None:
                        failed.add(done.path)
                        if policy is None:
                            raise DataError(done.error)
                        policy.report(done.error)  # raises too unless the policy skips
                    else:
                        assert done.entry is not None
                        self._remember(done.path, done.entry)
        except BaseException:
            self._remove_temp_files(f".*.{token}.*{PARTIAL_SUFFIX}")
            raise
        return [r for r in recordings if _wav_key(r.wav_path) not in failed]

    # ------------------------------------------------------------------ computing
    def _compute_many(self, wav_paths: list[str], workers: int, token: str = "") -> Iterator[_Done]:
        if not wav_paths:
            return
        out_dir = str(self.feature_dir)
        if workers <= 1 or len(wav_paths) == 1:
            for p in wav_paths:
                yield _compute_one(p, self.settings, out_dir, token)
            return
        # fork starts workers in milliseconds and shares the imported modules; torch is safe in them with
        # one intra-op thread (the same set-up as DataLoader workers).
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker)
        try:
            chunk = max(1, min(16, len(wav_paths) // (workers * 8)))
            yield from pool.map(_compute_one, wav_paths, [self.settings] * len(wav_paths),
                                [out_dir] * len(wav_paths), [token] * len(wav_paths), chunksize=chunk)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _file_for(self, content_hash: str) -> Path:
        return self.feature_dir / f"{content_hash}.npy"

    def _remove_temp_files(self, pattern: str, older_than_s: float = 0.0) -> None:
        now = time.time()
        for tmp in self.feature_dir.glob(pattern):
            try:
                if now - tmp.stat().st_mtime >= older_than_s:
                    tmp.unlink()
            except OSError:
                pass  # gone already, or not ours to remove: it is ignored either way

    def _remove_stale_temp_files(self) -> None:
        """Temporary files a killed run left: never read (their names are not content hashes); removed
        once an hour old, so that a concurrent run's file being written is left alone."""
        self._remove_temp_files(f".*.npy.*{PARTIAL_SUFFIX}", older_than_s=3600.0)

    # ------------------------------------------------------------------ index
    def _load_index(self) -> dict[str, _IndexEntry]:
        if self._index is None:
            self._index = {}
            lines = 0
            try:
                with open(self._index_path, encoding="utf-8") as f:
                    for line in f:
                        lines += 1
                        try:
                            d = json.loads(line)
                            self._index[d["path"]] = _IndexEntry(d["size"], d["mtime_ns"], d["hash"], d["hashed_ns"])
                        except (ValueError, KeyError, TypeError):
                            continue  # a line cut short by a killed writer
            except FileNotFoundError:
                pass
            except OSError as e:  # the cache root is a file, or cannot be read
                raise DataError(f"{self.root}: cannot use this folder as the feature cache "
                                f"({e.strerror or e}); choose another --cache-dir") from None
            if lines > 2 * len(self._index) + 1000:
                self._compact()
        return self._index

    def _remember(self, wav_key: str, entry: _IndexEntry) -> None:
        index = self._load_index()
        if index.get(wav_key) == entry:
            return
        index[wav_key] = entry
        line = json.dumps({"path": wav_key, "size": entry.size, "mtime_ns": entry.mtime_ns,
                           "hash": entry.content_hash, "hashed_ns": entry.hashed_ns}) + "\n"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # One write() with O_APPEND: lines from concurrent processes do not interleave on a local disk.
            fd = os.open(self._index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        except OSError as e:
            raise DataError(f"{self._index_path}: cannot write the feature cache index ({e.strerror or e}); "
                            "free space or choose another --cache-dir") from None

    def _compact(self) -> None:
        assert self._index is not None
        text = "".join(
            json.dumps({"path": k, "size": e.size, "mtime_ns": e.mtime_ns, "hash": e.content_hash,
                        "hashed_ns": e.hashed_ns}) + "\n"
            for k, e in self._index.items()
        )
        _write_entry(self._index_path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- job helpers
def _wav_key(path: Path | str) -> str:
    return os.path.abspath(os.fspath(path))


def _init_worker() -> None:
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group; the parent alone handles it (stops the pool, removes the
    # temporary files), so a worker is never interrupted half-way through writing one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _compute_one(wav_path: str, settings: FeatureSettings, out_dir: str, token: str = "") -> _Done:
    """Hash one WAV and, unless its features already exist, compute and store them. Runs in pool workers."""
    try:
        hashed_ns = time.time_ns()
        st = os.stat(wav_path)  # before reading: a change after this shows up as a different mtime later
        with open(wav_path, "rb") as f:
            data = f.read()
        content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
        target = Path(out_dir) / f"{content_hash}.npy"
        features = None if target.exists() else features_of_file(Path(wav_path), settings)
    except DataError as e:
        message = str(e)
        return _Done(wav_path, None, message if wav_path in message else f"{wav_path}: {message}")
    except OSError as e:
        return _Done(wav_path, None, f"{wav_path}: cannot read ({e.strerror or e})")
    if features is not None:
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            _write_entry(target, _npy_bytes(features, settings.feature_dtype), token)
        except OSError as e:
            return _Done(wav_path, None, f"{out_dir}: cannot write the feature cache ({e.strerror or e}); "
                                         "free space or choose another --cache-dir", cache_error=True)
    return _Done(wav_path, _IndexEntry(st.st_size, st.st_mtime_ns, content_hash, hashed_ns), None)


def _npy_bytes(array: np.ndarray, dtype: str = "float32") -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.dtype(dtype)))
    return buffer.getvalue()


def _write_entry(target: Path, data: bytes, token: str = "") -> None:
    """Write a cache file through `atomic_write` (readers see all of it or none); ``token`` tags its temp
    name, so that an interrupted `FeatureCache.prepare` can remove exactly its own leftovers. No fsync:
    a cache file lost to a power cut is simply computed again."""
    with atomic_write(target, "wb", durable=False, tag=token) as f:
        f.write(data)

