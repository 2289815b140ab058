"""Hardware-aware neural architecture search in the spirit of MnasNet.

Public names are loaded lazily, so that `nas.arch` and `nas.space` stay free of torch.
"""

from importlib import import_module

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
