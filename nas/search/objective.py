"""One candidate, start to end: latency on the target, then proxy accuracy, then the reward;
and the Optuna objective around it, which fails a failing candidate's trial with its reason."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
from collections.abc import Callable
from typing import Any

import optuna
import torch

from nas.arch import Architecture
from nas.cost import count_macs, count_params
from nas.data import DataSplits
from nas.interleaved import REFERENCE_ATTR, measure_interleaved
from nas.interrupts import INTERRUPTED, was_interrupted
from nas.latency import (
    LatencyCache,
    LatencyContext,
    LatencyResult,
    architecture_key,
    measure_latency,
)
from nas.latency_client import LatencyClient
from nas.model import build_model
from nas.proxy import CandidateFailed, ProxyBudget, proxy_train
from nas.reward import reward
from nas.runtimes.base import LATENCY_CALIBRATION_IMAGES, calibration_sample
from nas.search.config import SearchConfig
from nas.search.core_gate import CoreGate
from nas.search.cpu_share import stop_if_interrupted, training_threads
from nas.search.liveness import worker_id
from nas.search.trial_end import TrialEnd, set_end
from nas.space import SearchSpace


@dataclasses.dataclass
class Context:
    """What every trial shares."""

    config: SearchConfig
    space: SearchSpace
    data: DataSplits
    budget: ProxyBudget
    cache: LatencyCache
    remote: LatencyClient | None = None  # --latency-server
    # what latency is measured in (None: the cache asks nas.latency, for local single timing)
    latency_context: LatencyContext | None = None
    # interleaved: the study's calibrated reference; ladder: {rung: ms}
    reference_ms: float | dict[str, float] | None = None
    gate: CoreGate | None = None  # no measurement beside a training on this machine

    @property
    def alpha(self) -> float:
        return self.config.exponents[0]

    @property
    def beta(self) -> float:
        return self.config.exponents[1]


def evaluate_architecture(arch: Architecture, ctx: Context, trial: Any = None,
                          record: dict[str, Any] | None = None,
                          threads: Callable[[], int] | None = None) -> dict[str, Any]:
    """Latency on the target, then proxy accuracy, then reward: the record of one candidate.

    Filled into `record` when given, so a caller keeps what was measured before a failure.
    `threads`: the training's CPU threads, asked before each step (default: the trial's
    ThreadShare, or train_threads without a trial)."""
    c = ctx.config
    record = {} if record is None else record
    record.update(arch=arch.to_str(), arch_dict=arch.to_dict())
    deployed = build_model(arch, num_classes=ctx.data.num_classes)
    record["params"] = count_params(deployed)
    record["macs"] = count_macs(deployed, c.input_size)
    best = best_reward(trial, ctx)
    bound = latency_bound_ms(best, c.target_ms, ctx.alpha, ctx.beta) if best else None
    lat = candidate_latency(arch, deployed, ctx, bound)
    if lat.reference_ms is not None and ctx.reference_ms is None and trial is not None:
        ctx.reference_ms = lat.reference_ms  # a server calibrated it: the study keeps it
        trial.study.set_user_attr(REFERENCE_ATTR, lat.reference_ms)
    record.update(latency_ms=lat.median_ms, latency_p10_ms=lat.p10_ms, latency_p90_ms=lat.p90_ms,
                  latency_cv=lat.cv, latency_s=lat.seconds, latency_stopped_early=lat.stopped_early,
                  convert_s=lat.convert_s)
    if lat.raw_ms is not None:
        record["latency_raw_ms"] = lat.raw_ms
    _set_attrs(trial, record)
    if bound is not None and (lat.stopped_early or lat.median_ms > bound):
        raise optuna.TrialPruned(
            f"latency {'above ' if lat.stopped_early else ''}{lat.median_ms:.1f} ms > "
            f"{bound:.4g} ms: even at accuracy 1 its reward would be below the best so far "
            f"({best:.4f})")
    # Intermediate scores cost a validation pass each: only when a pruner will read them.
    use_trial = trial if (c.objective == "reward" and c.pruner != "none") else None
    steps = threads or training_threads(c, trial.study if trial is not None else None)
    waited = ctx.gate.waited_s if ctx.gate is not None else 0.0
    if ctx.gate is not None:
        steps = ctx.gate.gated(steps)
    try:
        result = proxy_train(arch, ctx.data, ctx.budget, device=c.train_device, seed=c.seed,
                             trial=use_trial, threads=stop_if_interrupted(steps))
    finally:
        if ctx.gate is not None:
            ctx.gate.done()
    if ctx.gate is not None:  # held back for another process's measurement: part of train_s
        record["gate_wait_s"] = ctx.gate.waited_s - waited
    record.update(accuracy=result.accuracy, train_s=result.train_seconds,
                  train_threads=list(result.threads),
                  eval_s=result.eval_seconds, images_per_s=result.images_per_second,
                  trained_arch=result.trained_arch, val_curve=list(result.val_curve),
                  reward=reward(result.accuracy, lat.median_ms, c.target_ms, alpha=ctx.alpha,
                                beta=ctx.beta))
    _set_attrs(trial, record)
    return record


def candidate_latency(arch: Architecture, deployed: torch.nn.Module, ctx: Context,
                      bound: float | None) -> LatencyResult:
    """The candidate's latency as the study measures it: cached, else on the latency server,
    interleaved with the reference, or timed alone (--latency-protocol single)."""
    c = ctx.config
    options = dict(input_size=c.input_size, device=c.device, threads=c.threads,
                   min_time_s=c.latency_time / 2, max_time_s=c.latency_time,
                   stop_above_ms=bound, runtime=c.runtime, precision=c.precision)
    key = f"{architecture_key(arch)}-{ctx.data.num_classes}"
    calibration = calibration_images(ctx.data) if c.precision != "fp32" else None
    if ctx.remote is not None:  # another device: nothing here to keep quiet
        remote = ctx.remote
        return ctx.cache.get_or_measure(
            key, lambda: deployed, **options, context=ctx.latency_context,
            measure=lambda: remote.measure(arch, num_classes=ctx.data.num_classes,
                                           protocol=c.latency_protocol,
                                           warm_runs=c.latency_warm_runs,
                                           reference_ms=ctx.reference_ms, **options))
    quiet = ctx.gate.measuring if ctx.gate is not None else None  # timing only: converting
    # beside a training disturbs nothing, and a cache hit measures nothing
    if c.latency_protocol in ("interleaved", "ladder"):
        def measure() -> LatencyResult:
            return measure_interleaved(
                deployed, c.input_size, device=c.device, threads=c.threads, runtime=c.runtime,
                precision=c.precision, num_classes=ctx.data.num_classes,
                reference_ms=ctx.reference_ms, calibration=calibration,
                ladder=c.latency_protocol == "ladder", quiet=quiet,
                warm_runs_per_block=c.latency_warm_runs).as_result()
    else:
        def measure() -> LatencyResult:
            return measure_latency(deployed, calibration=calibration, quiet=quiet, **options)

    return ctx.cache.get_or_measure(key, lambda: deployed, **options, measure=measure,
                                    context=ctx.latency_context)


@functools.lru_cache(maxsize=1)  # the same images for every candidate of a run: draw them once
def calibration_images(data: DataSplits) -> torch.Tensor:
    """Proxy-training images (a seeded draw), normalised: what quantizes an int8 candidate."""
    return calibration_sample(data.train, LATENCY_CALIBRATION_IMAGES, mean=data.mean, std=data.std)


def best_reward(trial: Any, ctx: Context) -> float | None:
    """The best reward in the study so far; None where no bound applies (baselines, pareto)."""
    if trial is None or ctx.config.objective != "reward":
        return None
    try:
        return trial.study.best_value
    except ValueError:  # no completed trial yet
        return None


def latency_bound_ms(best: float, target_ms: float, alpha: float, beta: float) -> float | None:
    """The latency above which no accuracy (<= 1) can beat reward `best`, or None if none does.

    The reward at latency L is at most (L/T)^w. Above T that is (L/T)^beta, below `best` from
    L = T * best^(1/beta) on; a best above 1 (possible below T with alpha < 0) is out of reach
    from L = T * best^(1/alpha). In soft mode (beta = -0.07) a best of 0.5 bounds at ~20,000 T:
    a slow but accurate candidate can still win there, so it is trained.
    """
    if not (math.isfinite(best) and best > 0):
        return None
    if best > 1:
        return target_ms * best ** (1 / alpha) if alpha < 0 else None
    return target_ms * best ** (1 / beta) if beta < 0 else None


def _set_attrs(trial: Any, record: dict[str, Any]) -> None:
    if trial is None:
        return
    for key, value in record.items():
        if key not in trial.user_attrs:
            trial.set_user_attr(key, value)


# what a trial that reuses an earlier one's result copies from it (the time it took is its own)
REUSED_ATTRS = ("arch", "arch_dict", "params", "macs", "latency_ms", "latency_p10_ms",
                "latency_p90_ms", "latency_cv", "latency_raw_ms", "accuracy", "trained_arch",
                "val_curve", "reward")
REUSED_FROM_ATTR = "reused_from"


def evaluated_before(trial: optuna.Trial, arch: Architecture) -> optuna.trial.FrozenTrial | None:
    """The first complete trial of the study that evaluated this very architecture.

    The proxy trains with the study's seed, so evaluating it again would train the same weights
    to the same accuracy (and the latency cache answers its latency): samplers propose a
    duplicate in 2-5% of trials late in a search (sampler_efficiency_zen4.txt)."""
    want = json.loads(json.dumps(arch.to_dict()))  # as the storage returns it
    for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("arch_dict") == want:  # the running trial is not COMPLETE
            return t
    return None


def reuse(trial: optuna.Trial, earlier: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """Record the earlier trial's result on this one, and which trial it came from."""
    rec = {k: earlier.user_attrs[k] for k in REUSED_ATTRS if k in earlier.user_attrs}
    rec.update({REUSED_FROM_ATTR: earlier.number, "train_s": 0.0, "latency_s": 0.0})
    _set_attrs(trial, rec)
    return rec


def make_objective(ctx: Context):
    """The Optuna objective: a failing candidate fails its trial with the reason recorded; an
    architecture the study already evaluated gets its earlier result (Optuna's FAQ way)."""

    def score(trial: optuna.Trial):
        trial.set_user_attr("worker", worker_id())  # stamped at creation by StampedStorage
        try:
            arch = ctx.space.sample(trial)
            earlier = evaluated_before(trial, arch)
            rec = (reuse(trial, earlier) if earlier is not None
                   else evaluate_architecture(arch, ctx, trial))
        except optuna.TrialPruned as e:
            set_end(trial, TrialEnd.PRUNED,
                    str(e) if str(e).startswith("pruned") else f"pruned: {e}")
            raise
        except CandidateFailed as e:
            set_end(trial, TrialEnd.FAILED, str(e))
            raise
        except optuna.exceptions.StorageInternalError as e:
            if INTERRUPTED.is_set():
                raise
            # not the candidate's failure: a PostgreSQL restart failed a trial, which counted
            # toward --trials, and the search ran one candidate short
            said = str(e.args[0]) if e.args else repr(e)
            reason = f"the study's storage failed: {said.splitlines()[0] if said else repr(e)}"
            with contextlib.suppress(Exception):  # it may still be down
                set_end(trial, TrialEnd.STORAGE, reason)
            raise CandidateFailed(reason) from e
        except Exception as e:
            if INTERRUPTED.is_set():  # the interrupt, surfacing as another error
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            set_end(trial, TrialEnd.FAILED, reason)  # invalid combination, conversion, shape
            raise CandidateFailed(reason) from e
        if ctx.config.objective == "pareto":
            return rec["accuracy"], rec["latency_ms"]
        return rec["reward"]

    def objective(trial: optuna.Trial):
        try:
            return score(trial)
        except (optuna.TrialPruned, CandidateFailed):
            raise
        except BaseException as e:
            if not was_interrupted(e):
                raise
        # Interrupted. Only here, out of the except clause, are the interrupted frames gone: one
        # that was reading the study (any write of a trial attribute reads first) held an open
        # SQLite statement, whose read lock made every write (this note, the heartbeat, the
        # tell, the other workers') wait out the 60 s busy timeout. A fresh KeyboardInterrupt,
        # too, for Optuna's tell must not keep those frames either.
        gc.collect()
        with contextlib.suppress(Exception):  # the interrupt matters more than its note
            set_end(trial, TrialEnd.INTERRUPTED, INTERRUPTED.reason())
        raise KeyboardInterrupt

    return objective
