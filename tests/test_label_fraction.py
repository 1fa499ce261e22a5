"""``label_fraction``: only a seeded, stratified share of the training patients keeps its labels."""

import math
from pathlib import Path

import pytest

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.data.prepare import split_recordings
from ignite_trainer.data.splits import keep_label_fraction, labelled_patients, patient_strata
from ignite_trainer.runs import record
from ignite_trainer.runs.record import run_identity

from test_splits import make_patients


def _labelled(recordings):
    return {r.patient_id for r in recordings if any(r.mask)}


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_each_stratum_keeps_its_rounded_share_and_at_least_one_patient(fraction):
    recordings = make_patients(90)
    full_train, _ = split_recordings(recordings, TrainConfig(n_folds=5, fold=1))
    train, _ = split_recordings(recordings, TrainConfig(n_folds=5, fold=1, label_fraction=fraction))
    strata = patient_strata(full_train)
    keep = labelled_patients(full_train, fraction, seed=0)
    for stratum, pids in strata.items():
        expected = min(len(pids), max(1, math.floor(len(pids) * fraction + 0.5)))
        assert len(keep & set(pids)) == expected, stratum
    # the kept patients are the labelled ones after the split (unless their stratum is all-masked anyway)
    kept_with_labels = {pid for (h, m), pids in strata.items() if (h, m) != ("?", "?") for pid in pids} & keep
    assert _labelled(train) == kept_with_labels


def test_the_others_are_kept_with_every_label_masked_and_validation_is_untouched():
    recordings = make_patients(60)
    full_train, full_val = split_recordings(recordings, TrainConfig(n_folds=3, fold=0))
    train, val = split_recordings(recordings, TrainConfig(n_folds=3, fold=0, label_fraction=0.25))
    assert val == full_val  # every validation recording as it was, labels and masks included
    assert [r.recording_id for r in train] == [r.recording_id for r in full_train]  # nobody dropped
    keep = labelled_patients(full_train, 0.25, seed=0)
    for before, after in zip(full_train, train):
        if before.patient_id in keep:
            assert after == before
        else:
            assert after.mask == (False, False) and after.labels == (0.0, 0.0) and after.murmur_class is None
            assert (after.wav_path, after.patient_id, after.location) == (before.wav_path, before.patient_id,
                                                                          before.location)


def test_the_draw_is_a_function_of_the_seed_and_patients_only():
    train = make_patients(80)
    a = labelled_patients(train, 0.25, seed=3)
    assert a == labelled_patients(list(reversed(train)), 0.25, seed=3)  # not of the recordings' order
    assert a != labelled_patients(train, 0.25, seed=4)
    config = TrainConfig(n_folds=4, fold=2, split_seed=7, label_fraction=0.25)
    assert split_recordings(train, config) == split_recordings(train, config)
    # it follows split_seed, not the training seed
    assert split_recordings(train, config)[0] == split_recordings(train, config.with_overrides(["seed=5"]))[0]


def test_fraction_one_changes_nothing():
    recordings = make_patients(40)
    for config in (TrainConfig(), TrainConfig(n_folds=4, fold=3)):
        assert keep_label_fraction(recordings, 1.0, 0) == recordings
        assert split_recordings(recordings, config) == split_recordings(
            recordings, config.with_overrides(["label_fraction=1.0"]))


class _Cache:
    def cached_path(self, r):
        return Path(f"/features/{r.recording_id}.npy")


class _Data:
    def __init__(self, train, val):
        self.train, self.val, self.source = train, val, Path("/data")

    def feature_cache(self):
        return _Cache()


def test_fraction_one_keeps_the_run_identity_of_a_config_written_before_the_field():
    train, val = split_recordings(make_patients(20), TrainConfig())
    data = _Data(train, val)
    config = TrainConfig(label_fraction=1.0)
    before = {k: v for k, v in config.to_dict().items()
              if k != "label_fraction" and k not in record.RESUMABLE_CHANGES
              and not (k in record.ADDED_LATER and v == record.ADDED_LATER[k])}
    assert run_identity(config, data)["config"] == record._digest(before)
    assert run_identity(config, data) == run_identity(TrainConfig(), data)
    assert run_identity(TrainConfig(label_fraction=0.5), data)["config"] != run_identity(config, data)["config"]


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused(value):
    with pytest.raises(ConfigError, match="label_fraction"):
        TrainConfig(label_fraction=value).validate()
    with pytest.raises(ConfigError, match="label_fraction"):
        labelled_patients(make_patients(6), value, seed=0)
