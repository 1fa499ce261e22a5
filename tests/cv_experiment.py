"""One tiny cross-validation experiment shared by the cv and ensemble tests (like conftest's `trained_run`).

Seed 47's first 14 synthetic patients hold three strata of at least 3 patients each (Absent murmur with a
normal and an abnormal outcome, Present murmur with an abnormal one), so 3 folds are allowed and 4 are not.
"""

from dataclasses import dataclass
from pathlib import Path

from conftest import tiny_config
from ignite_trainer.experiments.cv import cross_validate
from ignite_trainer.data.synthetic import write_synthetic

N_PATIENTS, DATA_SEED, FOLDS, SEEDS = 14, 47, 3, [0, 1]


@dataclass(frozen=True)
class SharedExperiment:
    base: Path
    data: Path
    exp_dir: Path
    summary: dict


_CACHE: dict[str, object] = {}


def cv_data(tmp_path_factory) -> tuple[Path, Path]:
    """``(base, data)``: the dataset and its feature cache, written once per session."""
    if "data" not in _CACHE:
        base = tmp_path_factory.mktemp("cv")
        _CACHE["data"] = (base, write_synthetic(base / "data", N_PATIENTS, DATA_SEED))
    return _CACHE["data"]


def cv_config(tmp_path_factory, **changes):
    base, data = cv_data(tmp_path_factory)
    return tiny_config(data, base, **{"epochs": 1, **changes})


def shared_experiment(tmp_path_factory) -> SharedExperiment:
    """3 folds x 2 seeds, 1 epoch each, run in this process (jobs=1)."""
    if "exp" not in _CACHE:
        base, data = cv_data(tmp_path_factory)
        exp_dir = base / "exp"
        summary = cross_validate(cv_config(tmp_path_factory), FOLDS, SEEDS, exp_dir=exp_dir, bootstrap=20,
                                 echo=lambda _: None)
        _CACHE["exp"] = SharedExperiment(base, data, exp_dir, summary)
    return _CACHE["exp"]
