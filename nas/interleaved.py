"""Interleaved latency on a shared CPU: a candidate timed in rounds alternating with a fixed
reference network, reported as the median candidate/reference ratio times the reference's
calibrated latency (randomized multiple interleaved trials, Abedi and Brecht, ICPE 2017).

A core whose speed swings (frequency, a neighbour's job, a noisy VM) slows the candidate and
the reference that ran just before and after it alike, so their ratio holds where raw
milliseconds drift. Each round times a block of the reference, one of the candidate and one of
the reference again (the candidate's pair of neighbours), or the mirror order; which of the two
each round takes is shuffled with a fixed seed, so the order is no confound. The raw
milliseconds are kept beside the estimate. benchmarks/latency_aa.py compares both protocols.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import re
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from nas.arch import load_architecture
from nas.latency import (
    LatencyContext,
    LatencyResult,
    _load_avg,
    _protocol,
    _warm_up,
    latency_context,
    prepared_runner,
)
from nas.machine_calibration import add_sittings
from nas.model import build_model

REFERENCE = "mnasnet_a1"  # the yardstick: the default space's own kind of network
REFERENCE_ATTR = "reference_ms"  # study attribute: the reference's latency a study measures by
# 30 rounds, not 12: lower largest and median drift between fresh processes in all 5 A/A
# pairs (Xeon, 3 runs; latency_aa_rounds{,2,3_loaded}_xeon.txt), for ~3.0 s of timing not ~1.3 s
ROUNDS = 30
RUNS_PER_BLOCK = 4
# Untimed runs at a block's start: after a switch of networks the next runs are slower than
# alone, which pulled every ratio toward 1 (mobilenet_v3_small +16%, resnet18 -11% against the
# single protocol); 2 halve the median bias, 5.6% -> 2.5% (benchmarks/results/
# protocol_bias_xeon.txt), for 3.9 s per measurement not 2.5 and a drift as before
# (latency_aa_warm2_loaded_xeon.txt). 0 is the protocol's name and way before 2026-12-07.
WARM_RUNS_PER_BLOCK = 2
MAX_WARM_RUNS = 16  # what a study or a server's client may ask for
# The ladder: the reference's family at widths about 1.5x apart in latency (mnasnet_a1 from
# ~2 ms to ~25 ms on a Zen 4 core, ONNX Runtime 224x224). The ratio's drift between processes
# grows with the gap between candidate and reference (<= 1.1% near it, 4.5-9% at 3.3-4x:
# benchmarks/results/latency_ratio_noise_zen4.txt), so each candidate is timed against the
# rung nearest its latency. In the A/A it was no better than one reference (largest drift
# 5.5-10.7% against 5.5-5.9%: benchmarks/results/latency_aa_ladder_zen4.txt): opt-in only.
LADDER_WIDTHS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8)


@dataclasses.dataclass(frozen=True)
class InterleavedResult:
    """The estimate, how it was made, and the raw milliseconds beside it."""

    latency_ms: float  # median ratio x reference_ms
    ratio: float  # median over rounds of candidate / reference
    ratio_iqr: float
    reference_ms: float  # the reference's calibrated latency
    raw_ms: float  # median of the candidate's own timings in the rounds
    rounds: int
    seconds: float
    context: LatencyContext  # its protocol: "interleaved:<reference>"
    ratio_p10: float = 0.0
    ratio_p90: float = 0.0
    reference: str = REFERENCE  # the network it was timed against (a ladder's rung)

    def as_result(self) -> LatencyResult:
        """In LatencyResult's shape: what a cache, a study and a table hold."""
        ref = self.reference_ms
        return LatencyResult(
            median_ms=self.latency_ms, p10_ms=self.ratio_p10 * ref, p90_ms=self.ratio_p90 * ref,
            iqr_ms=self.ratio_iqr * ref, cv=self.ratio_iqr / (1.349 * self.ratio),
            runs=self.rounds, warmup_runs=0, seconds=self.seconds, stopped_early=False,
            context=self.context, raw_ms=self.raw_ms, reference_ms=ref, load_avg=_load_avg())


def interleaved_rounds(cand: Callable[[], float], ref: Callable[[], float], *, rounds: int,
                       runs_per_block: int, seed: int, warm_runs: int = 0
                       ) -> tuple[list[float], list[float]]:
    """(candidate/reference ratio per round, the candidate's raw ms) from warmed-up runners;
    `warm_runs`: untimed runs at the start of each block, after the other network ran."""
    order = random.Random(seed)
    ratios, raw = [], []

    def block(run: Callable[[], float]) -> list[float]:
        for _ in range(warm_runs):
            run()
        return [run() for _ in range(runs_per_block)]

    for _ in range(rounds):
        mirror = order.random() < 0.5  # ref-cand-ref, or cand-ref-cand
        blocks = (cand, ref, cand) if mirror else (ref, cand, ref)
        times = [block(run) for run in blocks]
        medians = [float(np.median(t)) for t in times]
        if mirror:
            c, r = (medians[0] + medians[2]) / 2, medians[1]
            raw += times[0] + times[2]
        else:
            c, r = medians[1], (medians[0] + medians[2]) / 2
            raw += times[1]
        ratios.append(c / r)
    return ratios, raw


def protocol_name(reference: str = REFERENCE, ladder: bool = False,
                  warm_runs: int = WARM_RUNS_PER_BLOCK) -> str:
    """What a cache, a study and a server record: interleaved[-ladder][-warm<k>]:<reference>
    (no -warm part for 0 warm runs, the protocol's name before it had them)."""
    kind = "interleaved-ladder" if ladder else "interleaved"
    return f"{kind}{f'-warm{warm_runs}' if warm_runs else ''}:{reference}"


def warm_runs_of(protocol: str) -> int:
    """The warm runs per block a protocol name records (0: none, or not interleaved)."""
    match = re.match(r"interleaved(?:-ladder)?-warm(\d+):", protocol)
    return int(match.group(1)) if match else 0


def ladder_rungs(reference: str = REFERENCE) -> list[str]:
    """The ladder's networks, narrowest first; width 1 is the reference itself (so it shares
    the machine's kept sittings of the single reference)."""
    return [reference if w == 1.0 else f"{reference}@{w:g}" for w in LADDER_WIDTHS]


def calibrated_ladder_ms(context: LatencyContext, reference: str = REFERENCE,
                         num_classes: int = 1000) -> dict[str, float]:
    """Every rung's calibrated latency (each as calibrated_reference_ms)."""
    return {rung: calibrated_reference_ms(context, rung, num_classes)
            for rung in ladder_rungs(reference)}


def nearest_rung(candidate_ms: float, rungs_ms: dict[str, float]) -> str:
    """The rung whose latency is nearest the candidate's, in ratio."""
    return min(rungs_ms, key=lambda r: (abs(np.log(candidate_ms / rungs_ms[r])), r))


@functools.lru_cache(maxsize=8)
def calibrated_reference_ms(context: LatencyContext, reference: str = REFERENCE,
                            num_classes: int = 1000) -> float:
    """The reference's latency on this machine: a sitting by the standard protocol (several
    while the machine's store is young), once per process and context, added to the machine's
    kept sittings, whose median is returned (nas.machine_calibration)."""
    def sittings(n: int) -> list[float]:
        model = build_model(load_architecture(reference), num_classes=num_classes)
        with prepared_runner(model, context) as (run, _):
            return [_protocol(run, context, min_runs=40, min_time_s=1.5, max_time_s=3.0,
                              stop_above_ms=None).median_ms for _ in range(n)]

    return add_sittings(context, reference, num_classes, sittings)


def measure_interleaved(model: nn.Module, input_size: int = 224, *, device: str = "cpu",
                        threads: int | None = None, runtime: str = "eager",
                        precision: str = "fp32", reference: str = REFERENCE,
                        num_classes: int = 1000, rounds: int = ROUNDS,
                        runs_per_block: int = RUNS_PER_BLOCK,
                        warm_runs_per_block: int = WARM_RUNS_PER_BLOCK,
                        reference_ms: float | dict[str, float] | None = None,
                        calibration: torch.Tensor | None = None, seed: int = 0,
                        ladder: bool = False,
                        quiet: Callable[[], contextlib.AbstractContextManager] | None = None
                        ) -> InterleavedResult:
    """The candidate's latency from interleaved rounds with `reference` (a reference name or
    architecture file), in the same context; `reference_ms`: its calibrated latency (default:
    measured once per process by calibrated_reference_ms). `ladder`: against the rung of the
    reference's ladder nearest the candidate's latency (by its warm-up), `reference_ms` then
    {rung: ms} (default: calibrated_ladder_ms). `quiet`: a context held while timing, not
    while converting (nas.search's CoreGate)."""
    context = latency_context(input_size, device=device, threads=threads, runtime=runtime,
                              precision=precision)
    if ladder:
        rungs_ms = (reference_ms if isinstance(reference_ms, dict)
                    else calibrated_ladder_ms(context, reference, num_classes))
    elif reference_ms is None:
        reference_ms = calibrated_reference_ms(context, reference, num_classes)
    with contextlib.ExitStack() as stack:
        cand, _ = stack.enter_context(prepared_runner(model, context, calibration=calibration))
        against = reference
        if not ladder:  # converted before the quiet, as the candidate
            ref, _ = stack.enter_context(prepared_runner(
                build_model(load_architecture(reference), num_classes=num_classes), context))
        if quiet is not None:
            stack.enter_context(quiet())
        start = time.perf_counter()  # measuring, not converting (as LatencyResult.seconds)
        warm, _ = _warm_up(cand, until=time.perf_counter() + 1.0, stop_above_ms=None)
        if ladder:  # the rung is known only once the candidate has run
            against = nearest_rung(float(np.median(warm[-5:])), rungs_ms)
            before = time.perf_counter()
            ref, _ = stack.enter_context(prepared_runner(
                build_model(load_architecture(against), num_classes=num_classes), context))
            start += time.perf_counter() - before  # converting the rung is not measuring
        _warm_up(ref, until=time.perf_counter() + 1.0, stop_above_ms=None)
        ratios, raw = interleaved_rounds(cand, ref, rounds=rounds,
                                         runs_per_block=runs_per_block, seed=seed,
                                         warm_runs=warm_runs_per_block)
    ref_ms = rungs_ms[against] if ladder else float(reference_ms)
    p10, q25, ratio, q75, p90 = np.percentile(ratios, [10, 25, 50, 75, 90]).tolist()
    return InterleavedResult(
        latency_ms=ratio * ref_ms, ratio=ratio, ratio_iqr=q75 - q25,
        reference_ms=ref_ms, raw_ms=float(np.median(raw)), rounds=rounds,
        seconds=time.perf_counter() - start,
        context=dataclasses.replace(context, protocol=protocol_name(reference, ladder,
                                                                    warm_runs_per_block)),
        ratio_p10=p10, ratio_p90=p90, reference=against)

