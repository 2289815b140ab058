"""Inference runtimes that latency is measured in and networks are exported for.

    from nas.runtimes import get_runtime
    compiled = get_runtime("onnxruntime").compile(model, torch.randn(1, 3, 224, 224))
    compiled.predict(x)         # logits, as the deployed network computes them
    compiled.artifact           # the .onnx file's bytes

Which runtime to pick for which target: docs/latency.md and benchmarks/README.md.
"""

from nas.runtimes.aot_inductor import AotInductorRuntime
from nas.runtimes.base import (
    PRECISIONS,
    Compiled,
    ConversionError,
    Predictor,
    Runtime,
    RuntimeUnavailable,
    UnsupportedSetting,
)
from nas.runtimes.eager import EagerRuntime
from nas.runtimes.executorch_runtime import ExecuTorchRuntime
from nas.runtimes.onnx_runtime import OnnxRuntime

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    EagerRuntime(), OnnxRuntime(), ExecuTorchRuntime(), AotInductorRuntime())}
RUNTIME_NAMES = tuple(RUNTIMES)
# what a user deploying to a CPU would ship, chosen from benchmarks/results/runtime_ranking_*.txt
DEFAULT_RUNTIME = "onnxruntime"


def get_runtime(name: str) -> Runtime:
    """The runtime called `name`; a one-line error lists the allowed names."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise UnsupportedSetting(f"runtime {name!r} is not known; expected one of "
                                 f"{list(RUNTIME_NAMES)}") from None


__all__ = ["DEFAULT_RUNTIME", "PRECISIONS", "RUNTIMES", "RUNTIME_NAMES", "Compiled",
           "ConversionError", "Predictor", "Runtime", "RuntimeUnavailable", "UnsupportedSetting",
           "get_runtime"]
