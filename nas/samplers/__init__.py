"""Samplers nas offers beside Optuna's own."""

from nas.samplers.evolution import RegularizedEvolutionSampler

__all__ = ["RegularizedEvolutionSampler"]
