"""Regularized evolution (Real et al., AAAI 2019, Algorithm 1) as an Optuna sampler.

Each new trial copies the best of a random tournament drawn from the `population_size` most
recently finished trials (the population ages: the oldest member leaves as each child joins,
whatever its fitness) and changes one of its parameters to another value. Until the first
`population_size` trials have finished, trials are drawn at random, as the paper's initial
population is. No well-kept Optuna sampler does this (checked on PyPI and OptunaHub, 2026-12);
`benchmarks/results/sampler_efficiency_zen4.txt` holds its measurement against Optuna's.

Parameters a trial asks that its parent did not (a conditional parameter: a block's expansion
once its op mutated to mbconv) are drawn by the independent sampler. The child is planned in
`before_trial`, so every worker process plans its own children from the shared storage; the
parent's number is kept in the trial's system attributes (``evolution:parent``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

PARENT_ATTR = "evolution:parent"
MUTATED_ATTR = "evolution:mutated"


class RegularizedEvolutionSampler(BaseSampler):
    """Aging evolution for single-objective studies.

    Args:
        population_size: How many of the most recently finished trials form the population
            (Real et al. used 100 at 20,000 trials; about 20 suits a few hundred).
        tournament_size: How many members are drawn to pick each parent (the best of them).
        seed: Seed for the tournaments, the mutations and the independent sampler.
        independent_sampler: Draws the first population and parameters a parent lacks;
            RandomSampler(seed) by default.
    """

    def __init__(self, *, population_size: int = 20, tournament_size: int = 5,
                 seed: int | None = None,
                 independent_sampler: BaseSampler | None = None) -> None:
        if population_size < 2:
            raise ValueError(f"population_size={population_size}: needs at least 2")
        if not 1 <= tournament_size <= population_size:
            raise ValueError(f"tournament_size={tournament_size}: must be in 1.."
                             f"{population_size} (the population size)")
        self.population_size = population_size
        self.tournament_size = tournament_size
        self._rng = np.random.RandomState(seed)
        self._independent = independent_sampler or RandomSampler(seed=seed)
        self._children: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._independent.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def population(self, study: optuna.Study) -> list[FrozenTrial]:
        """The `population_size` most recently finished trials with a value."""
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.datetime_complete is not None]
        done.sort(key=lambda t: (t.datetime_complete, t.number))
        return done[-self.population_size:]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if study._is_multi_objective():
            raise ValueError("RegularizedEvolutionSampler is single-objective; for a Pareto "
                             "search use NSGA-II")
        self._independent.before_trial(study, trial)
        population = self.population(study)
        if len(population) < self.population_size:
            return
        with self._lock:
            picks = self._rng.choice(len(population), self.tournament_size, replace=False)
            tournament = [population[i] for i in sorted(picks)]
            better = max if study.direction == StudyDirection.MAXIMIZE else min
            parent = better(tournament, key=lambda t: t.value)
            child = dict(parent.params)
            mutable = [n for n, d in parent.distributions.items() if _has_choice(d)]
            mutated = None
            if mutable:
                mutated = mutable[self._rng.randint(len(mutable))]
                dist = parent.distributions[mutated]
                if isinstance(dist, CategoricalDistribution):
                    others = [c for c in dist.choices if c != child[mutated]]
                    child[mutated] = others[self._rng.randint(len(others))]
                else:  # numeric: redrawn by the independent sampler
                    del child[mutated]
            self._children[trial._trial_id] = {
                n: (v, parent.distributions[n]) for n, v in child.items()}
        study._storage.set_trial_system_attr(trial._trial_id, PARENT_ATTR, parent.number)
        if mutated is not None:
            study._storage.set_trial_system_attr(trial._trial_id, MUTATED_ATTR, mutated)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        planned = self._children.get(trial._trial_id, {}).get(param_name)
        if planned is not None:
            value, dist = planned
            if dist == param_distribution:
                return value
        return self._independent.sample_independent(study, trial, param_name,
                                                    param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._children.pop(trial._trial_id, None)
        self._independent.after_trial(study, trial, state, values)


def _has_choice(dist: BaseDistribution) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return len(dist.choices) > 1
    return not dist.single()
