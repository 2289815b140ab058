"""nas.summary: stage rows add up to the whole network, and bad input is one clean line (also a
network too large for memory, in every tool that builds one from a file)."""

import subprocess
import sys

import pytest

from nas.arch import load_architecture
from nas.model import build_model
from nas.profile import count_macs, count_params
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
UNDER_8_GIB = ("import resource, runpy, sys; "
               "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
               "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("tool", ["nas.summary", "nas.latency", "nas.train"])
def test_a_network_too_large_for_memory_is_one_line_not_a_torch_report(tmp_path, image_folder,
                                                                        tool):
    path = tmp_path / "big.yaml"
    path.write_text(TOO_BIG)
    extra = (["--epochs", "1", "--batch-size", "16", "--data", str(image_folder), "--runs-dir",
              str(tmp_path / "runs")] if tool == "nas.train" else [])
    proc = subprocess.run([sys.executable, "-c", UNDER_8_GIB, tool, str(path), *extra],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(f"{tool}: error: {path}: too large to build in this machine's "
                               "memory (a 16.0 GiB weight could not be allocated)"), lines[0]
    assert not (tmp_path / "runs").exists()  # nas.train: no run folder left behind
