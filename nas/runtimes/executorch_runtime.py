"""ExecuTorch with the XNNPACK delegate: PyTorch's on-device runtime for phones and embedded
CPUs, on the XNNPACK kernels that LiteRT (TensorFlow Lite) also runs on CPUs; int8 by the
XNNPACK quantizer (PT2E, symmetric, per-channel weights)."""

from __future__ import annotations

import torch
from torch import nn

from nas.runtimes.base import Predictor, Runtime, calibration_batches, quiet

LOGGERS = ("torch.utils._pytree",)  # torchao's import warns about an enum through it


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    packages = ("executorch",)
    extra = "executorch"
    suffix = ".pte"
    precisions = ("fp32", "int8")

    def version(self) -> str:
        from importlib.metadata import version

        return version("executorch")

    def convert(self, model: nn.Module, example: torch.Tensor, *, precision: str,
                calibration: torch.Tensor | None) -> bytes:
        with quiet(*LOGGERS):
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )
            from executorch.exir import to_edge_transform_and_lower

            example = example.contiguous()
            if precision == "int8":
                model = _quantized(model, example, calibration_batches(calibration, example))
            program = torch.export.export(model, (example,))
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            return lowered.to_executorch().buffer

    def load(self, artifact: bytes, *, threads: int, device: str) -> Predictor:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime as EtRuntime

        # XNNPACK takes its thread pool when the method loads; the pool is process-wide, and
        # its C++ code logs the CPU probe and the reset to stderr
        with quiet(*LOGGERS):
            portable_lib._unsafe_reset_threadpool(threads)
            program = EtRuntime.get().load_program(artifact)
            method = program.load_method("forward")

        def predict(x: torch.Tensor) -> torch.Tensor:
            # the method lives only as long as its program (else: "failed with error 0x10"),
            # and its output buffer is reused by the next call
            out = method.execute([x.detach().float().contiguous()])[0]
            return out.clone() if program is not None else out

        return predict


def _quantized(model: nn.Module, example: torch.Tensor,
               batches: list[torch.Tensor]) -> nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
        is_per_channel=True))
    graph = torch.export.export(model, (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    return convert_pt2e(prepared)
