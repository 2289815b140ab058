"""nas.summary: stage rows add up to the whole network, and bad input is one clean line."""

import subprocess
import sys

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
