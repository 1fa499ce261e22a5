"""Synthetic heart-sound recordings, written byte for byte in the CirCor 2022 (or PhysioNet 2016) layout.

No real recording can be downloaded where this project runs, so the embedded dataset is generated. The same
readers that load real data load it, so it exercises every path of the pipeline; and it follows the published
signal facts of heart sounds closely enough that a model has to learn the same things it would on real data:

* heart sounds: S1 (decaying ~50/150 Hz components plus a 20->100 Hz sweep), S2 (A2 and P2 downward chirps),
  age-dependent heart rate with beat jitter and breathing modulation, systole shrinking with heart rate;
* murmurs, only at the patient's listed ``Murmur locations``: innocent (musical vibratory, soft ejection),
  pathological harsh systolic, early-diastolic blowing, mid-diastolic rumble, each with its timing window,
  envelope, band and grade;
* other cues of an abnormal heart that carry no murmur (S3 gallop, wide S2 split, irregular rhythm), so that
  the ``heart`` label is learnable and yet not a copy of ``murmur``; 8 % of outcomes are flipped (label noise);
* noise: coloured background at a range of SNRs, friction spikes, breathing, drift, mains hum; ``Unknown``
  murmur patients are the faint or very noisy ones.

Every patient draws from its own generator seeded by ``(seed, patient index)`` (and each recording from
``(seed, patient index, recording number)``), so any subset of patients can be generated, in any order or in
parallel, and the same seed always gives the same bytes.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import fft as sfft
from tqdm import tqdm

from ignite_trainer.core.atomic import atomic_directory, swap_directory
from ignite_trainer.core.config import MAX_SEED, MAX_SYNTHETIC_PATIENTS
from ignite_trainer.data.wav import write_wav
from ignite_trainer.core.errors import ConfigError, DataError
from ignite_trainer.core.vocabulary import FORMATS

CIRCOR_RATE = 4000
PHYSIONET_RATE = 2000

# ---------------------------------------------------------------------------------------------- patient model
AGE_GROUPS = ("Child", "Infant", "Adolescent", "Neonate", None)  # None: CirCor's adults (mostly pregnant), age nan
AGE_PROBS = (0.705, 0.134, 0.076, 0.006, 0.079)
HEART_RATE_BPM = {"Neonate": (110, 170), "Infant": (100, 165), "Child": (70, 140), "Adolescent": (55, 100),
                  None: (60, 100)}
BODY_SIZE = {  # (height cm, sd), (weight kg, sd)
    "Neonate": ((50, 3), (3.3, 0.5)), "Infant": ((66, 8), (7.0, 2.0)), "Child": ((118, 18), (23, 8)),
    "Adolescent": ((160, 10), (52, 11)), None: ((160, 7), (66, 10)),
}
#: Patient murmur classes, near CirCor's 179 Present / 68 Unknown / 695 Absent of 942.
MURMUR_CLASS_PROBS = {"Present": 0.19, "Unknown": 0.07, "Absent": 0.74}
#: Chance of a non-murmur cue of an abnormal heart, chosen so that ~48 % of outcomes are Abnormal as in CirCor.
CUE_PROB = {"innocent": 0.20, "pathological": 0.40, "Unknown": 0.40, "Absent": 0.40}
CUES = ("s3", "wide_split", "irregular")
CUE_PROBS = (0.45, 0.35, 0.20)
OUTCOME_LABEL_NOISE = 0.08

#: Chance of an abnormal heart with no acoustic sign (structural disease found by echocardiography), by age
#: group: congenital disease shows early, so a young age is itself a risk (``hard`` sets only).
SILENT_ABNORMAL_BY_AGE = {"Neonate": 0.30, "Infant": 0.20, "Child": 0.06, "Adolescent": 0.04, None: 0.02}
#: Factor on `CUE_PROB` by age group: acoustic signs of disease are commoner the younger the patient
#: (``hard`` sets only).
CUE_AGE_FACTOR = {"Neonate": 1.6, "Infant": 1.35, "Child": 0.95, "Adolescent": 0.7, None: 0.5}
#: Age groups in which an abnormal heart holds weight back (failure to thrive; ``hard`` sets only).
POOR_GROWTH_AGES = ("Neonate", "Infant", "Child")


@dataclass(frozen=True)
class Difficulty:
    """The knobs that make a synthetic set easier or harder to learn; ``DIFFICULTIES`` names the two offered.

    ``default`` reproduces the original generator byte for byte. ``hard`` lowers murmur grades, adds noise,
    makes ``Unknown`` twice as common (faint, noisy or partial recordings: the reasons a clinician could not
    decide), shifts murmurs towards innocent ones, and ties the outcome to age and growth as in real data.
    """

    name: str
    murmur_class_probs: dict[str, float]
    pathological_share: float  # of Present murmurs
    pregnant_pathological_share: float  # of Present murmurs in pregnancy (flow murmurs are innocent)
    innocent_grade_probs: tuple[float, float]  # I/VI, II/VI
    systolic_grade_probs: tuple[float, float, float]  # I/VI, II/VI, III/VI
    diastolic_grade_probs: tuple[float, float, float]  # I/IV, II/IV, III/IV
    unknown_profiles: dict[str, float]  # faint / noisy / partial
    noisy_share: float  # of recordings of a patient without a quality problem
    clean_snr_db: tuple[float, float]
    noisy_snr_db: tuple[float, float]
    age_linked_outcome: bool
    #: A murmur's written pitch sets its frequency band (systolic murmurs, innocent ones included); without it
    #: only the diastolic murmurs' pitch is heard and a systolic murmur's pitch is a label the signal lacks.
    pitch_in_band: bool = False
    #: Bumped whenever the set's bytes change, so a cached set of an older revision is never reused.
    revision: int = 1


DIFFICULTIES = {
    "default": Difficulty("default", dict(MURMUR_CLASS_PROBS), 0.58, 0.58, (0.45, 0.55), (0.15, 0.45, 0.4),
                          (0.35, 0.45, 0.2), {"faint": 0.5, "noisy": 0.5}, 0.08, (20.0, 35.0), (0.0, 10.0), False),
    "hard": Difficulty("hard", {"Present": 0.19, "Unknown": 0.14, "Absent": 0.67}, 0.35, 0.1, (0.7, 0.3),
                       (0.4, 0.45, 0.15), (0.6, 0.35, 0.05), {"faint": 0.35, "noisy": 0.35, "partial": 0.3},
                       0.15, (10.0, 28.0), (-2.0, 8.0), True, pitch_in_band=True, revision=2),
}
#: With ``pitch_in_band``: a systolic murmur's band (Hz) by its pitch, and an innocent vibratory murmur's
#: fundamental range (Hz) by its pitch.
PITCH_BANDS = {"Low": (30.0, 120.0), "Medium": (55.0, 230.0), "High": (140.0, 420.0)}
VIBRATORY_F0 = {"Low": (60.0, 85.0), "Medium": (100.0, 130.0)}

SYSTOLIC_WINDOWS = {"Early-systolic": (0.0, 0.4), "Mid-systolic": (0.25, 0.75), "Late-systolic": (0.6, 1.0),
                    "Holosystolic": (0.0, 1.0)}
DIASTOLIC_WINDOWS = {"Early-diastolic": (0.0, 0.45), "Mid-diastolic": (0.3, 0.75), "Holodiastolic": (0.0, 1.0)}
#: Murmur peak amplitude as a fraction of S1's (auscultation grades I/II/III are roughly 0.1/0.2/0.35 x S1).
GRADE_AMPLITUDE = {"I/VI": 0.10, "II/VI": 0.20, "III/VI": 0.35, "I/IV": 0.10, "II/IV": 0.20, "III/IV": 0.30}
MURMUR_FIELDS = ("timing", "shape", "grading", "pitch", "quality")


@dataclass(frozen=True)
class Murmur:
    """One murmur as the clinician describes it (CirCor's fields) and as it is synthesized."""

    kind: str  # innocent_vibratory, innocent_ejection, pathological, early_diastolic, rumble
    phase: str  # "systole" or "diastole"
    timing: str
    shape: str  # Plateau, Diamond, Crescendo, Decrescendo
    grading: str
    pitch: str
    quality: str
    amplitude: float  # envelope peak relative to S1's peak
    band: tuple[float, float]  # Hz
    f0_range: tuple[float, float] = (80.0, 115.0)  # Hz, the fundamental of a musical (vibratory) murmur


@dataclass(frozen=True)
class PlannedRecording:
    name: str  # e.g. "1234_MV_1"
    location: str
    duration_s: float


@dataclass(frozen=True)
class SyntheticPatient:
    """Everything drawn for one patient: what is written to ``<pid>.txt`` and what drives the signal."""

    index: int
    patient_id: str
    age: str | None
    sex: str
    height: float | None
    weight: float | None
    pregnant: bool
    campaign: str
    additional_id: str | None
    heart_rate: float
    murmur: str  # the label written: Present / Absent / Unknown
    murmurs: tuple[Murmur, ...]  # what is synthesized; for Unknown patients faint or hidden in noise
    murmur_locations: tuple[str, ...]  # where the murmurs are synthesized
    most_audible: str | None
    cues: tuple[str, ...]  # non-murmur signs of an abnormal heart
    s3_gain: float  # 0, or S3 amplitude relative to S1 (a gallop, or a faint physiological S3)
    abnormal: bool  # the true state
    outcome: str  # the label written (with label noise): Abnormal / Normal
    noise_profile: str  # "clean" (a few noisy recordings), "faint", "noisy" or "partial" (the Unknown murmurs)
    recordings: tuple[PlannedRecording, ...]
    difficulty: str = "default"

    @property
    def locations(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.location for r in self.recordings))


def sample_patient(seed: int, index: int, difficulty: str = "default") -> SyntheticPatient:
    """Draw patient ``index`` of the dataset with ``seed``; independent of every other patient."""
    profile = _difficulty(difficulty)
    rng = np.random.default_rng([seed, index])
    patient_id = str(1000 + 90 * index + int(rng.integers(0, 90)))
    age = AGE_GROUPS[rng.choice(len(AGE_GROUPS), p=AGE_PROBS)]
    pregnant = age is None and rng.random() < 0.6
    sex = "Female" if pregnant else str(rng.choice(["Female", "Male"]))
    (h_mean, h_sd), (w_mean, w_sd) = BODY_SIZE[age]
    height = _measured(rng, h_mean, h_sd, 0.6, 1.4)
    weight = _measured(rng, w_mean, w_sd, 0.5, 1.8)
    lo, hi = HEART_RATE_BPM[age]
    heart_rate = float(np.clip(rng.normal((lo + hi) / 2, (hi - lo) / 5), lo, hi))
    recordings = _plan_recordings(rng, patient_id)
    locations = tuple(dict.fromkeys(r.location for r in recordings))

    classes = profile.murmur_class_probs
    murmur = str(rng.choice(list(classes), p=list(classes.values())))
    murmurs: tuple[Murmur, ...] = ()
    noise_profile = "clean"
    pathological = False
    if murmur == "Present":
        pathological = rng.random() < (profile.pregnant_pathological_share if pregnant else profile.pathological_share)
        murmurs = _pathological_murmurs(rng, profile) if pathological else (_innocent_murmur(rng, profile),)
        cue_group = "pathological" if pathological else "innocent"
    elif murmur == "Unknown":
        if len(profile.unknown_profiles) == 2:  # the original two-way draw, kept for byte-identical sets
            noise_profile = "faint" if rng.random() < profile.unknown_profiles["faint"] else "noisy"
        else:
            noise_profile = str(rng.choice(list(profile.unknown_profiles), p=list(profile.unknown_profiles.values())))
        if noise_profile == "faint" or rng.random() < 0.5:
            pathological = rng.random() < 0.5
            murmurs = _pathological_murmurs(rng, profile) if pathological else (_innocent_murmur(rng, profile),)
            if noise_profile == "faint":
                murmurs = tuple(_faint(m, rng) for m in murmurs)
        cue_group = "Unknown"
    else:
        cue_group = "Absent"
    murmur_locations: tuple[str, ...] = ()
    most_audible = None
    if murmurs:
        k = int(rng.integers(1, len(locations) + 1))
        if pathological:
            k = max(k, math.ceil(len(locations) / 2))
        murmur_locations = tuple(sorted(rng.choice(locations, size=k, replace=False).tolist()))
        most_audible = str(rng.choice(murmur_locations))

    cues: tuple[str, ...] = ()
    cue_factor = CUE_AGE_FACTOR[age] if profile.age_linked_outcome else 1.0
    if rng.random() < CUE_PROB[cue_group] * cue_factor:
        first = str(rng.choice(CUES, p=CUE_PROBS))
        second = str(rng.choice(CUES, p=CUE_PROBS)) if rng.random() < 0.2 else first
        cues = tuple(c for c in CUES if c in (first, second))
    if "s3" in cues:
        s3_gain = float(rng.uniform(0.3, 0.5))
    else:
        s3_gain = float(rng.uniform(0.08, 0.14)) if age in ("Child", "Adolescent") and rng.random() < 0.05 else 0.0
    abnormal = pathological or bool(cues)
    if profile.age_linked_outcome:
        abnormal = abnormal or bool(rng.random() < SILENT_ABNORMAL_BY_AGE[age])
        if abnormal and age in POOR_GROWTH_AGES and weight is not None:
            weight = round(weight * float(rng.uniform(0.72, 0.9)), 1)
    abnormal_label = abnormal != (rng.random() < OUTCOME_LABEL_NOISE)  # clinicians' outcomes are not noise-free
    return SyntheticPatient(
        index=index, patient_id=patient_id, age=age, sex=sex, height=height, weight=weight, pregnant=pregnant,
        campaign="CC2014" if rng.random() < 0.7 else "CC2015",
        additional_id=str(int(rng.integers(10000, 90000))) if rng.random() < 0.03 else None,
        heart_rate=heart_rate, murmur=murmur, murmurs=murmurs, murmur_locations=murmur_locations,
        most_audible=most_audible, cues=cues, s3_gain=s3_gain, abnormal=abnormal,
        outcome="Abnormal" if abnormal_label else "Normal", noise_profile=noise_profile, recordings=recordings,
        difficulty=profile.name,
    )


def _difficulty(name: str) -> Difficulty:
    if name not in DIFFICULTIES:
        raise ConfigError(f"difficulty={name!r} is not one of: {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name]


def _measured(rng: np.random.Generator, mean: float, sd: float, low: float, high: float) -> float | None:
    """A body measurement within [low, high] x mean, or None (``nan``) as for ~8 % of CirCor's patients."""
    if rng.random() < 0.08:
        return None
    return round(float(np.clip(rng.normal(mean, sd), low * mean, high * mean)), 1)


def _plan_recordings(rng: np.random.Generator, patient_id: str) -> tuple[PlannedRecording, ...]:
    """1-4 locations in CirCor's order, an occasional Phc, and occasional ``_1``/``_2`` repeats."""
    pool = ["AV", "PV", "TV", "MV"] + (["Phc"] if rng.random() < 0.04 else [])
    n_locations = int(rng.choice([1, 2, 3, 4], p=[0.11, 0.15, 0.17, 0.57]))
    chosen = sorted(rng.choice(len(pool), size=min(n_locations, len(pool)), replace=False).tolist())
    plan = []
    for location in (pool[i] for i in chosen):
        repeats = 0 if rng.random() >= 0.05 else (2 if rng.random() < 0.15 else 1)
        for r in range(repeats + 1):
            suffix = f"_{r}" if r else ""
            duration = float(5.0 + 35.0 * rng.beta(2.3, 2.1))
            plan.append(PlannedRecording(f"{patient_id}_{location}{suffix}", location, round(duration, 3)))
    return tuple(plan)


def _innocent_murmur(rng: np.random.Generator, profile: Difficulty = DIFFICULTIES["default"]) -> Murmur:
    amp = float(rng.uniform(0.95, 1.15))
    grading = str(rng.choice(["I/VI", "II/VI"], p=list(profile.innocent_grade_probs)))
    if rng.random() < 0.6:  # Still's murmur: musical, vibratory
        timing = str(rng.choice(["Early-systolic", "Mid-systolic"], p=[0.55, 0.45]))
        shape = "Decrescendo" if timing == "Early-systolic" else "Diamond"
        pitch = str(rng.choice(["Low", "Medium"]))
        f0 = VIBRATORY_F0[pitch] if profile.pitch_in_band else (80.0, 115.0)
        return Murmur("innocent_vibratory", "systole", timing, shape, grading, pitch,
                      "Musical", amp * GRADE_AMPLITUDE[grading], (72.0, 161.0), f0)
    timing = str(rng.choice(["Mid-systolic", "Early-systolic"], p=[0.75, 0.25]))
    pitch = str(rng.choice(["Low", "Medium"]))
    band = PITCH_BANDS[pitch] if profile.pitch_in_band else (60.0, 142.0)
    return Murmur("innocent_ejection", "systole", timing, "Diamond", grading, pitch,
                  "Blowing", amp * GRADE_AMPLITUDE[grading], band)


def _pathological_murmurs(rng: np.random.Generator,
                          profile: Difficulty = DIFFICULTIES["default"]) -> tuple[Murmur, ...]:
    """A harsh systolic murmur, a diastolic one, or both (diastolic murmurs are rare, as in CirCor)."""
    roll = rng.random()
    murmurs = []
    if roll < 0.92:
        timing = str(rng.choice(list(SYSTOLIC_WINDOWS), p=[0.1, 0.25, 0.15, 0.5]))
        shape = {"Early-systolic": "Decrescendo", "Mid-systolic": "Diamond", "Late-systolic": "Crescendo",
                 "Holosystolic": str(rng.choice(["Plateau", "Diamond"], p=[0.7, 0.3]))}[timing]
        grading = str(rng.choice(["I/VI", "II/VI", "III/VI"], p=list(profile.systolic_grade_probs)))
        pitch = str(rng.choice(["Medium", "High"]))
        if profile.pitch_in_band:
            band = PITCH_BANDS[pitch]
        else:
            band = (52.0, 300.0) if pitch == "Medium" else (70.0, 360.0)
        murmurs.append(Murmur("pathological", "systole", timing, shape, grading, pitch,
                              str(rng.choice(["Harsh", "Blowing"], p=[0.7, 0.3])),
                              float(rng.uniform(0.95, 1.15)) * GRADE_AMPLITUDE[grading], band))
    if roll >= 0.82:
        grading = str(rng.choice(["I/IV", "II/IV", "III/IV"], p=list(profile.diastolic_grade_probs)))
        amp = float(rng.uniform(0.95, 1.15)) * GRADE_AMPLITUDE[grading]
        if rng.random() < 0.65:  # aortic/pulmonary regurgitation
            murmurs.append(Murmur("early_diastolic", "diastole", "Early-diastolic", "Decrescendo", grading, "High",
                                  "Blowing", amp, (250.0, 450.0)))
        else:  # mitral/tricuspid stenosis
            murmurs.append(Murmur("rumble", "diastole", "Mid-diastolic", "Plateau", grading, "Low", "Harsh", amp,
                                  (30.0, 140.0)))
    return tuple(murmurs)


def _faint(murmur: Murmur, rng: np.random.Generator) -> Murmur:
    """Below grade I: the clinician could not decide whether it was there."""
    return Murmur(murmur.kind, murmur.phase, murmur.timing, murmur.shape, murmur.grading, murmur.pitch, murmur.quality,
                  float(rng.uniform(0.03, 0.06)), murmur.band, murmur.f0_range)


# ---------------------------------------------------------------------------------------------- signal
@dataclass(frozen=True)
class Beats:
    """Sample indices of each complete or partial beat's events, in the order of the cardiac cycle."""

    onset: np.ndarray  # S1 onset
    s1_end: np.ndarray
    s2_start: np.ndarray
    s2_end: np.ndarray
    next_onset: np.ndarray
    split: np.ndarray  # A2-P2 split, seconds
    amplitude: np.ndarray  # S1 amplitude (breathing-modulated)


def synthesize_recording(patient: SyntheticPatient, number: int, seed: int,
                         rate: int = CIRCOR_RATE) -> tuple[np.ndarray, list[tuple[float, float, int]]]:
    """Render recording ``number`` of ``patient``: int16 samples and its segmentation rows (start s, end s, state)."""
    plan = patient.recordings[number]
    rng = np.random.default_rng([seed, patient.index, number + 1])
    n = int(round(plan.duration_s * rate))
    pad = int(0.7 * rate)  # room for the events of the last beat, cut off at the end
    breath_hz = float(rng.uniform(0.25, 0.75))
    breath_phase = float(rng.uniform(0, 2 * np.pi))
    beats = _beat_events(rng, patient, n, rate, breath_hz, breath_phase)

    s1_gain, s2_gain = _location_gains(rng, plan.location)
    heart = np.zeros(n + pad)
    _add_s1(heart, rng, beats, rate, s1_gain, irregular="irregular" in patient.cues)
    _add_s2(heart, rng, beats, rate, s2_gain)
    if patient.s3_gain > 0:
        s3_location_gain = 1.0 if plan.location in ("MV", "TV") else 0.75
        _add_s3(heart, rng, beats, rate, patient.s3_gain * s3_location_gain * s1_gain)
    if plan.location in patient.murmur_locations:
        location_gain = 1.0 if plan.location == patient.most_audible else float(rng.uniform(0.7, 1.0))
        for murmur in patient.murmurs:
            heart += _murmur(rng, murmur, beats, n + pad, rate) * (murmur.amplitude * location_gain * s1_gain)
    heart = heart[:n]

    heart_rms = _rms(heart)
    if patient.noise_profile == "partial":
        heart = heart * _contact(rng, n, rate)
    signal = heart + _noise(rng, patient, n, rate, heart_rms, breath_hz, breath_phase)
    peak = float(np.max(np.abs(signal))) or 1.0
    samples = np.round(signal * (float(rng.uniform(0.3, 0.9)) * 32767 / peak)).astype(np.int16)
    return samples, _segments(beats, n, rate)


def _contact(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
    """Gain of the heart sounds when the stethoscope keeps losing contact: 1-3 stretches covering 30-60 % of
    the recording where they fall to 2-10 %, with 50 ms ramps (the noise stays: it is picked up anyway)."""
    gain = np.ones(n)
    lost = float(rng.uniform(0.3, 0.6)) * n
    pieces = int(rng.integers(1, 4))
    for width in rng.dirichlet(np.ones(pieces)) * lost:
        width = int(width)
        start = int(rng.integers(0, max(n - width, 1)))
        gain[start:start + width] = np.minimum(gain[start:start + width], float(rng.uniform(0.02, 0.1)))
    ramp = max(1, int(0.05 * rate))
    return np.convolve(gain, np.ones(ramp) / ramp, mode="same")


def _beat_events(rng: np.random.Generator, patient: SyntheticPatient, n: int, rate: int,
                 breath_hz: float, breath_phase: float) -> Beats:
    """Beat timing: jittered RR with respiratory sinus arrhythmia; systole shortens as the heart rate rises."""
    period = 60.0 / (patient.heart_rate * rng.uniform(0.96, 1.04))
    jitter = rng.uniform(0.15, 0.28) if "irregular" in patient.cues else rng.uniform(0.02, 0.05)
    duration = n / rate
    n_max = int(duration / period * 1.7) + 4
    rr = period * np.clip(1 + jitter * rng.standard_normal(n_max), 0.55, 1.8)
    start = rng.uniform(0.05, 0.9) * period
    onsets = start + np.concatenate([[0.0], np.cumsum(rr[:-1])])
    rr = rr * (1 + 0.04 * np.sin(2 * np.pi * breath_hz * onsets + breath_phase))
    onsets = start + np.concatenate([[0.0], np.cumsum(rr[:-1])])
    keep = onsets < duration - 0.05
    onsets, rr = onsets[keep], rr[keep]

    beat_hr = 60.0 / rr
    s1s2 = np.minimum(np.clip(0.541 - 0.0022 * beat_hr - 0.040, 0.15, 0.45), 0.5 * rr)
    d1 = np.minimum(np.clip(rng.normal(0.116, 0.02), 0.075, 0.16) * (1 + 0.05 * rng.standard_normal(len(rr))),
                    0.55 * s1s2)
    breathing = np.sin(2 * np.pi * breath_hz * (onsets + s1s2) + breath_phase)
    if "wide_split" in patient.cues:
        split = rng.uniform(0.045, 0.075) + 0.005 * breathing
    else:
        split = 0.005 + 0.025 * (0.5 + 0.5 * breathing)  # widens on inspiration
    d2 = np.minimum(np.maximum(np.clip(rng.normal(0.103, 0.02), 0.065, 0.145), split + 0.04), 0.6 * (rr - s1s2))
    amplitude = (1 + 0.08 * breathing) * (1 + 0.04 * rng.standard_normal(len(rr)))
    if "irregular" in patient.cues:  # as in atrial fibrillation: S1 louder after a short filling time, and varying
        amplitude *= np.clip(period / rr, 0.6, 1.4) * (1 + 0.2 * rng.standard_normal(len(rr))).clip(0.5, 1.5)
    to_samples = lambda t: np.round(t * rate).astype(np.int64)  # noqa: E731
    return Beats(onset=to_samples(onsets), s1_end=to_samples(onsets + d1), s2_start=to_samples(onsets + s1s2),
                 s2_end=to_samples(onsets + s1s2 + d2), next_onset=to_samples(onsets + rr), split=split,
                 amplitude=amplitude)


def _location_gains(rng: np.random.Generator, location: str) -> tuple[float, float]:
    """S1 is loudest at the apex (MV, TV), S2 at the base (AV, PV)."""
    if location in ("MV", "TV"):
        return 1.0, float(rng.uniform(0.55, 0.8))
    if location in ("AV", "PV"):
        return float(rng.uniform(0.65, 0.85)), float(rng.uniform(0.75, 0.95))
    return float(rng.uniform(0.7, 0.9)), float(rng.uniform(0.6, 0.8))


def _beat_grid(starts: np.ndarray, ends: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(t [beats, L] seconds since each start, length [beats, 1] seconds, L) for per-beat vectorised shapes."""
    lengths = np.maximum(ends - starts, 1)
    width = int(lengths.max()) if len(lengths) else 1
    t = np.arange(width)[None, :] / rate + np.zeros((len(starts), 1))
    return t, (lengths / rate)[:, None], width


def _place(track: np.ndarray, starts: np.ndarray, events: np.ndarray) -> None:
    """Add each row of ``events`` at its start; rows running past the end of ``track`` are cut."""
    for start, event in zip(starts, events):
        stop = min(int(start) + event.shape[0], len(track))
        if stop > start:
            track[start:stop] += event[: stop - start]


def _add_s1(track: np.ndarray, rng: np.random.Generator, beats: Beats, rate: int, gain: float,
            irregular: bool) -> None:
    """Mitral (~50 Hz) and tricuspid (~150 Hz) decaying components plus a 20->100 Hz sweep."""
    t, length, _ = _beat_grid(beats.onset, beats.s1_end, rate)
    nb = len(beats.onset)
    f_m, f_t = rng.uniform(40, 60), rng.uniform(120, 170)
    delay = rng.uniform(0.012, 0.03)
    jitter = 1 + 0.04 * rng.standard_normal((nb, 1))
    u = np.minimum(t / length, 1.0)
    tt = np.maximum(t - delay, 0.0)
    shape = (np.exp(-t / (0.35 * length)) * np.sin(2 * np.pi * f_m * jitter * t)
             + 0.6 * (t >= delay) * np.exp(-tt / (0.25 * length)) * np.sin(2 * np.pi * f_t * jitter * tt)
             + 0.35 * np.sin(np.pi * u) * np.sin(2 * np.pi * (20 * t + 40 * t * t / length)))
    shape *= np.minimum(t / 0.006, 1.0) * (1 - u ** 4) * (t < length)
    shape /= np.maximum(np.abs(shape).max(axis=1, keepdims=True), 1e-9)
    _place(track, beats.onset, shape * (gain * beats.amplitude)[:, None])


def _add_s2(track: np.ndarray, rng: np.random.Generator, beats: Beats, rate: int, gain: float) -> None:
    """A2 then P2: short downward chirps, ``split`` seconds apart."""
    t, length, _ = _beat_grid(beats.s2_start, beats.s2_end, rate)
    split = beats.split[:, None]
    a_hi, p_hi = rng.uniform(190, 260), rng.uniform(140, 190)
    p2_gain = rng.uniform(0.5, 0.8)

    def chirp(tc: np.ndarray, f0: float, f1: float, sweep: float = 0.04) -> np.ndarray:
        tc = np.maximum(tc, 0.0)
        ts = np.minimum(tc, sweep)
        phase = f0 * ts + (f1 - f0) * ts * ts / (2 * sweep) + f1 * (tc - ts)
        return np.minimum(tc / 0.004, 1.0) * np.exp(-tc / 0.014) * np.sin(2 * np.pi * phase)

    shape = chirp(t, a_hi, 70.0) + p2_gain * (t >= split) * chirp(t - split, p_hi, 55.0)
    u = np.minimum(t / length, 1.0)
    shape *= (1 - u ** 4) * (t < length)
    shape /= np.maximum(np.abs(shape).max(axis=1, keepdims=True), 1e-9)
    _place(track, beats.s2_start, shape * (gain * beats.amplitude)[:, None])


def _add_s3(track: np.ndarray, rng: np.random.Generator, beats: Beats, rate: int, gain: float) -> None:
    """A low (35-55 Hz) thud early in diastole, 120-170 ms after S2; skipped where diastole is too short."""
    f3 = rng.uniform(35, 55)
    starts = beats.s2_start + np.round(rng.uniform(0.12, 0.17) * rate).astype(np.int64)
    width = int(0.07 * rate)
    fits = starts + width < beats.next_onset - int(0.02 * rate)
    t = np.arange(width) / rate
    event = np.exp(-0.5 * ((t - 0.03) / 0.012) ** 2) * np.sin(2 * np.pi * f3 * (t - 0.03))
    events = event[None, :] * (gain * beats.amplitude[fits])[:, None]
    _place(track, starts[fits], events)


ENVELOPES = {
    "Plateau": lambda u: np.ones_like(u),
    "Diamond": lambda u: 1 - np.abs(2 * u - 1),
    "Crescendo": lambda u: u,
    "Decrescendo": lambda u: 1 - u,
}


def _murmur(rng: np.random.Generator, murmur: Murmur, beats: Beats, n: int, rate: int) -> np.ndarray:
    """Carrier (band noise, or harmonics for a musical murmur) gated by a per-beat envelope in its window."""
    if murmur.phase == "systole":
        lo, hi = beats.s1_end, beats.s2_start
        frac = SYSTOLIC_WINDOWS[murmur.timing]
    else:
        lo, hi = beats.s2_end, beats.next_onset
        frac = DIASTOLIC_WINDOWS[murmur.timing]
    starts = lo + np.round(frac[0] * (hi - lo)).astype(np.int64)
    ends = lo + np.round(frac[1] * (hi - lo)).astype(np.int64)
    t, length, _ = _beat_grid(starts, ends, rate)
    u = np.minimum(t / length, 1.0)
    ramp = 0.008
    edges = np.clip(np.minimum(t, length - t) / ramp, 0.0, 1.0)
    envelope_rows = ENVELOPES[murmur.shape](u) * edges * (t < length) * beats.amplitude[:, None]
    envelope = np.zeros(n)
    _place(envelope, starts, envelope_rows)

    if murmur.kind == "innocent_vibratory":
        f0 = rng.uniform(*murmur.f0_range)
        tt = np.arange(n) / rate
        phase = 2 * np.pi * f0 * (tt + 0.02 / (2 * np.pi * 3.0) * np.sin(2 * np.pi * 3.0 * tt))
        carrier = np.sin(phase) + 0.45 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase)
        carrier /= np.abs(carrier).max()
    else:
        carrier = _band_noise(rng, n, rate, *murmur.band) * math.sqrt(2)  # RMS 1: peak-equivalent of a sine of 1
        if murmur.quality == "Harsh":  # rough: fast irregular amplitude modulation
            carrier *= 1 + 0.4 * _band_noise(rng, n, rate, 20.0, 60.0) * math.sqrt(2)
    return carrier * envelope


def _band_noise(rng: np.random.Generator, n: int, rate: int, lo: float, hi: float) -> np.ndarray:
    """Gaussian noise limited to [lo, hi] Hz (soft 10 Hz edges), unit RMS; synthesized in the frequency domain."""
    m = sfft.next_fast_len(n, real=True)
    freqs = np.fft.rfftfreq(m, 1 / rate)
    gain = np.clip(np.minimum(freqs - lo + 10, hi + 10 - freqs) / 20, 0.0, 1.0)
    spectrum = (rng.standard_normal(len(freqs)) + 1j * rng.standard_normal(len(freqs))) * gain
    x = sfft.irfft(spectrum, m)[:n]
    return x / (_rms(x) or 1.0)


def _coloured_noise(rng: np.random.Generator, n: int, rate: int, beta: float) -> np.ndarray:
    """1/f^beta noise above 10 Hz (flat below), unit RMS: stethoscope and room background."""
    m = sfft.next_fast_len(n, real=True)
    freqs = np.fft.rfftfreq(m, 1 / rate)
    gain = np.maximum(freqs, 10.0) ** (-beta / 2)
    gain[0] = 0.0
    spectrum = (rng.standard_normal(len(freqs)) + 1j * rng.standard_normal(len(freqs))) * gain
    x = sfft.irfft(spectrum, m)[:n]
    return x / (_rms(x) or 1.0)


def _noise(rng: np.random.Generator, patient: SyntheticPatient, n: int, rate: int, heart_rms: float,
           breath_hz: float, breath_phase: float) -> np.ndarray:
    """Background at an SNR set by the patient's noise profile, plus breathing, friction, drift and hum."""
    profile = DIFFICULTIES[patient.difficulty]
    if patient.noise_profile == "noisy":
        snr_db, noisy = rng.uniform(-3, 6), True
    elif patient.noise_profile == "faint":
        snr_db, noisy = rng.uniform(8, 16), False
    elif rng.random() < profile.noisy_share:
        snr_db, noisy = rng.uniform(*profile.noisy_snr_db), True
    else:
        snr_db, noisy = rng.uniform(*profile.clean_snr_db), False
    scale = heart_rms * 10 ** (-snr_db / 20)
    noise = _coloured_noise(rng, n, rate, rng.uniform(0.5, 2.0)) * scale

    breathing_level = heart_rms * (rng.uniform(0.1, 0.4) if noisy else rng.uniform(0.01, 0.06))
    inhaling = _slow(lambda t: 0.5 + 0.5 * np.sin(2 * np.pi * breath_hz * t + breath_phase), n, rate)
    breath_envelope = inhaling * inhaling * inhaling * breathing_level
    noise += _band_noise(rng, n, rate, 150.0, min(600.0, 0.45 * rate)) * breath_envelope

    if rng.random() < (0.7 if noisy else 0.3):  # stethoscope rubbing on skin
        for _ in range(int(rng.integers(1, 7))):
            width = int(rng.uniform(0.005, 0.03) * rate)
            start = int(rng.integers(0, max(n - width, 1)))
            spike = rng.standard_normal(width) * np.hanning(width) * heart_rms * rng.uniform(2, 6)
            noise[start:start + width] += spike[: n - start]
    drift = [(heart_rms * rng.uniform(0.05, 0.5), rng.uniform(0.05, 2.0), rng.uniform(0, 6.3)) for _ in range(2)]
    noise += _slow(lambda t: sum(a * np.sin(2 * np.pi * f * t + ph) for a, f, ph in drift), n, rate)
    if rng.random() < 0.1:
        mains = 50.0 if rng.random() < 0.5 else 60.0
        level = heart_rms * rng.uniform(0.02, 0.1)
        t = np.arange(n) / rate
        noise += level * (np.sin(2 * np.pi * mains * t) + 0.3 * np.sin(2 * np.pi * 3 * mains * t))
    return noise


def _slow(curve, n: int, rate: int, step_s: float = 0.01) -> np.ndarray:
    """Evaluate a curve slower than a few Hz on a 10 ms grid and interpolate: the same shape, a fraction of the cost."""
    coarse_t = np.arange(int(n / rate / step_s) + 2) * step_s
    return np.interp(np.arange(n) / rate, coarse_t, curve(coarse_t))


def _segments(beats: Beats, n: int, rate: int) -> list[tuple[float, float, int]]:
    """Segmentation rows in the ``.tsv`` convention: 0 before the first and from the last incomplete beat."""
    rows: list[tuple[int, int, int]] = []
    cursor = 0
    for k in range(len(beats.onset)):
        if beats.next_onset[k] > n:
            break
        if beats.onset[k] > cursor:
            rows.append((cursor, int(beats.onset[k]), 0))
        rows += [(int(beats.onset[k]), int(beats.s1_end[k]), 1), (int(beats.s1_end[k]), int(beats.s2_start[k]), 2),
                 (int(beats.s2_start[k]), int(beats.s2_end[k]), 3), (int(beats.s2_end[k]), int(beats.next_onset[k]), 4)]
        cursor = int(beats.next_onset[k])
    if cursor < n:
        rows.append((cursor, n, 0))
    return [(a / rate, b / rate, state) for a, b, state in rows]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


# ---------------------------------------------------------------------------------------------- writers
CSV_COLUMNS = ("Patient ID", "Recording locations:", "Age", "Sex", "Height", "Weight", "Pregnancy status", "Murmur",
               "Murmur locations", "Most audible location", "Systolic murmur timing", "Systolic murmur shape",
               "Systolic murmur grading", "Systolic murmur pitch", "Systolic murmur quality", "Diastolic murmur timing",
               "Diastolic murmur shape", "Diastolic murmur grading", "Diastolic murmur pitch",
               "Diastolic murmur quality", "Outcome", "Campaign", "Additional ID")


def write_synthetic(out_dir: str | Path, n_patients: int, seed: int, fmt: str = "circor2022", *,
                    difficulty: str = "default", overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``n_patients`` synthetic patients under ``out_dir`` in format ``fmt``; returns ``out_dir``.

    Same seed and difficulty, same bytes. ``difficulty="hard"`` gives a set with more room to show a recipe
    helping (see `Difficulty`). A folder that already holds files is refused unless ``overwrite``; the new set
    is always generated beside it first and swapped in only once complete, so a failure (or Ctrl-C) leaves
    whatever was there untouched. ``progress`` shows a bar with counts on a terminal (never in a log file).
    ``n_patients`` goes from 1 to `MAX_SYNTHETIC_PATIENTS` and ``seed`` from 0 to `MAX_SEED`; any other
    value is refused before anything is created.

    Example::

        root = write_synthetic("synth", n_patients=20, seed=0)
        recordings = read_recordings(root, "circor2022")
        hard = write_synthetic("synth-hard", n_patients=200, seed=0, difficulty="hard", overwrite=True)
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of: {', '.join(FORMATS)}")
    _check_count("patients", n_patients, 1, MAX_SYNTHETIC_PATIENTS)
    _check_count("seed", seed, 0, MAX_SEED)
    _difficulty(difficulty)
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    staging = _staging_folder(out_dir)
    try:
        try:
            patients = [sample_patient(seed, i, difficulty) for i in range(n_patients)]
            total = sum(len(p.recordings) for p in patients) if fmt == "circor2022" else len(patients)
            with _progress_bar(total, progress) as bar:
                if fmt == "circor2022":
                    _write_circor(staging, patients, seed, bar.update)
                else:
                    _write_physionet2016(staging, patients, seed, bar.update)
            _swap_in(staging, out_dir)
        except OSError as e:
            raise DataError(f"{out_dir}: cannot write the synthetic set ({e.strerror or e})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _check_count(name: str, value: object, low: int, high: int) -> None:
    """Refuse a ``value`` that is not an integer from ``low`` to ``high``, naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ConfigError(f"{name}={value!r} is out of range (must be an integer from {low} to {high})")


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file, a folder that holds anything (unless ``overwrite``), and, even with ``overwrite``, a
    folder that does not look like a dataset: replacing a home directory by mistake must not be one flag away."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    if not out_dir.is_dir():
        return
    try:
        entries = sorted(p.name for p in out_dir.iterdir())
    except OSError as e:
        raise DataError(f"{out_dir}: cannot read the folder ({e.strerror or e})") from None
    if not entries:
        return
    if not overwrite:
        raise DataError(f"{out_dir}: folder is not empty ({len(entries)} entries); use --overwrite to replace it")
    dataset_entries = {"training_data", "training_data.csv"} | {f"training-{c}" for c in "abcdef"}
    if not dataset_entries & set(entries):
        raise DataError(f"{out_dir}: refusing to replace a folder that holds no dataset "
                        f"(no training_data/ or training-a/ ...; it holds {', '.join(entries[:5])}"
                        f"{', ...' if len(entries) > 5 else ''})")


def _staging_folder(out_dir: Path) -> Path:
    """A new empty folder for the set being generated: beside ``out_dir`` (one rename to swap in), else inside
    it where only ``out_dir`` itself is writable. Plain ``mkdir`` so that the umask applies."""
    name = f".{out_dir.name or 'synthetic'}.synth-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    errors = []
    for parent in (out_dir.absolute().parent, out_dir):
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = parent / name
            staging.mkdir()
            return staging
        except OSError as e:
            errors.append(e.strerror or str(e))
    raise DataError(f"{out_dir}: cannot write the synthetic set there ({errors[0]})")


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Make ``staging``'s content the content of ``out_dir``; whatever was there goes only after that worked."""
    if staging.parent == out_dir:  # staged inside: move entry by entry
        trash = out_dir / f".synth-old-{uuid.uuid4().hex[:8]}"
        trash.mkdir()
        for entry in out_dir.iterdir():
            if entry not in (staging, trash):
                os.rename(entry, trash / entry.name)
        for entry in staging.iterdir():
            os.rename(entry, out_dir / entry.name)
        staging.rmdir()
        shutil.rmtree(trash, ignore_errors=True)
        return
    if not out_dir.is_dir():
        os.rename(staging, out_dir)
        return
    swap_directory(staging, out_dir)


def _progress_bar(total: int, enabled: bool) -> tqdm:
    """Counts, rate and time left on stderr; tqdm stays silent where stderr is not a terminal."""
    return tqdm(total=total, desc="synthetic set", unit="recording", disable=None if enabled else True,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _write_circor(out_dir: Path, patients: list[SyntheticPatient], seed: int,
                  done: Callable[[int], object] = lambda n: None) -> None:
    data_dir = out_dir / "training_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for patient in patients:
        for number, plan in enumerate(patient.recordings):
            samples, segments = synthesize_recording(patient, number, seed, CIRCOR_RATE)
            write_wav(data_dir / f"{plan.name}.wav", CIRCOR_RATE, samples)
            (data_dir / f"{plan.name}.hea").write_text(
                f"{plan.name} 1 {CIRCOR_RATE} {len(samples)}\n{plan.name}.wav 16+44 1 16 0 0 0 0 {plan.location}\n")
            (data_dir / f"{plan.name}.tsv").write_text(
                "".join(f"{a:.5f}\t{b:.5f}\t{state}\n" for a, b, state in segments))
            done(1)
        fields = patient_fields(patient)
        (data_dir / f"{patient.patient_id}.txt").write_text(_patient_text(patient, fields))
        rows.append([patient.patient_id, "+".join(r.location for r in patient.recordings)] + list(fields.values()))
    with open(out_dir / "training_data.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)


def patient_fields(patient: SyntheticPatient) -> dict[str, str]:
    """The ``#Key: value`` fields of ``<pid>.txt``, in CirCor's order; missing values are ``nan``."""

    def text(value: object) -> str:
        return "nan" if value is None else str(value)

    written = patient.murmurs if patient.murmur == "Present" else ()
    systolic = next((m for m in written if m.phase == "systole"), None)
    diastolic = next((m for m in written if m.phase == "diastole"), None)
    fields = {
        "Age": text(patient.age), "Sex": patient.sex, "Height": text(patient.height), "Weight": text(patient.weight),
        "Pregnancy status": str(patient.pregnant), "Murmur": patient.murmur,
        "Murmur locations": "+".join(patient.murmur_locations) if written else "nan",
        "Most audible location": text(patient.most_audible if written else None),
    }
    for prefix, murmur in (("Systolic", systolic), ("Diastolic", diastolic)):
        for name in MURMUR_FIELDS:
            fields[f"{prefix} murmur {name}"] = text(getattr(murmur, name) if murmur else None)
    fields["Outcome"] = patient.outcome
    fields["Campaign"] = patient.campaign
    fields["Additional ID"] = text(patient.additional_id)
    return fields


def _patient_text(patient: SyntheticPatient, fields: dict[str, str]) -> str:
    lines = [f"{patient.patient_id} {len(patient.recordings)} {CIRCOR_RATE}"]
    lines += [f"{r.location} {r.name}.hea {r.name}.wav {r.name}.tsv" for r in patient.recordings]
    # The csv has Outcome before Campaign; the .txt has it last.
    order = [k for k in fields if k != "Outcome"] + ["Outcome"]
    lines += [f"#{key}: {fields[key]}" for key in order]
    return "\n".join(lines) + "\n"


def _write_physionet2016(out_dir: Path, patients: list[SyntheticPatient], seed: int,
                         done: Callable[[int], object] = lambda n: None) -> None:
    """One recording per patient at 2000 Hz, spread over ``training-a`` ... ``training-f``."""
    letters = "abcdef"
    n_folders = min(len(letters), len(patients))
    references: dict[str, list[str]] = {}
    counters: dict[str, int] = {}
    for patient in patients:
        letter = letters[patient.index * n_folders // len(patients)]
        folder = out_dir / f"training-{letter}"
        folder.mkdir(parents=True, exist_ok=True)
        counters[letter] = counters.get(letter, 0) + 1
        name = f"{letter}{counters[letter]:04d}"
        number = patient.recordings.index(_physionet_recording(patient))
        samples, _ = synthesize_recording(patient, number, seed, PHYSIONET_RATE)
        write_wav(folder / f"{name}.wav", PHYSIONET_RATE, samples)
        (folder / f"{name}.hea").write_text(
            f"{name} 1 {PHYSIONET_RATE} {len(samples)}\n{name}.wav 16+44 1 16 0 0 0 0 PCG\n")
        references.setdefault(letter, []).append(f"{name},{1 if patient.outcome == 'Abnormal' else -1}\n")
        done(1)
    for letter, lines in references.items():
        (out_dir / f"training-{letter}" / "REFERENCE.csv").write_text("".join(lines))


def _physionet_recording(patient: SyntheticPatient) -> PlannedRecording:
    """The 2016 data hold one recording per subject: the most audible location if there is one."""
    for plan in patient.recordings:
        if plan.location == patient.most_audible:
            return plan
    return patient.recordings[0]


# ---------------------------------------------------------------------------------------------- cache
def ensure_embedded_dataset(cache_root: Path, n_patients: int, seed: int, difficulty: str = "default",
                            progress: bool = True) -> Path:
    """The embedded CirCor-format set under ``<cache_root>/synthetic``, generated on first use and reused after.

    Generation writes into a temporary sibling and renames it into place, so a killed run never leaves a half
    dataset behind, and two processes racing to create it both end up with one complete copy. The first
    generation shows a progress bar on a terminal (``progress``). A ``hard`` set has a folder of its own.
    """
    profile = _difficulty(difficulty)
    label = "" if difficulty == "default" else f"{difficulty}-" + (f"r{profile.revision}-" if profile.revision > 1 else "")
    target = Path(cache_root) / "synthetic" / f"circor2022-{label}p{n_patients}-s{seed}"
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{target.parent}: cannot create the embedded dataset folder ({e.strerror or e})") from None
    with atomic_directory(target) as staging:
        write_synthetic(staging, n_patients, seed, fmt="circor2022", difficulty=difficulty, progress=progress)
    return target
