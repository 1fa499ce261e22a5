"""TrainConfig: the reference recipe's defaults, YAML + CLI layering, and one clear error per bad value."""

import pytest
import yaml

from ignite_trainer.core.config import TrainConfig, config_conflicts
from ignite_trainer.core.errors import ConfigError


def test_defaults_are_the_seeds():
    c = TrainConfig()
    assert (c.batch_size, c.learning_rate, c.weight_decay, c.epochs) == (32, 0.001, 0.01, 100)
    assert (c.early_stopping_patience, c.scheduler, c.gradient_clip) == (15, "cosine_annealing", 1.0)
    assert c.pos_weight == (1.0, 2.5)


def test_yaml_then_cli_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlearning_rate: 1e-4\nbatch_size: 8\n")
    c = TrainConfig.from_yaml(path).updated({"batch_size": 16}).with_overrides(["weight_decay=0", "name=abc"])
    assert (c.epochs, c.learning_rate, c.batch_size, c.weight_decay, c.name) == (7, 1e-4, 16, 0.0, "abc")


def test_round_trip_through_yaml_is_exact(tmp_path):
    c = TrainConfig(epochs=3, name="x", monitor="murmur.f1")
    path = tmp_path / "config.yaml"
    path.write_text(c.to_yaml())
    assert TrainConfig.from_yaml(path) == c


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lerning_rate": 0.1}, "unknown config field 'lerning_rate' (did you mean 'learning_rate'?)"),
        ({"learning_rate": -0.1}, "learning_rate=-0.1 is out of range (must be > 0.0)"),
        ({"learning_rate": 0}, "learning_rate=0.0 is out of range"),
        ({"epochs": 0}, "epochs=0 is out of range (must be >= 1)"),
        ({"epochs": "ten"}, "epochs='ten' must be an integer"),
        ({"batch_size": 2.5}, "batch_size=2.5 must be an integer"),
        ({"amp": "yes"}, "amp='yes' must be true or false"),
        ({"scheduler": "step"}, "scheduler='step' is not one of: cosine_annealing, none"),
        ({"monitor": "accuracy"}, "monitor='accuracy' is not a score"),
        ({"band_low_hz": 500.0}, "band_high_hz=400.0 must be above band_low_hz=500.0"),
        ({"sample_rate": 800}, "must be below the Nyquist frequency 400 Hz"),
        ({"n_folds": 5, "fold": 5}, "fold=5 must be below n_folds=5"),
        ({"gradient_clip": float("nan")}, "must be a finite number"),
        ({"name": "a/b"}, "is not a valid run directory name"),
    ],
)
def test_each_bad_value_is_one_clear_error(values, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_mapping(values)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: line"):
        TrainConfig.from_yaml(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_set_needs_key_value():
    with pytest.raises(ConfigError, match="expected key=value"):
        TrainConfig().with_overrides(["epochs"])


def test_conflicts_ignore_fields_that_do_not_change_the_math():
    saved = TrainConfig(epochs=5).to_dict()
    assert config_conflicts(saved, TrainConfig(epochs=5, num_workers=2, device="cpu", progress=False)) == []
    conflicts = config_conflicts(saved, TrainConfig(epochs=6, learning_rate=0.01))
    assert any(c.startswith("epochs: checkpoint has 5, now 6") for c in conflicts)
    assert any(c.startswith("learning_rate") for c in conflicts)


def test_to_yaml_is_plain():
    assert yaml.safe_load(TrainConfig().to_yaml())["batch_size"] == 32
