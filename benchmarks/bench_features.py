"""Feature extraction speed and memory on a CirCor-sized synthetic set; prints one table.

    python benchmarks/bench_features.py --data /tmp/circor-bench            # ~940 patients, generated once
    python benchmarks/bench_features.py --data /tmp/circor-small --patients 40

Measures, with ``--workers`` processes (default 2, the CI machine's cores):
  cold    an empty feature cache: hash, decode, resample, band-pass, log-mel, write every recording;
  cached  a new `FeatureCache` (as a new run would start): ``prepare`` again, then read every feature
          file once in full, and one training epoch of crops through `TrainWindows`; every ``open()``
          of a ``.wav`` path is counted through Python's audit hook, and every ``read_wav`` call.
Throughput is audio seconds per wall second ("x real time"). Targets: cold >= 2000x, cached epoch opens
no WAV, peak RSS < 1.5 GB. WAV files may sit in the page cache from generation; "cold" means an
empty feature cache, not a cold disk.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite_trainer.data import wav as wav_io  # noqa: E402
from ignite_trainer.data.bad_input import BadInputPolicy  # noqa: E402
from ignite_trainer.data.datasets import TrainWindows  # noqa: E402
from ignite_trainer.data.features import FeatureCache, FeatureSettings  # noqa: E402
from ignite_trainer.data.readers import read_recordings  # noqa: E402
from ignite_trainer.data.synthetic import write_synthetic  # noqa: E402

TARGET_SPEED = 2000.0
TARGET_RSS_GB = 1.5

_wav_opens: list[str] = []
_watching = False


def _audit(event: str, args: tuple) -> None:
    if _watching and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.fsdecode(args[0]).lower().endswith(".wav"):
            _wav_opens.append(os.fsdecode(args[0]))


def _count_read_wav() -> list[str]:
    calls: list[str] = []
    original = wav_io.read_wav

    def counting(path):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return original(path)

    wav_io.read_wav = counting  # features.py calls it through the module, so this sees every call
    return calls


def _peak_rss_gb() -> tuple[float, float]:
    """(this process, the largest child process): ru_maxrss is in KiB on Linux."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return own, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ignite_trainer_bench_circor",
                        help="synthetic CirCor-format folder: reused if it exists, generated otherwise")
    parser.add_argument("--patients", type=int, default=940, help="patients to generate (CirCor has 942)")
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: a temporary one, removed)")
    args = parser.parse_args()

    if not (args.data / "training_data.csv").is_file():
        print(f"generating {args.patients} synthetic patients in {args.data} ...", flush=True)
        t = time.perf_counter()
        write_synthetic(args.data, args.patients, args.seed, fmt="circor2022")
        print(f"  generated in {time.perf_counter() - t:.0f} s", flush=True)
    recordings = read_recordings(args.data, "circor2022", unknown_murmur="mask", policy=BadInputPolicy(skip=True))
    seconds = [n / rate for rate, n in (wav_io.wav_info(r.wav_path) for r in recordings)]
    audio_s = float(sum(seconds))
    n_patients = len({r.patient_id for r in recordings})

    cache_dir = args.cache or Path(tempfile.mkdtemp(prefix="ignite_trainer_bench_cache_"))
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise SystemExit(f"{cache_dir}: not empty; the cold measurement needs an empty cache folder")
    settings = FeatureSettings()
    torch.set_num_threads(1)  # the parent only dispatches; the workers do the work
    try:
        t = time.perf_counter()
        usable = FeatureCache(cache_dir, settings).prepare(recordings, workers=args.workers)
        cold_s = time.perf_counter() - t
        cache_bytes = sum(p.stat().st_size for p in cache_dir.rglob("*.npy"))

        global _watching
        read_calls = _count_read_wav()
        sys.addaudithook(_audit)
        _watching = True
        t = time.perf_counter()
        cache = FeatureCache(cache_dir, settings)
        usable = cache.prepare(recordings, workers=args.workers)
        checksum = 0.0
        for r in usable:
            features = cache.get(r)
            checksum += float(np.asarray(features).sum())
            del features  # unmap: a mapped page counts towards RSS
        cached_s = time.perf_counter() - t
        t = time.perf_counter()
        crops = TrainWindows(usable, cache, window_seconds=4.0)
        for i in range(len(crops)):
            crops[i]
        epoch_s = time.perf_counter() - t
        _watching = False
        own_gb, child_gb = _peak_rss_gb()
    finally:
        if args.cache is None:
            shutil.rmtree(cache_dir, ignore_errors=True)

    speed_cold, speed_cached = audio_s / cold_s, audio_s / cached_s
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    print()
    print(f"data: {args.data}  {n_patients} patients, {len(recordings)} recordings, {audio_s / 3600:.1f} h audio "
          f"(mean {np.mean(seconds):.1f} s, {min(seconds):.1f}-{max(seconds):.1f} s); usable {len(usable)}")
    print(f"settings: {settings}  workers={args.workers}  cpus={os.cpu_count()}  torch threads/worker=1")
    print(f"feature cache: {cache_bytes / 2**30:.2f} GiB")
    print()
    rows = [
        ("cold prepare (empty cache)", f"{cold_s:.1f} s", f"{speed_cold:,.0f}x", f">= {TARGET_SPEED:,.0f}x",
         ok(speed_cold >= TARGET_SPEED)),
        ("cached prepare + read all", f"{cached_s:.1f} s", f"{speed_cached:,.0f}x", "-", ""),
        ("cached TrainWindows epoch", f"{epoch_s:.2f} s", f"{len(crops) / epoch_s:,.0f} crops/s", "-", ""),
        ("WAV opens while cached", f"{len(_wav_opens)} open(), {len(read_calls)} read_wav", "", "0",
         ok(not _wav_opens and not read_calls)),
        ("peak RSS main / worker", f"{own_gb:.2f} / {child_gb:.2f} GiB", "", f"< {TARGET_RSS_GB} GB",
         ok(max(own_gb, child_gb) * 2**30 < TARGET_RSS_GB * 1e9)),
    ]
    widths = [max(len(str(r[i])) for r in rows + [("measure", "value", "speed", "target", "")]) for i in range(5)]
    header = ("measure", "value", "speed", "target", "")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"\n(checksum {checksum:.3f})")


if __name__ == "__main__":
    main()
