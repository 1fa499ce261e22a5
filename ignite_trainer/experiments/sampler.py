"""How a sweep draws a trial's parameters and decides to prune it: a per-trial seeded sampler, the pruner.

A sampler seeded once per process would make two workers suggest the same parameters (and a restarted
worker repeat its first trials); `TrialSeededSampler` seeds each trial from ``(sweep seed, trial number)``.
`suggest` draws one `Param` of the space, `make_pruner` builds the space's pruner.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from ignite_trainer.experiments.space import Param, SweepSpace

__all__ = ["TrialSeededSampler", "suggest", "make_pruner"]


class TrialSeededSampler(BaseSampler):
    """TPE (or random) sampling seeded from ``(seed, trial number)`` rather than once per process.

    Workers started with the same sweep seed would otherwise draw the same random start-up points; a
    restarted worker would repeat its first trials. The inner sampler holds no state but its random
    generator (the history is read from the storage), so a fresh one per trial changes nothing else.

    Example::

        study = optuna.create_study(sampler=TrialSeededSampler("tpe", seed=0))
    """

    def __init__(self, name: str = "tpe", seed: int = 0) -> None:
        self.name = name
        self.seed = seed
        self._inner = self._for_trial(0)

    def _for_trial(self, number: int) -> BaseSampler:
        seed = int(np.random.SeedSequence([self.seed, number]).generate_state(1)[0])
        return TPESampler(seed=seed) if self.name == "tpe" else RandomSampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._for_trial(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)


def suggest(trial: optuna.Trial, param: Param) -> Any:
    if param.kind == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(param.name, float(param.low), float(param.high), step=param.step, log=param.log)


def make_pruner(space: SweepSpace) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(**space.pruner_args) if space.pruner == "median" else optuna.pruners.NopPruner()
