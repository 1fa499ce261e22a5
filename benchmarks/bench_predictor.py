"""Latency of `Predictor.predict_patient` per patient, on a CirCor-like synthetic set; prints one table.

    python benchmarks/bench_predictor.py                       # 20 patients, 2 threads, default features
    python benchmarks/bench_predictor.py --model runs/quick --patients 40 --threads 1

What a Challenge entry pays per patient: the recordings arrive as 16-bit arrays with the patient's text,
and `predict_patient` computes the features in memory (resample, band-pass, log-mel), runs the model over
every window, aggregates and decides. Without ``--model`` the default model and feature settings are used
with untrained weights (latency does not depend on the weights). Rows: one model, and an ensemble of
``--members`` copies (the features are computed once per feature setting, the model runs once per member).
One warm-up patient is left out of the figures. Wall-clock per patient, ``torch.set_num_threads(threads)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.io import wavfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite_trainer import (FeatureSettings, Predictor, TrainConfig, build_model,  # noqa: E402
                            challenge_recordings, load_trained_model, write_synthetic)
from ignite_trainer.use.model_files import TrainedModel  # noqa: E402


def untrained(config: TrainConfig) -> TrainedModel:
    torch.manual_seed(0)
    model = build_model(config.model, n_mels=config.n_mels).eval()
    return TrainedModel(model=model, config=config, settings=FeatureSettings.from_config(config),
                        thresholds={"heart": 0.5, "murmur": 0.5}, thresholds_tuned=False, source=Path("untrained"),
                        run_dir=None, epoch=None)


def load_patients(folder: Path) -> list[tuple[str, list, float]]:
    """(metadata text, recordings as the Challenge's loader gives them, seconds of audio) per patient."""
    patients = []
    for txt in sorted((folder / "training_data").glob("*.txt")):
        text = txt.read_text()
        lines = text.splitlines()
        arrays = [wavfile.read(folder / "training_data" / line.split()[2])[1]
                  for line in lines[1:1 + int(lines[0].split()[1])]]
        recordings = challenge_recordings(text, arrays)
        patients.append((text, recordings, sum(len(a) / rate for a, rate, _ in recordings)))
    return patients


def measure(predictor: Predictor, patients: list) -> list[float]:
    text, recordings, _ = patients[0]
    predictor.predict_patient(recordings, text)  # warm-up: filter designs, mel bank, first allocations
    times = []
    for text, recordings, _ in patients[1:]:
        start = time.perf_counter()
        predictor.predict_patient(recordings, text)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="run directory, checkpoint or safetensors [untrained default]")
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    member = load_trained_model(args.model) if args.model else untrained(TrainConfig())
    with tempfile.TemporaryDirectory() as tmp:
        patients = load_patients(write_synthetic(Path(tmp) / "data", args.patients + 1, args.seed))
    audio = statistics.mean(s for _, _, s in patients[1:])
    recs = statistics.mean(len(r) for _, r, _ in patients[1:])

    cfg = member.config
    print(f"{len(patients) - 1} patients, {recs:.1f} recordings and {audio:.1f} s of audio each on average; "
          f"{args.threads} torch thread(s); model {cfg.model}, {cfg.n_mels} mels at {cfg.sample_rate} Hz, "
          f"{cfg.window_seconds:g} s windows")
    print("| predictor | median ms/patient | p90 ms | max ms | x real time (median) |")
    print("|---|---|---|---|---|")
    for name, predictor in (("one model", Predictor([member])),
                            (f"ensemble of {args.members}", Predictor([member] * args.members))):
        times = np.array(measure(predictor, patients)) * 1000
        median = float(np.median(times))
        print(f"| {name} | {median:.0f} | {np.percentile(times, 90):.0f} | {times.max():.0f} | "
              f"{audio / (median / 1000):.0f}x |")


if __name__ == "__main__":
    main()
