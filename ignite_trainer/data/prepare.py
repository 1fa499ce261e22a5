"""From a config to what training needs from its data: recordings read, features cached, patients split.

Training reads the data once in the launching process (and validates it before any run directory is
touched); evaluation reproduces the same split from the config stored with a model. Both call
`prepare_data`, so the two can never disagree about which patients were held out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.bad_input import BadInputPolicy
from ignite_trainer.data.splits import split_patients
from ignite_trainer.data.annotations import check_head_labels
from ignite_trainer.data.records import require_demographics
from ignite_trainer.data.features import FeatureCache, FeatureSettings, feature_workers
from ignite_trainer.data.discovery import discover_recordings
from ignite_trainer.data.readers import read_recordings
from ignite_trainer.data.records import Recording
from ignite_trainer.data.splits import fold_split, keep_label_fraction
from ignite_trainer.data.synthetic import ensure_embedded_dataset
from ignite_trainer.core.errors import DataError
from ignite_trainer.core.config import cache_root

__all__ = ["PreparedData", "prepare_data", "checked_data", "prepare_unlabelled"]


@dataclass
class PreparedData:
    """What every rank needs to build its loaders: the split and the feature cache folder that holds them."""

    train: list[Recording]
    val: list[Recording]
    features_dir: Path
    settings: FeatureSettings
    source: Path
    skipped: list[str] = field(default_factory=list)

    def feature_cache(self) -> FeatureCache:
        """The (already filled) cache the datasets read features from."""
        return FeatureCache(self.features_dir, self.settings)


def prepare_data(config: TrainConfig) -> PreparedData:
    """Read the dataset, fill the feature cache once (every epoch reuses it) and split by patient.

    Example::

        data = prepare_data(TrainConfig(synthetic_patients=24))
        print(len(data.train), len(data.val), data.source)
    """
    policy = BadInputPolicy(skip=config.skip_bad)
    root_dir = cache_root(config)
    if config.data:
        source, fmt = Path(config.data).expanduser(), config.format
    else:
        source = ensure_embedded_dataset(root_dir, config.synthetic_patients, config.synthetic_seed,
                                         difficulty=config.synthetic_difficulty, progress=config.progress is not False)
        fmt = "circor2022"
    recordings = read_recordings(source, fmt, unknown_murmur=config.unknown_murmur, policy=policy)
    if config.demographics:  # before the (slow) feature cache is filled
        require_demographics(recordings, fmt, field="demographics")
    if config.head_names:
        check_head_labels(recordings, config.head_names, fmt)
    settings = FeatureSettings.from_config(config)
    features_dir = root_dir / "features"
    recordings = FeatureCache(features_dir, settings).prepare(recordings, policy=policy, workers=feature_workers(),
                                                              progress=config.progress)
    if not recordings:
        raise DataError(f"{source}: no usable recordings")
    train, val = split_recordings(recordings, config)
    return PreparedData(train, val, features_dir, settings, source, policy.skipped)


def split_recordings(recordings: list[Recording], config: TrainConfig) -> tuple[list[Recording], list[Recording]]:
    """``(train, validation)`` as the config defines them; training and evaluation both split through here.

    Folds (a split file, or ``n_folds >= 2``) come from `ignite_trainer.data.splits`; otherwise ``val_fraction`` of
    the patients are held out. ``split_seed`` (empty: ``seed``) places the patients. With ``label_fraction`` < 1
    only that share of the training patients keeps its labels (`keep_label_fraction`); validation is untouched.
    """
    if config.split_file or config.n_folds >= 2:
        train, val = fold_split(recordings, config.n_folds, config.fold, config.effective_split_seed, config.split_file)
    else:
        train, val = split_patients(recordings, config.val_fraction, config.effective_split_seed)
    return keep_label_fraction(train, config.label_fraction, config.effective_split_seed), val


def checked_data(config: TrainConfig) -> PreparedData:
    """`prepare_data`, refusing an empty validation split (nothing to monitor, stop or checkpoint on)."""
    data = prepare_data(config)
    if not data.val:
        raise DataError(f"{data.source}: the validation split is empty; raise val_fraction or add patients")
    return data


def prepare_unlabelled(config: TrainConfig) -> PreparedData:
    """Recordings to learn from without labels (``config.pretrain_data``: dataset folders of any format, their
    labels ignored, WAV folders, WAV files), features cached; all of them in ``train``, ``val`` empty.

    A path that does not exist, a folder without recordings, or (with ``skip_bad``) nothing readable left is
    one `DataError`; without ``skip_bad`` the first unreadable recording is.

    Example::

        data = prepare_unlabelled(TrainConfig(pretrain_data=["wavs/", "circor/"]))
        print(len(data.train), data.source)
    """
    paths = [Path(p).expanduser() for p in config.pretrain_data or []]
    if not paths:
        raise DataError("pretrain: no DATA given (pretrain_data is empty)")
    recordings = discover_recordings(paths)
    policy = BadInputPolicy(skip=config.skip_bad)
    settings = FeatureSettings.from_config(config)
    features_dir = cache_root(config) / "features"
    recordings = FeatureCache(features_dir, settings).prepare(recordings, policy=policy, workers=feature_workers(),
                                                              progress=config.progress)
    where = ", ".join(str(p) for p in paths)
    if not recordings:
        raise DataError(f"{where}: no usable recordings to pretrain on")
    return PreparedData(recordings, [], features_dir, settings, paths[0], policy.skipped)
