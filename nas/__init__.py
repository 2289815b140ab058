"""Hardware-aware neural architecture search in the spirit of MnasNet.

Public names are loaded lazily, so that `nas.arch` and `nas.space` stay free of torch.
Importing nas sets GOMP_SPINCOUNT (see below) unless the environment already has it.
"""

import os
from importlib import import_module

# GNU OpenMP (torch's CPU wheel) lets an idle thread spin 300,000 times before it sleeps. Two
# trainings on one CPU with a thread per core each (the same nas.search started twice, as the
# README allows) then ran 14x slower together than one alone: 29 against 408 img/s on a 2-core
# VM (benchmarks/oversubscription.py). 10,000 spins kept one training at its speed and the two
# at 317 img/s. libgomp reads this once, when torch loads it: hence here, before any torch
# import of the tools; a value the user set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__all__ = [
    "Architecture", "BlockSpec", "load_architecture", "save_architecture", "build_model",
    "SearchSpace", "load_space", "measure_latency", "LatencyCache", "load_data", "ProxyBudget",
    "proxy_train", "reward",
]
_HOME = {
    "Architecture": "nas.arch", "BlockSpec": "nas.arch", "load_architecture": "nas.arch",
    "save_architecture": "nas.arch", "build_model": "nas.model", "SearchSpace": "nas.space",
    "load_space": "nas.space", "measure_latency": "nas.latency", "LatencyCache": "nas.latency",
    "load_data": "nas.data", "ProxyBudget": "nas.proxy", "proxy_train": "nas.proxy",
    "reward": "nas.reward",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'nas' has no attribute {name!r}")
