"""TrainConfig: every setting of a run, with the reference recipe's defaults, loaded from YAML and overridden from the CLI.

One flat dataclass, so that a run directory's ``config.yaml`` is exactly enough to re-run it and a resume
can compare two configs field by field. Every value is checked here, once, so that the rest of the code
can trust it: an unknown key, a wrong type or an out-of-range value is a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from ignite_trainer.core.augmentation import SHIFT_MODES, AugmentSettings, augment_default
from ignite_trainer.core.errors import ConfigError, UserError
from ignite_trainer.core.vocabulary import (AGGREGATIONS, DEVICES, FORMATS, HEAD_GROUPS, HEAD_NAMES, LABELS,
                                          OBJECTIVES, STATS, is_score)


#: The longest file name most file systems accept (NAME_MAX), in bytes.
MAX_NAME_BYTES = 255
#: The largest seed: numpy's legacy global generator (seeded from every seed a run uses) takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
#: The most patients a synthetic set may have (`synth --patients`, ``synthetic_patients``). A CirCor-format
#: patient is about 0.5 MB of WAV files, so this bound is some 50 GB already; a count with a few digits too
#: many is refused at once instead of filling memory and disk for hours.
MAX_SYNTHETIC_PATIENTS = 100_000


def decode_utf8(raw: bytes, path: str | Path, hint: str = "", error: type[Exception] = ConfigError) -> str:
    """``raw`` as UTF-8 text (a byte-order mark dropped), or ``error`` naming ``path``, the first bad byte and
    its offset, then ``hint`` (e.g. "; save the config file as UTF-8"): the one decoding of a project file.

    Example::

        decode_utf8(b"\\xff", "c.yaml")  # ConfigError: c.yaml: not UTF-8 text (byte 0xff at offset 0)
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}){hint}") from None


def read_text_file(path: str | Path, what: str, error: type[UserError] = ConfigError) -> str:
    """The text of a file the user gave (a config, a split file, a sweep space), read as UTF-8 (a byte-order
    mark is dropped). A file that cannot be read, or whose bytes are not UTF-8 (saved as UTF-16 or Latin-1),
    is one ``error`` naming the file and ``what`` it is, instead of a `UnicodeDecodeError` traceback.

    Example::

        text = read_text_file("folds.csv", "the split file", DataError)
        # folds.csv: not UTF-8 text (byte 0xff at offset 0); save the split file as UTF-8
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    return decode_utf8(raw, path, f"; save {what} as UTF-8", error)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (empty for an empty file): the one reader of a config file's text.

    An unreadable file, text that is not UTF-8, malformed YAML or a document that is not a mapping is a
    one-line `ConfigError` naming the file (and the line, for YAML).

    Example::

        values = read_yaml_mapping("runs/quick/config.yaml")   # {"model": "attention_cnn", ...}
    """
    path = Path(path)
    text = read_text_file(path, "the config file")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    return values


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """All settings of a training run. The optimisation defaults are the reference recipe's (AdamW 1e-3,
    weight decay 0.01, batch 32, cosine annealing over 100 epochs, patience 15, clip 1.0, pos weights 1 / 2.5).

    Example::

        config = TrainConfig(epochs=30, monitor="macro_f1")
        config = config.with_overrides(["learning_rate=3e-4", "window_seconds=5"])
        print(config.to_yaml())  # what runs/<name>/config.yaml holds; TrainConfig.from_yaml reads it back
    """

    # data
    data: str | None = _f(None, "dataset root; empty for the embedded synthetic CirCor-format set")
    format: Literal[FORMATS] = _f("circor2022", "on-disk layout of --data")
    unknown_murmur: Literal["mask", "positive"] = _f("mask", "CirCor 'Unknown' murmur: leave out or count as present")
    skip_bad: bool = _f(False, "warn about and skip unreadable recordings instead of stopping")
    synthetic_patients: int = _f(300, "patients in the embedded synthetic set", min=4,
                                 max=MAX_SYNTHETIC_PATIENTS)
    synthetic_seed: int = _f(2022, "seed of the embedded synthetic set", min=0, max=MAX_SEED)
    cache_dir: str | None = _f(None, "feature and synthetic-data cache; default $IGNITE_TRAINER_CACHE or "
                                     "~/.cache/ignite_trainer")
    # features
    sample_rate: int = _f(2000, "resample every recording to this rate (Hz)", min=800, max=48000)
    band_low_hz: float = _f(25.0, "band-pass lower edge (Hz)", min=1.0)
    band_high_hz: float = _f(400.0, "band-pass upper edge (Hz)", min=2.0)
    n_mels: int = _f(64, "log-mel bands", min=8, max=256)
    n_fft: int = _f(512, "FFT size of the STFT", min=16, max=8192)
    win_ms: float = _f(25.0, "STFT window (ms)", min=1.0, max=1000.0)
    hop_ms: float = _f(10.0, "STFT hop (ms)", min=1.0, max=1000.0)
    window_seconds: float = _f(4.0, "length of one training/evaluation window (s)", min=0.5, max=60.0)
    # split
    val_fraction: float = _f(0.2, "share of patients held out for validation", min=0.0, max=0.9)
    n_folds: int = _f(0, "k for k-fold splitting; 0 uses val_fraction", min=0, max=20)
    fold: int = _f(0, "which fold is validation when n_folds > 0", min=0)
    # None keeps the behaviour of configs written before these fields existed: the split follows `seed`.
    split_seed: int | None = _f(None, "seed of the patient split (folds or val_fraction); empty uses seed", min=0, max=MAX_SEED)
    split_file: str | None = _f(None, "JSON/CSV file of patient ids per fold (cli.py cv writes one); fold picks validation")
    label_fraction: float = _f(1.0, "share of the training patients (per label stratum, drawn with the split seed) that keep "
                                    "their labels; the rest train with every label masked", min=0.0, max=1.0,
                               exclusive_min=True)
    # optimisation (the reference recipe's defaults)
    batch_size: int = _f(32, "global batch size (split across processes)", min=1)
    learning_rate: float = _f(0.001, "AdamW learning rate", min=0.0, exclusive_min=True)
    weight_decay: float = _f(0.01, "AdamW weight decay", min=0.0)
    epochs: int = _f(100, "maximum number of epochs", min=1)
    early_stopping_patience: int = _f(15, "epochs without improvement before stopping; 0 disables", min=0)
    scheduler: Literal["cosine_annealing", "none"] = _f("cosine_annealing", "LR schedule, stepped per epoch")
    gradient_clip: float = _f(1.0, "max gradient norm; 0 disables clipping", min=0.0)
    pos_weight_heart: float = _f(1.0, "BCE positive weight of the heart label", min=0.0, exclusive_min=True)
    pos_weight_murmur: float = _f(2.5, "BCE positive weight of the murmur label", min=0.0, exclusive_min=True)
    accumulation_steps: int = _f(1, "micro-batches per optimizer step", min=1)
    amp: bool = _f(False, "mixed precision autocast (amp_dtype; bf16 by default)")
    model: str = _f("attention_cnn", "model name from the registry")
    init_from: str | None = _f(None, "initialise the model's trunk from pretrained weights: a run directory (its best "
                                     "checkpoint, else its last), a .pt checkpoint or a .safetensors export")
    freeze_trunk: bool = _f(False, "train only what is not the trunk (trunk BatchNorm kept in eval mode)")
    trunk_lr_scale: float = _f(1.0, "the trunk's learning rate is learning_rate times this", min=0.0,
                               exclusive_min=True)
    warmup_epochs: int = _f(0, "linear learning-rate warm-up over the first N epochs, then the schedule", min=0)
    monitor: str = _f("val_loss", "score for early stopping and the best checkpoint: val_loss, macro_f1, heart.f1, ...")
    # run
    seed: int = _f(0, "seed of model init and crops (and of the split when split_seed is empty)", min=0, max=MAX_SEED)
    device: Literal[DEVICES] = _f("auto", "where to train")
    num_workers: int = _f(0, "DataLoader worker processes", min=0)
    output_dir: str = _f("runs", "parent folder of run directories")
    name: str | None = _f(None, "run directory name; default a timestamp")
    n_saved_best: int = _f(1, "best checkpoints kept", min=1)
    progress: bool | None = _f(None, "Ignite's progress bar: null = only when stderr is a terminal, true/false = "
                                     "always/never; epoch lines are always written")
    tracker: Literal["none", "mlflow"] = _f("none", "also log params, epoch scores and artifacts to MLflow (optional "
                                                    "extra: pip install 'ignite_trainer[mlflow]')")
    tracking_uri: str | None = _f(None, "MLflow tracking URI; default a local store <output_dir>/mlruns")
    # evaluation
    aggregation: Literal[AGGREGATIONS] = _f("mean", "recording/patient prediction: mean probability or any positive")
    threshold_objective: Literal[OBJECTIVES] = _f("f1", "how per-label thresholds are tuned on validation")
    calibrate: bool = _f(False, "decide on temperature-scaled probabilities (one T per label, fitted on validation "
                                "patients); off: T is still fitted and reported, decisions are unchanged")
    # distributed
    nproc_per_node: int = _f(1, "processes on this node (idist.Parallel)", min=1)
    backend: Literal["gloo", "nccl"] | None = _f(None, "distributed backend; default gloo on CPU, nccl on CUDA")
    # ---- precision, speed, models and augmentation (everything off / as before by default)
    feature_dtype: Literal["float32", "float16"] = _f("float32", "dtype of the cached features (float16 halves cache and memory)")
    amp_dtype: Literal["bfloat16", "float16"] = _f("bfloat16", "autocast type with amp; float16 adds a GradScaler on CUDA")
    sync_every: int = _f(50, "iterations between reads of the step statistics from the device", min=1)
    resident_features: bool = _f(False, "keep all features on the training device when they fit")
    compile: bool = _f(False, "torch.compile the model for the training and evaluation steps")
    cpu_kernel: bool = _f(False, "fused CPU kernel for the conv blocks: built once per machine (needs a C++ "
                                 "compiler), about 1.3x faster on CPU, equal up to float rounding")
    eval_batch_size: int | None = _f(None, "evaluation batch size; default batch_size", min=1)
    demographics: bool = _f(False, "fuse age, sex, height, weight and pregnancy into the heart logit (CirCor only)")
    heads: list[str] | None = _f(None, "auxiliary heads on the shared trunk: murmur descriptors (systolic_timing, "
                                      "..., diastolic_quality; 'attributes' = all ten, 'systolic' / 'diastolic' = five each) and/or segmentation (heart-cycle "
                                      "states from the .tsv files); CirCor only")
    attribute_loss_weight: float = _f(0.5, "weight of each murmur-descriptor head's loss (cross-entropy over the "
                                           "recordings it describes)", min=0.0)
    segmentation_loss_weight: float = _f(0.5, "weight of the segmentation head's loss (cross-entropy over "
                                              "annotated frames)", min=0.0)
    patient_model: bool = _f(False, "learn each patient's murmur and outcome from all its recordings together: gated "
                                    "attention (multiple-instance learning) over the model's window embeddings "
                                    "(docs/patient-model.md)")
    synthetic_difficulty: Literal["default", "hard"] = _f("default", "embedded synthetic set: default, or hard")
    augment_gain_prob: float = _f(augment_default("gain_prob"),
                                  "chance per sample and epoch of a random gain", min=0.0, max=1.0)
    augment_gain_low_db: float = _f(augment_default("gain_low_db"), "lowest gain (dB)")
    augment_gain_high_db: float = _f(augment_default("gain_high_db"), "highest gain (dB)")
    augment_noise_prob: float = _f(augment_default("noise_prob"), "chance of added coloured noise", min=0.0, max=1.0)
    augment_noise_snr_low_db: float = _f(augment_default("noise_snr_low_db"), "lowest noise SNR (dB)")
    augment_noise_snr_high_db: float = _f(augment_default("noise_snr_high_db"), "highest noise SNR (dB)")
    augment_noise_beta_low: float = _f(augment_default("noise_beta_low"),
                                       "lowest noise colour 1/f^beta (0 white, 1 pink, 2 brown)")
    augment_noise_beta_high: float = _f(augment_default("noise_beta_high"), "highest noise colour beta")
    augment_shift_prob: float = _f(augment_default("shift_prob"), "chance of a time shift", min=0.0, max=1.0)
    augment_shift_max_fraction: float = _f(augment_default("shift_max_fraction"),
                                           "largest shift, as a share of the window", min=0.0, max=1.0)
    augment_shift_mode: Literal[SHIFT_MODES] = _f(augment_default("shift_mode"),
                                                  "roll the window, or pad the gap with zeros")
    augment_stretch_prob: float = _f(augment_default("stretch_prob"), "chance of a time stretch", min=0.0, max=1.0)
    augment_stretch_max: float = _f(augment_default("stretch_max"),
                                    "stretch rate drawn in [1 - max, 1 + max]", min=0.0, max=0.5)
    augment_time_mask_prob: float = _f(augment_default("time_mask_prob"),
                                       "chance of SpecAugment time masks", min=0.0, max=1.0)
    augment_time_masks: int = _f(augment_default("time_masks"), "time masks per sample", min=0)
    augment_time_mask_width: int = _f(augment_default("time_mask_width"), "widest time mask (frames)", min=0)
    augment_freq_mask_prob: float = _f(augment_default("freq_mask_prob"),
                                       "chance of SpecAugment frequency masks", min=0.0, max=1.0)
    augment_freq_masks: int = _f(augment_default("freq_masks"), "frequency masks per sample", min=0)
    augment_freq_mask_width: int = _f(augment_default("freq_mask_width"), "widest frequency mask (mel bands)", min=0)
    augment_mixup_prob: float = _f(augment_default("mixup_prob"),
                                   "chance of mixup with a partner of the same batch", min=0.0, max=1.0)
    augment_mixup_alpha: float = _f(augment_default("mixup_alpha"),
                                    "mixup Beta(alpha, alpha)", min=0.0, exclusive_min=True)
    augment_log_power_scale: float = _f(augment_default("log_power_scale"),
                                        "nepers of log power per z unit (see docs/augmentation.md)",
                                        min=0.0, exclusive_min=True)
    # ---- self-supervised pretraining (`cli.py pretrain`, docs/pretraining.md); train ignores them
    pretrain_data: list[str] | None = _f(None, "pretrain: recordings to learn from without labels (dataset folders, "
                                               "WAV folders or WAV files)")
    pretrain_ema: float = _f(0.99, "pretrain: decay of the target network's moving average of the online one",
                             min=0.0, max=1.0)
    pretrain_projector_dim: int = _f(128, "pretrain: output size of the projector and predictor MLPs", min=1)
    pretrain_hidden_dim: int = _f(512, "pretrain: hidden size of the projector and predictor MLPs", min=1)
    pretrain_mixup: float = _f(0.4, "pretrain: largest share of another window mixed into a view "
                                    "(log-mixup-exp); 0 disables", min=0.0, max=1.0)
    pretrain_crop: bool = _f(True, "pretrain: random resize crop of each view (frequency and time scaled 0.6-1.5)")

    # ------------------------------------------------------------------ construction and checks
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping, rejecting unknown keys; values are type-checked by `validate`."""
        return cls().updated(values, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        return cls.from_mapping(read_yaml_mapping(path), source=str(path))

    def updated(self, values: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """A copy with ``values`` applied and validated; ``source`` names where they came from in errors."""
        known = set(self.field_names())
        for key in values:
            if key not in known:
                hint = _closest(key, known)
                raise ConfigError(f"{source}: unknown config field '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        hints = typing.get_type_hints(type(self))
        coerced = {k: _coerce(k, v, hints[k], source) for k, v in values.items()}
        new = dataclasses.replace(self, **coerced)
        new.validate(source)
        return new

    def with_overrides(self, assignments: list[str]) -> "TrainConfig":
        """Apply ``--set key=value`` strings; values are parsed as YAML scalars (``1e-3``, ``true``, ``null``)."""
        values: dict[str, Any] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r}: expected key=value")
            try:
                values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                values[key.strip()] = raw
        return self.updated(values, source="--set")

    def validate(self, source: str = "config") -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            _coerce(f.name, value, hints[f.name], source)
            meta = f.metadata
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = meta.get("min"), meta.get("max")
                if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
                    op = ">" if meta.get("exclusive_min") else ">="
                    raise ConfigError(f"{source}: {f.name}={value} is out of range (must be {op} {lo})")
                if hi is not None and value > hi:
                    raise ConfigError(f"{source}: {f.name}={value} is out of range (must be <= {hi})")
        if self.band_high_hz <= self.band_low_hz:
            raise ConfigError(f"{source}: band_high_hz={self.band_high_hz} must be above band_low_hz={self.band_low_hz}")
        if self.band_high_hz >= self.sample_rate / 2:
            raise ConfigError(
                f"{source}: band_high_hz={self.band_high_hz} must be below the Nyquist frequency "
                f"{self.sample_rate / 2:g} Hz of sample_rate={self.sample_rate}"
            )
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"{source}: warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError(f"{source}: init_from is empty (leave it out, or name a run directory or weights file)")
        if self.n_folds == 1:
            raise ConfigError(f"{source}: n_folds=1 is not a split (use 0 for a val_fraction split, or >= 2)")
        if self.split_file is not None and not self.split_file.strip():
            raise ConfigError(f"{source}: split_file is empty (leave it out, or name a split file)")
        if self.n_folds and self.fold >= self.n_folds:
            raise ConfigError(f"{source}: fold={self.fold} must be below n_folds={self.n_folds}")
        if self.n_folds == 0 and self.val_fraction <= 0:
            raise ConfigError(f"{source}: val_fraction must be > 0 (training needs a validation split)")
        if self.win_ms * self.sample_rate / 1000 > self.n_fft:
            raise ConfigError(f"{source}: win_ms={self.win_ms} is longer than n_fft={self.n_fft} samples")
        if not is_score(self.monitor):
            raise ConfigError(
                f"{source}: monitor={self.monitor!r} is not a score (val_loss, macro_f1, or <label>.<metric> "
                f"with label {'|'.join(LABELS)} and metric one of {', '.join(STATS)})"
            )
        unknown_heads = [h for h in self.heads or [] if h not in (*HEAD_NAMES, *HEAD_GROUPS)]
        if unknown_heads:
            raise ConfigError(f"{source}: heads: {unknown_heads[0]!r} is not one of: "
                              f"{', '.join((*HEAD_GROUPS, *HEAD_NAMES))}")
        if self.patient_model and self.heads:
            raise ConfigError(f"{source}: patient_model cannot be combined with heads (the heads score windows and "
                              "frames, a patient model's items are patients); turn one off")
        augment = AugmentSettings.from_config(self, source)  # the ranges between fields (low <= high)
        if self.patient_model and self.demographics:
            raise ConfigError(f"{source}: patient_model cannot be combined with demographics (the fusion adds to "
                              "each window's heart logit, a patient model has one per patient); turn one off")
        if self.patient_model and augment.enabled:
            raise ConfigError(f"{source}: patient_model cannot be combined with augmentation (mixup mixes labels "
                              "across the items of a batch, which are patients here); set every augment_*_prob to 0")
        if self.name is not None and (not self.name.strip() or "/" in self.name or self.name in (".", "..")):
            raise ConfigError(f"{source}: name={self.name!r} is not a valid run directory name")
        if self.name is not None and len(self.name.encode()) > MAX_NAME_BYTES:
            raise ConfigError(f"{source}: name is {len(self.name.encode())} bytes long; a run directory name may "
                              f"have at most {MAX_NAME_BYTES} (name={self.name[:40]!r}...)")

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def effective_split_seed(self) -> int:
        """The seed that places patients in folds or sides: ``split_seed``, or ``seed`` where it is empty."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def head_names(self) -> tuple[str, ...]:
        """The auxiliary heads of ``heads``, the groups (`HEAD_GROUPS`) expanded, in `HEAD_NAMES`' order, each once."""
        wanted = set(self.heads or ())
        for group, members in HEAD_GROUPS.items():
            if group in wanted:
                wanted |= set(members)
        return tuple(h for h in HEAD_NAMES if h in wanted)

    @property
    def pos_weight(self) -> tuple[float, float]:
        return (self.pos_weight_heart, self.pos_weight_murmur)


def cache_root(config: "TrainConfig") -> Path:
    """The cache root (synthetic data, ``features/``): ``config.cache_dir``, ``$IGNITE_TRAINER_CACHE``, else
    ``$XDG_CACHE_HOME/ignite_trainer`` (``~/.cache/ignite_trainer``).

    Example::

        features_dir = cache_root(config) / "features"
    """
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    env = os.environ.get("IGNITE_TRAINER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ignite_trainer"


#: Fields that may differ between a run and its resume: they change where or how fast it runs, not the math.
RESUMABLE_CHANGES = frozenset({"device", "num_workers", "progress", "output_dir", "name", "cache_dir", "skip_bad",
                                "nproc_per_node", "backend", "data", "tracker", "tracking_uri",
                                "sync_every", "resident_features", "compile", "eval_batch_size", "pretrain_data"})


#: Fields added after runs were first written, with the value every older run had: at that value a field is
#: left out of the run's identity digest, so that older runs keep theirs and stay resumable.
ADDED_LATER = {"cpu_kernel": False, "pretrain_data": None, "pretrain_ema": 0.99, "pretrain_projector_dim": 128,
               "pretrain_hidden_dim": 512, "pretrain_mixup": 0.4, "pretrain_crop": True, "init_from": None,
               "freeze_trunk": False, "trunk_lr_scale": 1.0, "warmup_epochs": 0,
               "label_fraction": 1.0, "heads": None, "attribute_loss_weight": 0.5,
               "segmentation_loss_weight": 0.5, "patient_model": False, "calibrate": False}

#: Why a field may not change on resume, where the general reason (another result) needs saying more exactly.
WHY_FIXED = {"cpu_kernel": "the kernel and the ordinary modules round differently, so the results would differ "
                           "bitwise from the run's own"}


def config_conflicts(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
    """Fields whose values differ between a checkpoint's config and the current one (resume must refuse)."""
    now = current.to_dict()
    conflicts = []
    for k in now:
        if k in RESUMABLE_CHANGES or not (k in saved or k in ADDED_LATER):
            continue
        was = saved.get(k, ADDED_LATER.get(k))
        if was != now[k]:
            conflicts.append(f"{k}: checkpoint has {was!r}, now {now[k]!r}"
                             + (f" ({WHY_FIXED[k]})" if k in WHY_FIXED else ""))
    return conflicts


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check ``value`` against the field's annotation; ints are accepted for floats. Returns the value."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(name, value, non_none[0], source)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{source}: {name}={value!r} is not one of: {choices}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{source}: {name}={value!r} must be a list of non-empty strings")
        return [str(v) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {name}={value!r} must be a number")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{source}: {name}={value!r} must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {name}={value!r} must be a string")
        return value
    return value


def _closest(key: str, known: set[str]) -> str | None:
    match = difflib.get_close_matches(key, sorted(known), n=1)
    return match[0] if match else None
