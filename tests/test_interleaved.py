"""Interleaved measurement: the ratio to the reference is what is measured, and it holds."""

import pytest
from torch import nn

from nas.arch import load_architecture
from nas.interleaved import measure_interleaved
from nas.model import build_model


class Twice(nn.Module):
    """The reference network run twice: twice its work, the same kernels."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + self.net(x)


@pytest.mark.parametrize("candidate, expected", [("same", 1.0), ("twice", 2.0)])
def test_the_ratio_to_the_reference_is_measured(candidate, expected):
    ref = build_model(load_architecture("mobilenet_v3_small"), num_classes=10)
    model = ref if candidate == "same" else Twice(ref)
    r = measure_interleaved(model, 64, reference="mobilenet_v3_small", num_classes=10,
                            rounds=8, runs_per_block=3, reference_ms=10.0)
    assert r.ratio == pytest.approx(expected, rel=0.15)
    assert r.latency_ms == pytest.approx(10.0 * r.ratio)  # times the calibrated reference
    assert r.raw_ms > 0 and r.rounds == 8 and r.context.input_size == 64
