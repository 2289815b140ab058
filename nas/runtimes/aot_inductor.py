"""PyTorch's own deployment path: torch.export, then AOTInductor compiles the graph to a
shared library packaged as ``.pt2`` (C++ compiler needed), loaded without Python overhead."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from nas.runtimes.base import Predictor, Runtime, RuntimeUnavailable, quiet


class AotInductorRuntime(Runtime):
    name = "aoti"
    packages = ("torch",)
    extra = ""
    suffix = ".pt2"
    devices = ("cpu",)  # a CUDA package needs the model exported on the GPU: not done yet

    def available(self) -> bool:
        return shutil.which(os.environ.get("CXX", "c++")) is not None

    def check(self, *, precision: str = "fp32", device: str = "cpu") -> None:
        if not self.available():
            raise RuntimeUnavailable("runtime 'aoti' compiles C++: install a C++ compiler "
                                     "(e.g. apt-get install g++) or set CXX")
        super().check(precision=precision, device=device)

    def version(self) -> str:
        return torch.__version__

    def convert(self, model: nn.Module, example: torch.Tensor, *, precision: str,
                calibration: torch.Tensor | None) -> bytes:
        program = torch.export.export(model, (example.contiguous(),))
        with tempfile.TemporaryDirectory() as tmp, quiet("torch.utils.cpp_extension"):
            path = Path(tmp) / "model.pt2"
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
            return path.read_bytes()

    def load(self, artifact: bytes, *, threads: int, device: str) -> Predictor:
        # the loader needs a file; it maps the library, so the file may go once loaded
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt2"
            path.write_bytes(artifact)
            runner = torch._inductor.aoti_load_package(str(path))

        def predict(x: torch.Tensor) -> torch.Tensor:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)  # the compiled kernels use OpenMP's thread count
            try:
                with torch.inference_mode():
                    out = runner(x.to(device).contiguous())
            finally:
                torch.set_num_threads(previous)
            out = out[0] if isinstance(out, (list, tuple)) else out
            return out.cpu()

        return predict
