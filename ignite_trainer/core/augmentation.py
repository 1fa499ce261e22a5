"""AugmentSettings: what training-time augmentation does and how much, with its defaults written once.

`TrainConfig`'s ``augment_<field>`` fields take their defaults from here, and `AugmentSettings.validate` is
the one check of their ranges (including the ranges between fields, such as ``low <= high``). The
transforms themselves, which need torch, live in `ignite_trainer.training.augment`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ignite_trainer.core.errors import ConfigError

#: Prefix of the augmentation fields in a training config (``augment_noise_prob`` -> ``noise_prob``).
CONFIG_PREFIX = "augment_"
SHIFT_MODES = ("circular", "pad")


@dataclass(frozen=True)
class AugmentSettings:
    """What to augment and how much; every transform is off (probability 0) by default.

    Each ``*_prob`` is the chance that a sample gets that transform in an epoch. Example::

        settings = AugmentSettings(noise_prob=0.5, noise_snr_low_db=5, noise_snr_high_db=25,
                                   time_mask_prob=0.5, freq_mask_prob=0.5, mixup_prob=0.3)
        augment = Augmenter(settings, seed=0)
        x, y, mask = augment(x, y, mask, index, epoch=3)  # in the training step only
    """

    gain_prob: float = 0.0
    gain_low_db: float = -6.0
    gain_high_db: float = 6.0
    noise_prob: float = 0.0
    noise_snr_low_db: float = 5.0
    noise_snr_high_db: float = 30.0
    noise_beta_low: float = 0.0  # 1/f^beta: 0 white, 1 pink, 2 brown
    noise_beta_high: float = 2.0
    shift_prob: float = 0.0
    shift_max_fraction: float = 0.5  # of the window
    shift_mode: str = "circular"
    stretch_prob: float = 0.0
    stretch_max: float = 0.1  # rate drawn in [1 - stretch_max, 1 + stretch_max]
    time_mask_prob: float = 0.0
    time_masks: int = 2
    time_mask_width: int = 40  # frames, the largest width drawn
    freq_mask_prob: float = 0.0
    freq_masks: int = 2
    freq_mask_width: int = 8  # mel bands
    mixup_prob: float = 0.0
    mixup_alpha: float = 0.4
    log_power_scale: float = 3.0  # nepers of log power per z unit (see the module docstring)
    _source: str = field(default="config", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate(self._source)

    @classmethod
    def from_config(cls, cfg: Any, source: str = "config") -> "AugmentSettings":
        """Settings from the ``augment_<field>`` attributes of a config object (missing ones keep defaults)."""
        values = {f.name: getattr(cfg, CONFIG_PREFIX + f.name) for f in fields(cls)
                  if not f.name.startswith("_") and hasattr(cfg, CONFIG_PREFIX + f.name)}
        return cls(**values, _source=source)

    @property
    def enabled(self) -> bool:
        """True when any transform can fire."""
        return any(getattr(self, f.name) > 0 for f in fields(self) if f.name.endswith("_prob"))

    def validate(self, source: str = "config") -> None:
        """One `ConfigError` naming the first field that is out of range (as ``augment_<field>``)."""

        def fail(name: str, rule: str) -> None:
            raise ConfigError(f"{source}: {CONFIG_PREFIX}{name}={getattr(self, name)!r} {rule}")

        for f in fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if f.name == "shift_mode":
                if value not in SHIFT_MODES:
                    fail(f.name, f"is not one of: {', '.join(SHIFT_MODES)}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f.name, "must be a number")
            if f.type in ("int", int) and value != int(value):
                fail(f.name, "must be an integer")
            if not math.isfinite(value):
                fail(f.name, "must be a finite number")
            if f.name.endswith("_prob") and not 0.0 <= value <= 1.0:
                fail(f.name, "is out of range (must be in [0, 1])")
        for low, high in (("gain_low_db", "gain_high_db"), ("noise_snr_low_db", "noise_snr_high_db"),
                          ("noise_beta_low", "noise_beta_high")):
            if getattr(self, low) > getattr(self, high):
                fail(low, f"is above {CONFIG_PREFIX}{high}={getattr(self, high)!r} (the range is upside down)")
        for name in ("time_masks", "time_mask_width", "freq_masks", "freq_mask_width"):
            if getattr(self, name) < 0:
                fail(name, "is out of range (must be >= 0)")
        if not 0.0 <= self.shift_max_fraction <= 1.0:
            fail("shift_max_fraction", "is out of range (must be in [0, 1])")
        if not 0.0 <= self.stretch_max <= 0.5:
            fail("stretch_max", "is out of range (must be in [0, 0.5])")
        if self.mixup_alpha <= 0:
            fail("mixup_alpha", "is out of range (must be > 0)")
        if self.log_power_scale <= 0:
            fail("log_power_scale", "is out of range (must be > 0)")


def augment_default(name: str) -> Any:
    """The default of ``AugmentSettings.<name>``: what `TrainConfig`'s ``augment_<name>`` field defaults to."""
    for f in fields(AugmentSettings):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(name)
