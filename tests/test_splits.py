"""Patient folds: stratified by both labels, a function of split_seed only, stored and read back exactly, and
every broken split file refused with a message naming it."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.splits import patient_stratum, split_patients
from ignite_trainer.data.records import Recording
from ignite_trainer.core.errors import ConfigError, DataError
from ignite_trainer.data.splits import (assign_folds, check_folds, fold_split, patient_strata, read_split_file,
                                   write_split_file)


def make_patients(n: int, seed: int = 0) -> list[Recording]:
    """``n`` patients, 1-3 recordings each, heart 0/1 and murmur present/absent/masked in every combination."""
    rng = random.Random(seed)
    recs = []
    for p in range(n):
        heart, murmur = p % 2, ("present", "absent", "unknown")[(p // 2) % 3]
        for k in range(rng.randint(1, 3)):
            recs.append(Recording(recording_id=f"{p}_{k}", patient_id=f"{p:04d}", wav_path=Path(f"/nowhere/{p}_{k}.wav"),
                                  labels=(float(heart), float(murmur == "present")), mask=(True, murmur != "unknown")))
    return recs


def test_folds_are_stratified_by_both_labels_and_cover_every_patient_once():
    recs = make_patients(60)
    folds = assign_folds(recs, 5, split_seed=3)
    assert sorted(p for f in folds for p in f) == sorted({r.patient_id for r in recs})
    by_patient = {}
    for r in recs:
        by_patient.setdefault(r.patient_id, []).append(r)
    strata = Counter(patient_stratum(v) for v in by_patient.values())
    assert len(strata) == 6  # heart 0/1 x murmur 0/1/masked
    for stratum, total in strata.items():
        per_fold = [sum(patient_stratum(by_patient[p]) == stratum for p in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == total
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


def test_folds_depend_on_split_seed_only_not_on_the_recordings_order():
    recs = make_patients(40)
    shuffled = list(recs)
    random.Random(1).shuffle(shuffled)
    assert assign_folds(recs, 4, 7) == assign_folds(shuffled, 4, 7)
    assert assign_folds(recs, 4, 7) != assign_folds(recs, 4, 8)


def test_old_configs_without_split_seed_keep_their_folds():
    """split_seed empty means seed: the dealing is the one split_patients always used for n_folds >= 2."""
    recs = make_patients(30)
    for fold in range(3):
        _, old_val = split_patients(recs, 0.2, seed=5, n_folds=3, fold=fold)
        _, new_val = fold_split(recs, 3, fold, TrainConfig(seed=5, n_folds=3, fold=fold).effective_split_seed)
        assert new_val == old_val
    assert TrainConfig(seed=5, split_seed=2).effective_split_seed == 2


def test_a_stratum_smaller_than_the_fold_count_is_dealt_over_the_folds_it_fills_with_one_warning(caplog):
    """60 patients of whom one is normal with a murmur: 3 folds still work (the stratum lands in one fold)."""
    import logging
    import ignite_trainer.data.splits as splits

    recs = [r for r in make_patients(61) if not (r.labels == (0.0, 1.0) and r.mask == (True, True))]
    recs.append(Recording(recording_id="rare_0", patient_id="9999", wav_path=Path("/nowhere/rare.wav"),
                          labels=(0.0, 1.0), mask=(True, True)))
    assert len(patient_strata(recs)[("0", "1")]) == 1
    splits._warned.clear()
    with caplog.at_level(logging.WARNING):
        folds = assign_folds(recs, 3, 0)
        assert assign_folds(recs, 3, 0) == folds  # and the same folds again, without a second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 stratum holds fewer patients than folds" in warnings[0]
    assert "heart=0, murmur=1 (1)" in warnings[0]
    assert sorted(p for f in folds for p in f) == sorted({r.patient_id for r in recs})
    assert sum("9999" in f for f in folds) == 1


def test_a_fold_that_would_lack_a_class_of_a_label_is_refused():
    recs = [r for r in make_patients(24) if not r.labels[1] or not r.mask[1]]
    recs += [Recording(recording_id=f"m{k}_0", patient_id=f"m{k}", wav_path=Path(f"/nowhere/m{k}.wav"),
                       labels=(float(k % 2), 1.0), mask=(True, True)) for k in range(2)]  # 2 murmur-present patients
    assign_folds(recs, 2, 0)
    with pytest.raises(DataError, match=r"n_folds=3: fold \d would hold no patient with murmur=1 \(the data has 2\).*"
                                        r"use at most 2 folds"):
        assign_folds(recs, 3, 0)


def test_a_label_no_patient_has_is_not_a_class_any_fold_must_hold():
    """PhysioNet 2016 has no murmur labels: every patient's murmur is missing, and folds are dealt as usual."""
    recs = [Recording(recording_id=f"{p}_0", patient_id=f"{p:04d}", wav_path=Path(f"/nowhere/{p}.wav"),
                      labels=(float(p % 2), 0.0), mask=(True, False)) for p in range(10)]
    assert len(assign_folds(recs, 5, 0)) == 5


def test_split_file_round_trip_json_and_csv(tmp_path):
    recs = make_patients(30)
    folds = assign_folds(recs, 3, 0)
    path = write_split_file(folds, tmp_path / "splits.json", split_seed=0)
    assert read_split_file(path) == folds
    assert json.loads(path.read_text())["split_seed"] == 0
    csv_path = tmp_path / "published.csv"  # a 1-based published split
    csv_path.write_text("patient_id,fold\n" + "".join(f"{p},{k + 1}\n" for k, f in enumerate(folds) for p in f))
    assert read_split_file(csv_path) == folds
    (tmp_path / "plain.json").write_text(json.dumps([[int(p) for p in f] for f in folds]))
    assert read_split_file(tmp_path / "plain.json") == [[str(int(p)) for p in f] for f in folds]  # ints become ids
    train, val = fold_split(recs, 0, 1, 0, split_file=path)
    assert {r.patient_id for r in val} == set(folds[1]) and not {r.patient_id for r in train} & set(folds[1])


@pytest.mark.parametrize("folds, message", [
    ([["0000", "0001"], ["0001", "0002"]], "patient 0001 is in folds 0 and 1"),
    ([["0000", "0000"], ["0001", "0002"]], "patient 0000 is in fold 0 twice"),
    ([["0000", "9999"], ["0001", "0002"]], r"1 patient id\(s\) not in the data, e.g. 9999"),
    ([["0000"], ["0001"]], r"1 patient\(s\) of the data are in no fold, e.g. 0002"),
    ([["0000", "0001", "0002"], []], "fold 1 is empty"),
    ([["0000", "0001", "0002"]], "1 fold"),
])
def test_broken_splits_are_refused(folds, message):
    with pytest.raises(DataError, match=message):
        check_folds(folds, ["0000", "0001", "0002"], "s.json")


def test_unreadable_split_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        read_split_file(bad)
    bad.write_text('{"folds": [["a"], [true]]}')
    with pytest.raises(DataError, match="fold 1 holds True"):
        read_split_file(bad)
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_text("patient_id,fold\n0000,one\n")
    with pytest.raises(DataError, match="line 2: fold 'one' is not an integer"):
        read_split_file(csv_bad)
    with pytest.raises(DataError, match="cannot read the split file"):
        read_split_file(tmp_path / "missing.json")


def test_split_file_fold_count_must_match_n_folds(tmp_path):
    recs = make_patients(30)
    path = write_split_file(assign_folds(recs, 3, 0), tmp_path / "s.json")
    with pytest.raises(ConfigError, match="n_folds=4 but .* holds 3 folds"):
        fold_split(recs, 4, 0, 0, split_file=path)
    with pytest.raises(ConfigError, match="fold=3 does not exist"):
        fold_split(recs, 0, 3, 0, split_file=path)
