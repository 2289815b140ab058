"""Interleaved measurement: the ratio to the reference is what is measured, and it holds."""

import pytest
from torch import nn

from nas.arch import load_architecture
from nas.interleaved import measure_interleaved, protocol_name
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


def test_the_ladder_times_a_candidate_against_the_rung_nearest_its_latency():
    """A rung "calibrated" at the candidate's own speed is picked over rungs 4x away, and
    the estimate is the ratio times that rung's latency."""
    from nas.interleaved import ladder_rungs, nearest_rung

    rungs = ladder_rungs("mobilenet_v3_small")
    assert rungs[0] == "mobilenet_v3_small@0.35" and "mobilenet_v3_small" in rungs
    assert nearest_rung(2.1, {"a": 1.0, "b": 2.0, "c": 4.0}) == "b"
    assert nearest_rung(2.9, {"a": 1.0, "b": 2.0, "c": 4.0}) == "c"  # by ratio: 1.38 < 1.45
    model = build_model(load_architecture("mobilenet_v3_small"), num_classes=10)
    probe = measure_interleaved(model, 64, reference="mobilenet_v3_small", num_classes=10,
                                rounds=2, runs_per_block=2, reference_ms=1.0)
    own = probe.raw_ms
    ms = {"mobilenet_v3_small@0.5": own / 4, "mobilenet_v3_small": own,
          "mobilenet_v3_small@2": own * 4}
    r = measure_interleaved(model, 64, reference="mobilenet_v3_small", num_classes=10,
                            rounds=8, runs_per_block=3, reference_ms=ms, ladder=True)
    assert r.reference == "mobilenet_v3_small" and r.reference_ms == own
    assert r.ratio == pytest.approx(1.0, rel=0.15)
    assert r.latency_ms == pytest.approx(own * r.ratio)
    assert r.context.protocol == protocol_name("mobilenet_v3_small", ladder=True)


def test_warm_runs_at_a_block_s_start_are_run_but_not_timed():
    """A candidate slowed for two runs after the reference ran (its caches taken): timed from
    the switch, its ratio is inflated; with two untimed warm runs per block, it is not."""
    from nas.interleaved import interleaved_rounds

    calls = {"cand": 0, "ref": 0}
    last = {"name": None, "since": 0}

    def runner(name, cold_ms):
        def run():
            calls[name] += 1
            last["since"] = last["since"] + 1 if last["name"] == name else 1
            last["name"] = name
            return cold_ms if last["since"] <= 2 else 1.0
        return run

    cand, ref = runner("cand", 3.0), runner("ref", 1.0)
    cold, _ = interleaved_rounds(cand, ref, rounds=6, runs_per_block=4, seed=0)
    # a block's median of 3, 3, 1, 1 (1.5 where a round began with the candidate's own block)
    assert set(cold) <= {1.5, 2.0} and 2.0 in cold
    calls.update(cand=0, ref=0)
    warm, raw = interleaved_rounds(cand, ref, rounds=6, runs_per_block=4, seed=0, warm_runs=2)
    assert warm == [1.0] * 6 and set(raw) == {1.0}
    assert calls["cand"] + calls["ref"] == 6 * 3 * (2 + 4)  # every block ran its warm runs


def test_the_protocol_s_name_records_its_warm_runs_and_0_keeps_the_old_name():
    from nas.interleaved import warm_runs_of

    assert protocol_name(warm_runs=0) == "interleaved:mnasnet_a1"  # studies before warm runs
    assert protocol_name("x", warm_runs=2) == "interleaved-warm2:x"
    assert protocol_name("x", ladder=True, warm_runs=3) == "interleaved-ladder-warm3:x"
    for name, warm in [("interleaved:x", 0), ("interleaved-warm2:x", 2),
                       ("interleaved-ladder:x", 0), ("interleaved-ladder-warm12:x", 12),
                       ("single", 0)]:
        assert warm_runs_of(name) == warm
    ref = build_model(load_architecture("mobilenet_v3_small"), num_classes=10)
    r = measure_interleaved(ref, 32, reference="mobilenet_v3_small", num_classes=10, rounds=2,
                            runs_per_block=2, reference_ms=1.0, warm_runs_per_block=1)
    assert r.context.protocol == "interleaved-warm1:mobilenet_v3_small"
