"""ONNX Runtime: the network exported by torch.onnx (torch.export-based), run by ORT's CPU
execution provider (CUDA provider on a GPU); int8 by ORT's static quantizer (QDQ)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nas.runtimes.base import (
    Predictor,
    Runtime,
    UnsupportedSetting,
    calibration_batches,
    quiet,
)

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
LOGGERS = ("torch.onnx", "onnxscript", "root")  # the exporter's steps, the quantizer's log


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    packages = ("onnxruntime", "onnx", "onnxscript")
    extra = ""  # a dependency of nas itself: the default runtime
    suffix = ".onnx"
    precisions = ("fp32", "int8")
    devices = ("cpu", "cuda")

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def convert(self, model: nn.Module, example: torch.Tensor, *, precision: str,
                calibration: torch.Tensor | None) -> bytes:
        data = export_onnx(model, example)
        if precision == "int8":
            data = quantize_int8(data, calibration_batches(calibration, example))
        return data

    def check(self, *, precision: str = "fp32", device: str = "cpu") -> None:
        super().check(precision=precision, device=device)
        import onnxruntime as ort

        if (torch.device(device).type == "cuda"
                and "CUDAExecutionProvider" not in ort.get_available_providers()):
            raise UnsupportedSetting("runtime 'onnxruntime' on cuda needs ONNX Runtime's GPU "
                                     "build: pip install onnxruntime-gpu")

    def load(self, artifact: bytes, *, threads: int, device: str) -> Predictor:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 1: ORT computes in the calling thread
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        providers: list = ["CPUExecutionProvider"]
        dev = torch.device(device)
        if dev.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev.index or 0}))
        session = ort.InferenceSession(artifact, options, providers=providers)
        name = session.get_inputs()[0].name

        def predict(x: torch.Tensor) -> torch.Tensor:
            feed = {name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
            return torch.from_numpy(session.run(None, feed)[0])

        return predict


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX file torch.onnx's exporter writes for `model`, quietly, as bytes."""
    with tempfile.TemporaryDirectory() as tmp, quiet(*LOGGERS):
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (example.contiguous(),), path, dynamo=True, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          external_data=False, verbose=False)
        return path.read_bytes()


def quantize_int8(data: bytes, batches: list[torch.Tensor]) -> bytes:
    """Static post-training quantization as ORT documents it for CPUs: pre-processing (shape
    inference, graph optimisation), then QDQ with uint8 activations and per-channel int8
    weights, calibrated by min-max on `batches`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch.numpy().astype(np.float32)}

    with tempfile.TemporaryDirectory() as tmp, quiet(*LOGGERS):
        fp32, pre, int8 = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.write_bytes(data)
        quant_pre_process(fp32, pre, skip_symbolic_shape=True)
        quantize_static(pre, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return int8.read_bytes()
