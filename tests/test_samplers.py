"""The regularized-evolution sampler: random start, one mutation per child, the best of a
tournament drawn from the newest trials, conditional parameters, and refusals."""

import optuna
import pytest

from nas.samplers import RegularizedEvolutionSampler
from nas.samplers.evolution import MUTATED_ATTR, PARENT_ATTR
from nas.space import load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)
NAMES = [f"x{i}" for i in range(6)]


def flat(trial):
    xs = [trial.suggest_categorical(n, [0, 1, 2, 3]) for n in NAMES]
    return float(sum(xs))


def run(sampler, objective=flat, n=60, direction="maximize"):
    study = optuna.create_study(direction=direction, sampler=sampler)
    study.optimize(objective, n_trials=n)
    return study


def test_first_population_is_random_then_each_child_changes_one_parameter():
    study = run(RegularizedEvolutionSampler(population_size=10, tournament_size=3, seed=0))
    trials = study.trials
    assert all(PARENT_ATTR not in t.system_attrs for t in trials[:10])
    by_number = {t.number: t for t in trials}
    for child in trials[10:]:
        parent = by_number[child.system_attrs[PARENT_ATTR]]
        changed = [n for n in NAMES if child.params[n] != parent.params[n]]
        assert changed == [child.system_attrs[MUTATED_ATTR]]
        assert child.number - 10 <= parent.number < child.number  # from the newest ten


def test_full_tournament_picks_the_best_of_the_newest_population_not_the_best_ever():
    # A tournament as large as the population picks its best; a trial that has aged out of
    # the population (older than the newest 5) is never a parent however good it was.
    def objective(trial):
        flat(trial)
        return 100.0 if trial.number == 0 else float(trial.number % 7)

    study = run(RegularizedEvolutionSampler(population_size=5, tournament_size=5, seed=1),
                objective, n=30)
    values = {t.number: t.value for t in study.trials}
    for child in study.trials[5:]:
        parent = child.system_attrs[PARENT_ATTR]
        window = range(child.number - 5, child.number)
        assert parent in window
        assert values[parent] == max(values[i] for i in window)
    assert all(t.system_attrs[PARENT_ATTR] != 0 for t in study.trials[6:])


def test_minimize_picks_the_lowest():
    study = run(RegularizedEvolutionSampler(population_size=4, tournament_size=4, seed=2),
                direction="minimize", n=20)
    values = {t.number: t.value for t in study.trials}
    for child in study.trials[4:]:
        window = range(child.number - 4, child.number)
        assert values[child.system_attrs[PARENT_ATTR]] == min(values[i] for i in window)


def test_evolution_climbs_where_random_does_not():
    # 4^6 = 4,096 points and one optimum (18): evolution's hill climbing reaches a sum random
    # sampling's 60 draws (about 1 in 100 at 17 or more) seldom reach.
    evolved = run(RegularizedEvolutionSampler(population_size=10, tournament_size=5, seed=3),
                  n=120)
    assert evolved.best_value >= 17
    for t in evolved.trials[10:]:
        assert all(v in (0, 1, 2, 3) for v in t.params.values())


def test_same_seed_same_trials():
    a = run(RegularizedEvolutionSampler(population_size=5, seed=7), n=25)
    b = run(RegularizedEvolutionSampler(population_size=5, seed=7), n=25)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]


def test_a_conditional_parameter_the_parent_lacks_is_drawn():
    # On the real space a block's expansion exists only for mbconv: a child whose op mutated to
    # mbconv asks it, and a child keeps every other block of its parent.
    space = load_space("mnasnet")
    study = run(RegularizedEvolutionSampler(population_size=8, tournament_size=3, seed=4),
                lambda t: float(space.sample(t).blocks[3].filters), n=80)
    by_number = {t.number: t for t in study.trials}
    grew = 0
    for child in study.trials[8:]:
        parent = by_number[child.system_attrs[PARENT_ATTR]]
        mutated = child.system_attrs[MUTATED_ATTR]
        same = [n for n in parent.params if n in child.params and n != mutated
                and not n.endswith(("_expansion", "_skip"))]
        assert all(child.params[n] == parent.params[n] for n in same)
        grew += len(set(child.params) - set(parent.params))
    assert grew > 0


def test_failed_trials_are_not_parents():
    def objective(trial):
        flat(trial)
        if trial.number % 2:
            raise optuna.TrialPruned()
        return float(trial.number)

    study = run(RegularizedEvolutionSampler(population_size=4, tournament_size=2, seed=5),
                objective, n=30)
    parents = {t.system_attrs[PARENT_ATTR] for t in study.trials if PARENT_ATTR in t.system_attrs}
    assert parents and all(p % 2 == 0 for p in parents)


def test_refusals():
    with pytest.raises(ValueError, match="population_size"):
        RegularizedEvolutionSampler(population_size=1)
    with pytest.raises(ValueError, match="tournament_size"):
        RegularizedEvolutionSampler(population_size=5, tournament_size=6)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=RegularizedEvolutionSampler())
    with pytest.raises(ValueError, match="single-objective"):
        study.ask()
