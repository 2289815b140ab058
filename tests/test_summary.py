"""nas.summary: stage rows add up to the whole network, and bad input is one clean line (also a
network too large for memory, in every tool that builds one from a file)."""

import subprocess
import sys

import pytest
import torch

from nas.arch import load_architecture
from nas.cost import count_macs, count_params
from nas.host import failed_allocation
from nas.model import build_model
from nas.summary import main, summarize


def test_stages_sum_to_network_totals():
    arch = load_architecture("mobilenet_v3_small")
    df = summarize(arch, input_size=96, num_classes=10)
    model = build_model(arch, num_classes=10)
    assert df.params.sum() == count_params(model)
    assert df.macs.sum() == count_macs(model, 96)
    assert list(df.stage) == ["stem", *[f"block{i}" for i in range(7)], "head", "classifier"]
    assert list(df.spec[1:8]) == [b.to_str() for b in arch.blocks]
    assert df.output_shape.iloc[0] == (16, 48, 48)
    assert df.output_shape.iloc[-2] == (576, 3, 3)


def test_cli_prints_totals(capsys, tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(load_architecture("mnasnet_a1").to_yaml())
    assert main([str(path), "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "mb3_k5_s2_se0.25_r3_c40" in out and "3,887,038 parameters" in out


def test_cli_bad_config_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("blocks: [mb6_k4_s1_r1_c16]\n")
    proc = subprocess.run([sys.executable, "-m", "nas.summary", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "blocks[0]" in lines[0] and "kernel=4" in lines[0]


# 16384 -> 262,144 channels: the expansion's weight alone is 16 GiB, over an 8 GiB address space
TOO_BIG = "blocks: [conv_k3_s1_r1_c16384, mb16_k3_s1_r1_c16384]\n"
BUILT = "too large to build in this machine's memory (a 16.0 GiB weight could not be allocated)"
# builds, but one 512x512x8192 feature map at --input-size 1024 is 8 GiB
BIG_MAP = "blocks: [conv_k3_s1_r1_c8192]\n"
RUN = "out of memory at --input-size 1024 (a 8.0 GiB tensor could not be allocated)"
# builds and runs one image, but a batch of 16 maps of 32x32x16384 is 1 GiB each
BIG_BATCH = ("stem: {filters: 32, kernel: 3, stride: 1, act: relu}\n"
             "blocks: [conv_k1_s1_r1_c16384]\nhead: {filters: 0, act: relu}\n")
TRAIN = ("out of memory while training (a 1.0 GiB tensor could not be allocated); try a smaller "
         "--batch-size")
LIMITED = ("import resource, runpy, sys; g = int(sys.argv[1]) << 30; "
           "resource.setrlimit(resource.RLIMIT_AS, (g, g)); "
           "sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("tool, config, gib, extra, message", [
    ("nas.summary", TOO_BIG, 8, [], BUILT),
    ("nas.latency", TOO_BIG, 8, [], BUILT),
    ("nas.train", TOO_BIG, 8, [], BUILT),
    ("nas.summary", BIG_MAP, 8, ["--input-size", "1024"], RUN),
    ("nas.latency", BIG_MAP, 8, ["--input-size", "1024"], RUN),
    ("nas.train", BIG_BATCH, 5, [], TRAIN),  # 4 and 6 GiB fail the same way; 3 cannot start
])
def test_a_network_too_large_for_memory_is_one_line_not_a_torch_report(
        tmp_path, image_folder, tool, config, gib, extra, message):
    path = tmp_path / "big.yaml"
    path.write_text(config)
    if tool == "nas.train":
        extra = [*extra, "--epochs", "1", "--batch-size", "16", "--data", str(image_folder),
                 "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(gib), tool, str(path), *extra],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0] == f"{tool}: error: {path}: {message}"
    assert not (tmp_path / "runs").exists()  # nas.train: no run folder left behind


@pytest.mark.parametrize("report, expected", [
    ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
     "you tried to allocate 2147483648 bytes. Error code 12", "a 2.0 GiB tensor"),
    ("CUDA out of memory. Tried to allocate 512.00 MiB (GPU 0)", "a 0.5 GiB tensor"),
    ("CUDA error: out of memory", "a tensor"),
])
def test_the_failed_allocation_is_read_from_torchs_reports(report, expected):
    assert failed_allocation(RuntimeError(report)) == f"{expected} could not be allocated"


def test_a_candidate_out_of_memory_fails_with_the_size_not_torchs_report(monkeypatch):
    from nas import proxy
    from nas.data import DataSplits, ImageDataset

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 1073741824 bytes.")

    monkeypatch.setattr(proxy, "_train", oom)
    split = ImageDataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4) % 2)
    data = DataSplits(train=split, val=split, test=split, classes=("a", "b"), source="t")
    with pytest.raises(proxy.CandidateFailed, match=r"^out of memory \(a 1\.0 GiB tensor could "
                                                     r"not be allocated\)$"):
        proxy.proxy_train(load_architecture("mnasnet_a1"), data)
    monkeypatch.setattr(proxy, "_train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError, match="^x$"):  # other errors pass through unchanged
        proxy.proxy_train(load_architecture("mnasnet_a1"), data)
