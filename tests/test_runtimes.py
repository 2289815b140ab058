"""Inference runtimes: each computes what PyTorch computes, int8 is really quantized, the
thread clock sees all of a runtime's work, and what a runtime cannot do is one line.

The README's install (".[test]") brings every runtime, so these run in CI; a runtime that is
genuinely absent (no C++ compiler for aoti) is skipped with the reason."""

import importlib.util
import io
import time

import numpy as np
import pytest
import torch
from torch import nn

from nas.arch import load_architecture
from nas.latency import LatencyError, LatencyResult, main, measure_latency
from nas.model import build_model
from nas.runtimes import (
    DEFAULT_RUNTIME,
    RUNTIMES,
    ConversionError,
    RuntimeUnavailable,
    UnsupportedSetting,
    get_runtime,
)
from nas.runtimes.base import calibration_batches

DEPLOYMENT_RUNTIMES = [n for n in RUNTIMES if n != "eager"]
INT8_RUNTIMES = [n for n, r in RUNTIMES.items() if "int8" in r.precisions]
FAST = {"min_runs": 3, "min_time_s": 0.02, "max_time_s": 0.3}


def present(name):
    rt = RUNTIMES[name]
    return pytest.mark.skipif(not rt.available(), reason=f"{name} not installed here")


def small_network(seed=0):
    """mobilenet_v3_small with weights that give logits of order 1 (as built, zero-initialised
    last batch norms and a small classifier give logits near 1e-10, too small to compare)."""
    torch.manual_seed(seed)
    model = build_model(load_architecture("mobilenet_v3_small"), num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1 / m.in_features ** 0.5)
    return model.eval()


def images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [pytest.param(n, marks=present(n)) for n in RUNTIMES])
def test_each_runtime_computes_what_pytorch_computes(name):
    model, x = small_network(), images()
    with torch.inference_mode():
        expected = model(x)
    compiled = get_runtime(name).compile(model, x, threads=1)
    got = compiled.predict(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert compiled.runtime == name and compiled.convert_s >= 0
    if name != "eager":
        assert compiled.artifact and len(compiled.artifact) > 4 * 1e6  # 2.5 M float weights


@pytest.mark.parametrize("name", [pytest.param(n, marks=present(n)) for n in INT8_RUNTIMES])
def test_int8_is_quantized_and_still_computes_the_network(name):
    model, x = small_network(), images(4)
    with torch.inference_mode():
        expected = model(x)
    rt = get_runtime(name)
    fp32 = rt.compile(model, x, precision="fp32")
    int8 = rt.compile(model, x, precision="int8", calibration=images(16, seed=2))
    # int8 weights: the artifact shrinks about 4x (2.5 M parameters, 10 MB in float32)
    assert len(int8.artifact) < 0.4 * len(fp32.artifact)
    got = int8.predict(x)
    assert not torch.allclose(got, expected, rtol=1e-4, atol=1e-6)  # really quantized
    cos = nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cos > 0.9, cos


def test_onnx_int8_holds_quantize_nodes():
    onnx = pytest.importorskip("onnx")
    model, x = small_network(), images(1)
    art = get_runtime("onnxruntime").compile(model, x, precision="int8").artifact
    ops = {n.op_type for n in onnx.load_from_string(art).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_calibration_images_are_resized_to_the_deployment_input_and_batched():
    example = torch.zeros(2, 3, 64, 64)
    batches = calibration_batches(torch.randn(7, 3, 32, 32), example)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 64, 64)] * 3  # 7 images, batches of 2
    assert all(len(b) == 2 for b in calibration_batches(None, example))


@pytest.mark.parametrize("name", [pytest.param(n, marks=present(n)) for n in RUNTIMES])
def test_the_thread_clock_sees_all_of_a_runtimes_work_at_one_thread(name):
    # nas.latency times one thread with the calling thread's CPU time: a runtime that computed
    # on a pool thread would look nearly free. Process CPU time counts every thread.
    model, x = small_network(), images(1, size=96)
    predict = get_runtime(name).compile(model, x, threads=1).predict
    for _ in range(3):
        predict(x)
    thread0, process0 = time.thread_time(), time.process_time()
    for _ in range(20):
        predict(x)
    thread, process = time.thread_time() - thread0, time.process_time() - process0
    assert thread >= 0.9 * process, (thread, process)


@pytest.mark.parametrize("name", [pytest.param(n, marks=present(n)) for n in DEPLOYMENT_RUNTIMES])
def test_measure_latency_in_a_runtime_records_it_in_the_context(name):
    result = measure_latency(small_network(), 64, runtime=name, **FAST)
    ctx = result.context
    assert ctx.runtime == name and ctx.runtime_version == get_runtime(name).version()
    assert ctx.precision == "fp32" and ctx.memory_format == "contiguous"
    assert ctx.clock == "thread" and result.median_ms > 0 and result.convert_s > 0
    assert name in ctx.describe()
    assert LatencyResult.from_dict(result.to_dict()) == result


def test_a_result_saved_before_runtimes_existed_reads_as_eager_fp32():
    data = measure_latency(small_network(), 32, runtime="eager", clock="wall", **FAST).to_dict()
    for key in ("runtime", "runtime_version", "precision", "convert_s"):
        data.pop(key)
    old = LatencyResult.from_dict(data)
    assert (old.context.runtime, old.context.precision, old.context.runtime_version) == (
        "eager", "fp32", "")


def test_a_network_the_converter_refuses_fails_with_the_converters_reason():
    class Branchy(nn.Module):  # data-dependent control flow: torch.export cannot trace it
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ConversionError, match="onnxruntime could not convert the network: "):
        get_runtime("onnxruntime").compile(Branchy(), images(1))


def test_a_runtime_that_is_not_installed_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "executorch" else object())
    with pytest.raises(RuntimeUnavailable, match=r'pip install -e "\.\[executorch\]"'):
        get_runtime("executorch").check()
    assert main(["mnasnet_a1", "--runtime", "executorch"]) == 2
    err = capsys.readouterr().err
    assert err == ("nas.latency: error: runtime 'executorch' is not installed here; "
                   "pip install -e \".[executorch]\"\n")


@pytest.mark.parametrize("argv, fragment", [
    (["--runtime", "eager", "--precision", "int8"],
     "runtime 'eager' has no int8 path; int8 is measured in onnxruntime or executorch"),
    (["--runtime", "aoti", "--precision", "int8"], "runtime 'aoti' has no int8 path"),
    (["--runtime", "tflite"], "argument --runtime: invalid choice: 'tflite'"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
])
def test_runtime_flags_that_cannot_be_measured_are_one_line(argv, fragment, capsys):
    assert main(["mnasnet_a1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nas.latency: error: ") and fragment in err


def test_unknown_runtime_and_onnx_on_cuda_without_the_gpu_build():
    with pytest.raises(UnsupportedSetting, match="expected one of"):
        get_runtime("tflite")
    if not torch.cuda.is_available():
        with pytest.raises(LatencyError, match="no CUDA GPU"):
            measure_latency(small_network(), 32, runtime="onnxruntime", device="cuda")


def test_converting_prints_nothing(capfd):
    get_runtime(DEFAULT_RUNTIME).compile(small_network(), images(1))
    if RUNTIMES["executorch"].available():
        get_runtime("executorch").compile(small_network(), images(1))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_cli_measures_in_the_default_runtime_and_says_so(capsys):
    assert main(["mobilenet_v3_small", "--input-size", "32", "--protocol", "single",
                 "--min-time", "0.05", "--max-time", "0.2"]) == 0
    out = capsys.readouterr().out
    assert f", {DEFAULT_RUNTIME} {get_runtime(DEFAULT_RUNTIME).version()}, fp32," in out


def test_onnx_file_round_trips_through_a_fresh_session():
    ort = pytest.importorskip("onnxruntime")
    model, x = small_network(), images(1)
    art = get_runtime("onnxruntime").compile(model, x).artifact
    session = ort.InferenceSession(io.BytesIO(art).getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": x.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_the_eager_runtime_leaves_the_callers_model_as_it_was():
    # it runs a channels-last copy; ExecuTorch refuses a channels-last model afterwards
    model, x = small_network(), images(1)
    weight = next(p for p in model.parameters() if p.dim() == 4)
    get_runtime("eager").compile(model, x)
    assert weight.is_contiguous()
    if RUNTIMES["executorch"].available():
        get_runtime("executorch").compile(model, x)


def test_what_native_code_said_is_shown_when_conversion_fails(capfd):
    import os

    from nas.runtimes.base import quiet

    with pytest.raises(RuntimeError, match="boom"), quiet():
        os.write(2, b"[program.cpp:168] the real reason\n")
        raise RuntimeError("boom")
    assert "[program.cpp:168] the real reason" in capfd.readouterr().err
    with quiet():
        os.write(2, b"chatter\n")
    assert "chatter" not in capfd.readouterr().err


def test_calibration_images_are_drawn_from_every_class():
    from nas.data import ImageDataset
    from nas.runtimes.base import calibration_sample

    labels = torch.arange(4).repeat_interleave(50)  # stored class by class, as folders are
    imgs = (labels.view(-1, 1, 1, 1) * 60).expand(-1, 3, 8, 8).to(torch.uint8).contiguous()
    x = calibration_sample(ImageDataset(imgs, labels), 40, mean=(0, 0, 0), std=(1, 1, 1))
    classes = set((x[:, 0, 0, 0] * 255 / 60).round().long().tolist())
    assert x.shape == (40, 3, 8, 8) and classes == {0, 1, 2, 3}


def test_match_latency_with_a_network_the_runtime_refuses_is_one_line(monkeypatch, capsys):
    from nas.runtimes.onnx_runtime import OnnxRuntime

    def refuse(self, *a, **kw):
        raise RuntimeError("no such operator")

    monkeypatch.setattr(OnnxRuntime, "convert", refuse)
    assert main(["mobilenet_v3_small", "--match-latency", "2", "--runtime", "onnxruntime",
                 "--input-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime could not convert the network" in err
