"""SPACE.yaml: what a sweep searches, what it optimises, and how; read and checked in full before any trial.

A space file names `TrainConfig` fields with a distribution each, plus the objective, the sampler, the
pruner and the fixed ``base`` settings every trial starts from::

    params:
      learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      batch_size: {type: int, low: 8, high: 32, step: 8}
      scheduler: {type: categorical, choices: [cosine_annealing, none]}
    objective: {metric: macro_f1, direction: maximize}   # any score a run logs per epoch
    sampler: {name: tpe, seed: 0}                          # tpe | random
    pruner: {name: median, n_startup_trials: 5}            # median (MedianPruner's arguments) | none
    base: {epochs: 30, window_seconds: 5}
    experiment: run                                        # or {kind: cv, folds: 5, seeds: [0, 1], split_seed: 0}

With ``experiment: {kind: cv, ...}`` each trial is a cross-validation experiment (`cv.cross_validate`:
``folds`` patient folds, one run per fold and seed of ``seeds``, folds dealt with ``split_seed``, default
the base config's), and the objective may also be a pooled out-of-fold score of its report,
``oof.<metric>`` (`cv_report.METRICS`: ``oof.murmur_weighted_accuracy``, ``oof.outcome_cost``,
``oof.murmur.auroc``, ...); a per-epoch score name is then the mean over the experiment's runs of each
run's best value.

Every range is checked by `TrainConfig` itself: the base config is built at each distribution's low and
high end and at every choice, so a range outside a field's limits fails with the field's own message.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import optuna
import yaml

from ignite_trainer.core.config import TrainConfig, read_text_file
from ignite_trainer.experiments.cv_report import CHALLENGE_METRICS as CV_CHALLENGE_METRICS, METRICS as CV_METRICS
from ignite_trainer.core.vocabulary import LABELS as LABEL_NAMES, STATS as METRIC_NAMES, score_mode
from ignite_trainer.core.errors import ConfigError

#: Every score a run writes to ``metrics.jsonl`` each epoch (the names ``monitor`` accepts).
OBJECTIVE_METRICS: tuple[str, ...] = ("val_loss", "macro_f1") + tuple(
    f"{label}.{metric}" for label in LABEL_NAMES for metric in METRIC_NAMES)

#: Fields the sweep sets itself: each trial's run directory and the score its best checkpoint keeps.
SWEEP_OWNED_FIELDS = frozenset({"name", "output_dir", "monitor"})

#: Kinds of experiment a trial can be: one run, or a cross-validation experiment
#: (`ignite_trainer.experiments.sweeps.TRIAL_RUNNERS` runs each).
EXPERIMENTS = ("run", "cv")

#: The pooled out-of-fold scores of a cross-validation experiment's report (``summary.json``'s ``pooled``).
OOF_OBJECTIVES: tuple[str, ...] = tuple(f"oof.{m}" for m in CV_METRICS)

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
_TOP_LEVEL = {"params", "objective", "sampler", "pruner", "base", "experiment"}


@dataclass(frozen=True)
class Param:
    """One searched field: ``kind`` is float, int or categorical, with its bounds or choices."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[Any, ...] = ()

    def extremes(self) -> list[Any]:
        """The values that must each give a valid config: both ends of a range, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


@dataclass(frozen=True)
class SweepSpace:
    """A parsed and validated SPACE.yaml. ``base`` holds the checked config overrides every trial starts from.

    Example::

        space = load_space("space.yaml")
        print(space.metric, space.direction, [p.name for p in space.params])
    """

    params: tuple[Param, ...]
    metric: str
    direction: str
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "median"
    pruner_args: Mapping[str, Any] = field(default_factory=dict)
    base: Mapping[str, Any] = field(default_factory=dict)
    experiment: str = "run"
    #: ``folds``, ``seeds`` and ``split_seed`` of a ``cv`` experiment (empty for a single run).
    experiment_args: Mapping[str, Any] = field(default_factory=dict)

    def base_config(self) -> TrainConfig:
        return TrainConfig.from_mapping(self.base, source="base")

    def fingerprint(self) -> str:
        """A short hash of everything that defines the search: workers joining one study must agree on it."""
        text = json.dumps(space_to_dict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def space_to_dict(space: SweepSpace) -> dict[str, Any]:
    params = {}
    for p in space.params:
        if p.kind == "categorical":
            params[p.name] = {"type": p.kind, "choices": list(p.choices)}
        else:
            params[p.name] = {"type": p.kind, "low": p.low, "high": p.high,
                              **({"log": True} if p.log else {}), **({"step": p.step} if p.step is not None else {})}
    return {"params": params, "objective": {"metric": space.metric, "direction": space.direction},
            "sampler": {"name": space.sampler, "seed": space.seed},
            "pruner": {"name": space.pruner, **space.pruner_args}, "base": dict(space.base),
            "experiment": ({"kind": space.experiment, **space.experiment_args} if space.experiment_args
                           else space.experiment)}


def load_space(path: str | Path) -> SweepSpace:
    """Read and check SPACE.yaml; every problem is one `ConfigError` naming the file and the field.

    Example::

        space = load_space("space.yaml")   # space.yaml: params.learning_rate.low: 0 -> ConfigError:
        # space.yaml: params.learning_rate: learning_rate=0.0 is out of range (must be > 0.0)
    """
    path = Path(path)
    text = read_text_file(path, "the space file")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping with params, objective, sampler, pruner, base")
    return parse_space(values, source=str(path))


def parse_space(values: Mapping[str, Any], source: str = "space") -> SweepSpace:
    """Check a space given as a mapping (what `load_space` reads); see the module docstring for the layout.

    Example::

        space = parse_space({"params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                             "objective": {"metric": "macro_f1"}, "base": {"epochs": 20}})
    """
    unknown = sorted(set(values) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' (expected: {', '.join(sorted(_TOP_LEVEL))})")
    base_values = _mapping(values.get("base") or {}, f"{source}: base")
    for name in SWEEP_OWNED_FIELDS & set(base_values):
        raise ConfigError(f"{source}: base.{name} is set by the sweep for each trial; remove it")
    try:
        base = TrainConfig.from_mapping(base_values, source=f"{source}: base")
    except ConfigError as e:
        raise ConfigError(str(e)) from None

    raw_params = _mapping(values.get("params"), f"{source}: params")
    if not raw_params:
        raise ConfigError(f"{source}: params is empty; name at least one config field to search")
    params = tuple(_param(name, spec, base, f"{source}: params.{name}") for name, spec in raw_params.items())

    experiment, experiment_args = _experiment(values.get("experiment", "run"), f"{source}: experiment")
    if experiment_args.get("split_seed") is not None and base.split_file:
        raise ConfigError(f"{source}: experiment.split_seed deals folds, base.split_file gives them already "
                          "(use one of the two)")
    metric, direction = _objective(values.get("objective"), f"{source}: objective", experiment, base)
    sampler, seed = _sampler(values.get("sampler"), f"{source}: sampler")
    pruner, pruner_args = _pruner(values.get("pruner"), f"{source}: pruner")
    return SweepSpace(params, metric, direction, sampler, seed, pruner, pruner_args, dict(base_values), experiment,
                      experiment_args)


def _experiment(value: Any, where: str) -> tuple[str, dict[str, Any]]:
    """``run`` (or ``{kind: run}``), or ``{kind: cv, folds: K, seeds: [..], split_seed: S}``."""
    spec = {"kind": value} if isinstance(value, str) else _mapping(value, where)
    kind = spec.get("kind")
    if kind not in EXPERIMENTS:
        raise ConfigError(f"{where}: kind={kind!r} is not one of: {', '.join(EXPERIMENTS)}")
    allowed = {"kind"} | ({"folds", "seeds", "split_seed"} if kind == "cv" else set())
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key '{extra[0]}' for kind {kind} (expected: {', '.join(sorted(allowed))})")
    if kind == "run":
        return kind, {}
    folds = spec.get("folds")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"{where}: folds={folds!r} must be an integer >= 2")
    seeds = spec.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seeds)):
        raise ConfigError(f"{where}: seeds={seeds!r} must be a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds={seeds!r} repeat a seed")
    args: dict[str, Any] = {"folds": folds, "seeds": list(seeds)}
    if spec.get("split_seed") is not None:
        split_seed = spec["split_seed"]
        if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
            raise ConfigError(f"{where}: split_seed={split_seed!r} must be an integer >= 0")
        args["split_seed"] = split_seed
    return kind, args


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _param(name: Any, spec: Any, base: TrainConfig, where: str) -> Param:
    known = TrainConfig.field_names()
    if name not in known:
        hint = difflib.get_close_matches(str(name), known, n=1)
        raise ConfigError(f"{where}: unknown config field '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    if name in SWEEP_OWNED_FIELDS:
        raise ConfigError(f"{where}: '{name}' is set by the sweep for each trial and cannot be searched")
    spec = _mapping(spec, where)
    kind = spec.get("type")
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
    if kind not in allowed:
        raise ConfigError(f"{where}: type={kind!r} must be float, int or categorical")
    extra = sorted(set(spec) - allowed[kind])
    if extra:
        raise ConfigError(f"{where}: unknown key '{extra[0]}' for a {kind} distribution")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise ConfigError(f"{where}: choices {choices} repeat a value")
        param = Param(name, kind, choices=tuple(choices))
    else:
        param = _range(name, kind, spec, where)
    for value in param.extremes():
        try:
            base.updated({name: value}, source=where)
        except ConfigError as e:
            raise ConfigError(str(e)) from None
    return param


def _range(name: str, kind: str, spec: dict[str, Any], where: str) -> Param:
    number = (int,) if kind == "int" else (int, float)
    low, high = spec.get("low"), spec.get("high")
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number):
            raise ConfigError(f"{where}: {key}={value!r} must be {'an integer' if kind == 'int' else 'a number'}")
    if not low < high:
        raise ConfigError(f"{where}: low={low} must be below high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log={log!r} must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: low={low} must be > 0 on a log scale")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise ConfigError(f"{where}: step={step!r} must be a positive {'integer' if kind == 'int' else 'number'}")
        if log:
            raise ConfigError(f"{where}: step cannot be combined with log: true")
    if kind == "float":
        low, high = float(low), float(high)
    return Param(name, kind, low, high, log, step)


def objective_mode(metric: str) -> str:
    """``"min"`` or ``"max"``: which way ``metric`` is better (an out-of-fold cost is lower-better)."""
    if metric.startswith("oof."):
        return "min" if metric.endswith("cost") else "max"
    return score_mode(metric)


def _objective(value: Any, where: str, experiment: str = "run", base: TrainConfig | None = None) -> tuple[str, str]:
    spec = _mapping(value, where)
    extra = sorted(set(spec) - {"metric", "direction"})
    if extra:
        raise ConfigError(f"{where}: unknown key '{extra[0]}' (expected metric, direction)")
    metric = spec.get("metric", "val_loss")
    allowed = OBJECTIVE_METRICS + (OOF_OBJECTIVES if experiment == "cv" else ())
    if metric not in allowed:
        if metric in OOF_OBJECTIVES:
            raise ConfigError(f"{where}: metric={metric!r} is a cross-validated score; it needs "
                              "experiment: {kind: cv, folds: K}")
        what = "an experiment" if experiment == "cv" else "a run"
        raise ConfigError(f"{where}: metric={metric!r} is not a score {what} reports "
                          f"(one of: {', '.join(allowed)})")
    if base is not None and base.format == "physionet2016" and (
            metric.partition(".")[2] in CV_CHALLENGE_METRICS or metric.partition(".")[0] == "murmur"
            or metric.startswith("oof.murmur")):
        raise ConfigError(f"{where}: metric={metric!r} is never reported on physionet2016 data (it has no murmur "
                          "labels or Challenge classes)")
    natural = "minimize" if objective_mode(metric) == "min" else "maximize"
    direction = spec.get("direction", natural)
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{where}: direction={direction!r} must be maximize or minimize")
    if direction != natural:
        raise ConfigError(f"{where}: direction={direction} contradicts {metric}, which is better when "
                          f"{'lower' if natural == 'minimize' else 'higher'} (each run keeps its best checkpoint by it)")
    return metric, direction


def _sampler(value: Any, where: str) -> tuple[str, int]:
    spec = _mapping(value, where)
    extra = sorted(set(spec) - {"name", "seed"})
    if extra:
        raise ConfigError(f"{where}: unknown key '{extra[0]}' (expected name, seed)")
    name = spec.get("name", "tpe")
    if name not in SAMPLERS:
        raise ConfigError(f"{where}: name={name!r} is not one of: {', '.join(SAMPLERS)}")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{where}: seed={seed!r} must be an integer >= 0")
    return name, seed


def _pruner(value: Any, where: str) -> tuple[str, dict[str, Any]]:
    spec = dict(_mapping(value, where))
    name = spec.pop("name", "median")
    if name not in PRUNERS:
        raise ConfigError(f"{where}: name={name!r} is not one of: {', '.join(PRUNERS)}")
    if name == "none" and spec:
        raise ConfigError(f"{where}: '{sorted(spec)[0]}' has no meaning with name: none")
    if name == "median":
        try:
            optuna.pruners.MedianPruner(**spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return name, spec
