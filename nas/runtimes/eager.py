"""Eager PyTorch: the training framework itself, kept as a runtime for comparison."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from nas.runtimes.base import Compiled, Predictor, Runtime


class EagerRuntime(Runtime):
    name = "eager"
    packages = ("torch",)
    extra = ""

    def version(self) -> str:
        return torch.__version__

    def convert(self, model: nn.Module, example: torch.Tensor, *, precision: str,
                calibration: torch.Tensor | None) -> bytes:
        raise NotImplementedError("eager PyTorch ships no artifact")

    def load(self, artifact: bytes, *, threads: int, device: str) -> Predictor:
        raise NotImplementedError("eager PyTorch ships no artifact")

    def compile(self, model: nn.Module, example: torch.Tensor, *, threads: int = 1,
                precision: str = "fp32", calibration: torch.Tensor | None = None,
                device: str = "cpu") -> Compiled:
        self.check(precision=precision, device=device)
        start = time.perf_counter()
        # a copy: the caller's model keeps its layout and device (other runtimes export it)
        model = copy.deepcopy(model).eval().to(device=device, memory_format=torch.channels_last)

        def predict(x: torch.Tensor) -> torch.Tensor:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    x = x.to(device=device, memory_format=torch.channels_last)
                    return model(x).cpu()
            finally:
                torch.set_num_threads(previous)

        return Compiled(self.name, precision, None, predict, time.perf_counter() - start)
