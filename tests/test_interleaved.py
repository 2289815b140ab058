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


def test_a_faster_candidates_block_is_balanced_to_the_references_length():
    from nas.interleaved import MAX_CANDIDATE_RUNS, balanced_runs
    assert balanced_runs(4, 2.0, 8.0) == 16  # 4x faster: 4x the runs
    assert balanced_runs(4, 8.0, 8.0) == 4
    assert balanced_runs(4, 16.0, 8.0) == 4  # a slower candidate keeps the reference's count
    assert balanced_runs(4, 0.01, 8.0) == MAX_CANDIDATE_RUNS
    assert balanced_runs(4, 0.0, 8.0) == 4


def test_the_rounds_time_the_candidate_in_balanced_blocks(monkeypatch):
    import contextlib

    import nas.interleaved as interleaved
    calls = {"cand": 0, "ref": 0}
    ms = {"cand": 2.0, "ref": 8.0}

    @contextlib.contextmanager
    def fake_runner(model, context, calibration=None):
        who = "ref" if calls.setdefault("opened", 0) else "cand"  # the candidate opens first
        calls["opened"] += 1

        def run():
            calls[who] += 1
            return ms[who]
        yield run, None

    monkeypatch.setattr(interleaved, "prepared_runner", fake_runner)
    monkeypatch.setattr(interleaved, "_warm_up", lambda run, **kw: ([run() for _ in range(5)],
                                                                     False))
    ref = build_model(load_architecture("mobilenet_v3_small"), num_classes=10)
    r = measure_interleaved(ref, 32, reference="mobilenet_v3_small", num_classes=10, rounds=6,
                            runs_per_block=4, reference_ms=8.0)
    assert r.ratio == pytest.approx(0.25) and r.latency_ms == pytest.approx(2.0)
    # each round: one or two candidate blocks of 16 runs, two or one reference blocks of 4
    cand_blocks, ref_blocks = (calls["cand"] - 5) / 16, (calls["ref"] - 5) / 4
    assert cand_blocks == int(cand_blocks) and ref_blocks == int(ref_blocks)
    assert cand_blocks + ref_blocks == 3 * 6
