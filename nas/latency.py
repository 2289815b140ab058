"""Measured latency: how long one inference of a network takes on a real device.

MnasNet ranks candidates by ``ACC * (LAT/T)^w`` with LAT measured on the device, so a noisy or
biased latency silently corrupts every decision. The protocol: the whole network at the
deployment input size, batch 1, in the runtime that ships it (nas.runtimes; converted and
loaded untimed), one CPU thread timed by that thread's CPU clock (CUDA events on a GPU),
warm-up until the medians of two windows of 5 runs agree within 5%, then at least 20 runs over
1 s within a 2 s budget; the median with p10/p90 and a robust CV; an early stop above a bound.
Eager networks run in eval mode under inference_mode, channels-last, with glibc's malloc
thresholds pinned. Results carry their context (device, runtime, precision, threads, input,
clock), which is also the `LatencyCache` key.

Why each choice, with the measurements behind it: docs/latency.md.

CLI: ``python -m nas.latency mobilenet_v1 mnasnet_a1 torchvision:resnet18 runs/x/arch.yaml``
prints one comparison table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nas.arch import ArchError, load_architecture
from nas.cli import HelpFormatter, int_in_range
from nas.cost import count_macs, count_params
from nas.files import write_atomic
from nas.host import (
    available_cpus,
    cpu_name,
    failed_allocation,
    is_out_of_memory,
    pin_malloc_thresholds,
)
from nas.interrupts import run_module
from nas.model import TooLargeError, build_model
from nas.runtimes import (
    DEFAULT_RUNTIME,
    PRECISIONS,
    RUNTIME_NAMES,
    ConversionError,
    Runtime,
    RuntimeUnavailable,
    UnsupportedSetting,
    get_runtime,
)

DEVICES = ("cpu", "cuda")
CLOCKS = ("thread", "wall")  # thread: CPU time of the calling thread; wall: perf_counter
PROTOCOLS = ("interleaved", "single")  # nas.latency's; nas.search also has its ladder
DEFAULT_THREADS = 1  # one core, as MnasNet timed one big core of a Pixel phone
MIN_INPUT_SIZE = 32  # the reference networks downsample 32x
IN_CHANNELS = 3  # RGB images

WARMUP_WINDOW = 5  # runs per window when deciding that warm-up has settled
WARMUP_TOLERANCE = 0.05  # consecutive window medians within 5% = settled
WARMUP_MIN_RUNS = 2  # the first run pays one-time kernel setup; always make one more
WARMUP_BUDGET_FRACTION = 0.4  # of max_time_s
MIN_TIMED_RUNS = 3  # a median needs a few runs even when they overrun the budget
EARLY_STOP_RUNS = 2  # runs after the cold first one that must all exceed stop_above_ms
IQR_TO_STD = 1.349  # IQR of a normal distribution, in standard deviations


class LatencyError(ValueError):
    """A user-facing error: one line naming the option, its value and what is allowed."""


@dataclass(frozen=True)
class LatencyContext:
    """Where and how a latency was taken; a number without this is not comparable."""

    device: str  # "cpu" or "cuda:N"
    device_name: str  # CPU model or GPU name
    threads: int
    torch_version: str
    input_size: int
    batch_size: int
    memory_format: str  # "channels_last" or "contiguous" (the input's; runtimes pick their own)
    clock: str  # "thread" (CPU time of the one measuring thread), "wall" or "cuda-events"
    # added 2026-12-05; results and studies from before were all eager PyTorch, float32
    runtime: str = "eager"  # see nas.runtimes
    runtime_version: str = ""  # "" for eager: torch_version is its version
    precision: str = "fp32"  # or "int8" (statically quantized by the runtime's quantizer)
    # "single": the network timed alone; "interleaved:<reference>": in rounds with a reference
    # network (nas.interleaved); results from before 2026-12-05 were all single
    protocol: str = "single"

    def describe(self) -> str:
        """One line for tables and logs."""
        runtime = (f"{self.runtime} {self.runtime_version}, " if self.runtime != "eager"
                   else "eager, ")
        return (f"{self.device} ({self.device_name}), {runtime}{self.precision}, "
                f"{self.threads} thread(s), torch {self.torch_version}, "
                f"input {self.input_size}x{self.input_size}, batch {self.batch_size}, "
                f"{self.memory_format}, {self.clock} clock")


@dataclass(frozen=True)
class LatencyResult:
    """Median latency of one network with its spread, effort and context."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    cv: float  # robust: IQR / (1.349 * median), equals std/mean for Gaussian timings
    runs: int  # timed runs behind the statistics
    warmup_runs: int
    seconds: float  # wall time spent measuring, warm-up included
    stopped_early: bool  # every run exceeded stop_above_ms; latency is only known to be above it
    context: LatencyContext
    stop_above_ms: float | None = None  # the bound this was measured under
    load_avg: float | None = None  # 1-minute load average when it finished (None: unknown)
    convert_s: float = 0.0  # converting the network for its runtime (not in `seconds`)
    raw_ms: float | None = None  # interleaved: the candidate's own median, beside the estimate
    reference_ms: float | None = None  # interleaved: the reference's calibrated latency

    def to_dict(self) -> dict[str, Any]:
        """Flat and JSON-able, for Optuna user attributes, CSV rows and the cache file."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "context"}
        return {**data, **dataclasses.asdict(self.context)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyResult:
        """Inverse of `to_dict`."""
        ctx_names = {f.name for f in dataclasses.fields(LatencyContext)}
        context = LatencyContext(**{k: data[k] for k in ctx_names if k in data})
        own = {f.name for f in dataclasses.fields(cls)} - {"context"}
        return cls(**{k: data[k] for k in own if k in data}, context=context)


# --------------------------------------------------------------------------- context


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICES:
        raise LatencyError(f"device={device!r} is not supported; expected 'cpu' or 'cuda' "
                           f"(or 'cuda:N')")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LatencyError(f"device={device!r} but torch finds no CUDA GPU here "
                           f"(torch.cuda.is_available() is False); use device 'cpu'")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise LatencyError(f"device={device!r}: there are only {torch.cuda.device_count()} "
                           f"CUDA device(s), numbered from 0")
    return torch.device("cuda", index)


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < minimum
    if bad or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise LatencyError(f"{name}={value!r} must be an integer {allowed}")


def _check_budget(min_runs: int, min_time_s: float, max_time_s: float,
                  stop_above_ms: float | None) -> None:
    _check_int("min_runs", min_runs, minimum=1)
    if not (math.isfinite(max_time_s) and max_time_s > 0):
        raise LatencyError(f"max_time_s={max_time_s!r} must be a number of seconds > 0")
    if not (0 <= min_time_s <= max_time_s):
        raise LatencyError(f"min_time_s={min_time_s!r} must be from 0 to "
                           f"max_time_s={max_time_s!r}")
    if stop_above_ms is not None and not (stop_above_ms > 0):
        raise LatencyError(f"stop_above_ms={stop_above_ms!r} must be > 0 ms, or None")


def _resolve_clock(clock: str | None, dev: torch.device, threads: int,
                   runtime: str = "eager") -> str:
    """thread CPU time where one thread does all the work; CUDA events on GPU; else wall."""
    if dev.type == "cuda" and runtime != "eager":  # the runtime returns its output on the CPU
        if clock not in (None, "wall"):
            raise LatencyError(f"clock={clock!r} is for CPU; runtime {runtime!r} on {dev} is "
                               f"timed by the wall clock (clock None or 'wall')")
        return "wall"
    if dev.type == "cuda":
        if clock not in (None, "wall"):
            raise LatencyError(f"clock={clock!r} is for CPU; on {dev} latency is timed with "
                               f"CUDA events (clock None or 'wall')")
        return "cuda-events"
    if clock is None:
        return "thread" if threads == 1 else "wall"
    if clock not in CLOCKS:
        raise LatencyError(f"clock={clock!r} is not allowed; expected one of {list(CLOCKS)}")
    if clock == "thread" and threads != 1:
        raise LatencyError(f"clock='thread' counts only the calling thread's CPU time, so it "
                           f"needs threads=1, not threads={threads}; use clock='wall'")
    return clock


def latency_context(input_size: int = 224, *, device: str = "cpu", batch_size: int = 1,
                    threads: int | None = None, channels_last: bool = True,
                    clock: str | None = None, runtime: str = "eager",
                    precision: str = "fp32") -> LatencyContext:
    """Validate the options and say where a measurement would run, without running it."""
    dev = _check_device(device)
    rt = _check_runtime(runtime, precision, dev)
    _check_int("input_size", input_size, minimum=MIN_INPUT_SIZE)
    _check_int("batch_size", batch_size, minimum=1)
    threads = DEFAULT_THREADS if threads is None else threads
    _check_int("threads", threads, minimum=1, maximum=available_cpus())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    return LatencyContext(
        device=str(dev), device_name=name, threads=threads, torch_version=torch.__version__,
        input_size=input_size, batch_size=batch_size,
        memory_format="channels_last" if channels_last and rt.name == "eager" else "contiguous",
        clock=_resolve_clock(clock, dev, threads, rt.name), runtime=rt.name,
        runtime_version="" if rt.name == "eager" else rt.version(), precision=precision)


def _check_runtime(runtime: str, precision: str, dev: torch.device) -> Runtime:
    try:
        rt = get_runtime(runtime)
        rt.check(precision=precision, device=dev.type)
    except (RuntimeUnavailable, UnsupportedSetting) as e:
        raise LatencyError(str(e)) from None
    return rt


# --------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval for the measurement, then each submodule's own flag back (frozen BN stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _runner(model: Callable[[torch.Tensor], Any], x: torch.Tensor,
            clock: str) -> Callable[[], float]:
    """One forward pass (a module or a runtime's predictor) -> its milliseconds, on the
    context's clock."""
    if clock == "cuda-events":
        stream = torch.cuda.current_stream(x.device)  # where torch queues this device's kernels
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def run_cuda() -> float:
            start.record(stream)
            model(x)
            end.record(stream)
            end.synchronize()  # kernels are asynchronous: wait before reading the time
            return start.elapsed_time(end)

        torch.cuda.synchronize(x.device)  # nothing queued earlier may land in the first run
        return run_cuda

    now = time.thread_time_ns if clock == "thread" else time.perf_counter_ns

    def run_cpu() -> float:
        t0 = now()
        model(x)
        return (now() - t0) / 1e6

    return run_cpu


def _settled(times: list[float]) -> bool:
    if len(times) < 2 * WARMUP_WINDOW:
        return False
    last = float(np.median(times[-WARMUP_WINDOW:]))
    before = float(np.median(times[-2 * WARMUP_WINDOW:-WARMUP_WINDOW]))
    return abs(last - before) <= WARMUP_TOLERANCE * before


def _overruns(start: float, runs: int, deadline: float) -> bool:
    """Would one more run, as long as the average so far, end past the deadline?"""
    now = time.perf_counter()
    return now + (now - start) / runs > deadline


def _warm_up(run: Callable[[], float], *, until: float,
             stop_above_ms: float | None) -> tuple[list[float], bool]:
    """Runs until timings settle or the warm-up budget ends; True if the early stop fired."""
    times: list[float] = []
    start = time.perf_counter()
    # the early stop needs its runs even when they overrun the budget: a slow network (or a
    # busy machine) is exactly when it must fire
    min_runs = max(WARMUP_MIN_RUNS, 1 + EARLY_STOP_RUNS if stop_above_ms is not None else 0)
    while True:
        times.append(run())
        if (stop_above_ms is not None and len(times) == 1 + EARLY_STOP_RUNS
                and min(times[1:]) > stop_above_ms):
            return times[1:], True
        if _settled(times):
            return times, False
        if len(times) >= min_runs and _overruns(start, len(times), until):
            return times, False


def _timed_runs(run: Callable[[], float], *, min_runs: int, min_time_s: float,
                deadline: float) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(run())
        if len(times) >= min_runs and time.perf_counter() - start >= min_time_s:
            return times
        if len(times) >= MIN_TIMED_RUNS and _overruns(start, len(times), deadline):
            return times


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _summarise(times: list[float], *, warmup_runs: int, seconds: float, stopped_early: bool,
               context: LatencyContext, stop_above_ms: float | None) -> LatencyResult:
    p10, p25, median, p75, p90 = np.percentile(times, [10, 25, 50, 75, 90]).tolist()
    iqr = p75 - p25
    return LatencyResult(
        median_ms=median, p10_ms=p10, p90_ms=p90, iqr_ms=iqr, cv=iqr / (IQR_TO_STD * median),
        runs=len(times), warmup_runs=warmup_runs, seconds=seconds, stopped_early=stopped_early,
        context=context, stop_above_ms=stop_above_ms, load_avg=_load_avg())


def measure_latency(model: nn.Module, input_size: int = 224, *, device: str = "cpu",
                    batch_size: int = 1, threads: int | None = None, channels_last: bool = True,
                    min_runs: int = 20, min_time_s: float = 1.0, max_time_s: float = 2.0,
                    stop_above_ms: float | None = None, clock: str | None = None,
                    runtime: str = "eager", precision: str = "fp32",
                    calibration: torch.Tensor | None = None,
                    quiet: Callable[[], contextlib.AbstractContextManager] | None = None
                    ) -> LatencyResult:
    """Median inference latency of `model` on a random batch, by the protocol in the module doc.

    `threads` defaults to 1 (one core, as MnasNet's single Pixel core); `clock` defaults to the
    thread's CPU time for 1 CPU thread, else wall time. With `runtime` other than eager the
    network is first converted (int8: quantized, calibrated on `calibration` images, else on
    random ones) and the runtime's predictor is timed; a network the converter refuses raises
    nas.runtimes.ConversionError; the model is moved to the CPU in place first (the runtimes
    convert from there). Eager: the model is moved to `device` and converted to the memory
    format in place, as ``model.to`` would. Its training flags are restored either way.
    `quiet`: a context held while timing, not while converting (nas.search's CoreGate).
    """
    context = latency_context(input_size, device=device, batch_size=batch_size,
                              threads=threads, channels_last=channels_last, clock=clock,
                              runtime=runtime, precision=precision)
    _check_budget(min_runs, min_time_s, max_time_s, stop_above_ms)
    with (prepared_runner(model, context, calibration=calibration) as (run, convert_s),
          quiet() if quiet is not None else contextlib.nullcontext()):
        result = _protocol(run, context, min_runs=min_runs, min_time_s=min_time_s,
                           max_time_s=max_time_s, stop_above_ms=stop_above_ms)
    return dataclasses.replace(result, convert_s=convert_s)


@contextlib.contextmanager
def prepared_runner(model: nn.Module, context: LatencyContext, *,
                    calibration: torch.Tensor | None = None
                    ) -> Iterator[tuple[Callable[[], float], float]]:
    """(one timed forward pass -> ms, seconds converting) for `model` in the context's runtime,
    valid inside the block: eager runs in eval mode under inference_mode on the context's
    threads and memory format; another runtime converts and loads it first (not timed). The
    garbage collector is paused inside. The model's training flags are restored after."""
    dev = torch.device(context.device)
    if dev.type == "cpu":
        pin_malloc_thresholds()
    gen = torch.Generator().manual_seed(0)
    size = context.input_size
    x = torch.randn(context.batch_size, IN_CHANNELS, size, size, generator=gen)
    if context.runtime != "eager":
        with _eval_mode(model):
            compiled = get_runtime(context.runtime).compile(
                model.cpu(), x, threads=context.threads, precision=context.precision,
                calibration=calibration, device=context.device)
        # the predictors return on the CPU, so on a GPU the wall clock includes the device's
        with _gc_paused():
            yield _runner(compiled.predict, x, context.clock), compiled.convert_s
        return
    fmt = (torch.channels_last if context.memory_format == "channels_last"
           else torch.contiguous_format)
    model.to(device=dev, memory_format=fmt)
    x = x.to(device=dev, memory_format=fmt)
    with (_num_threads(context.threads), _eval_mode(model), _gc_paused(),
          torch.inference_mode()):
        yield _runner(model, x, context.clock), 0.0


def _protocol(run: Callable[[], float], context: LatencyContext, *, min_runs: int,
              min_time_s: float, max_time_s: float,
              stop_above_ms: float | None) -> LatencyResult:
    """Warm up until settled (or stop early), then the timed runs, then their statistics."""
    start = time.perf_counter()
    warm, stopped = _warm_up(run, until=start + WARMUP_BUDGET_FRACTION * max_time_s,
                             stop_above_ms=stop_above_ms)
    timed = warm if stopped else _timed_runs(
        run, min_runs=min_runs, min_time_s=min_time_s, deadline=start + max_time_s)
    return _summarise(timed, warmup_runs=0 if stopped else len(warm),
                      seconds=time.perf_counter() - start, stopped_early=stopped,
                      context=context, stop_above_ms=stop_above_ms)


# --------------------------------------------------------------------------- cache


def architecture_key(arch: Any) -> str:
    """A short stable hash of everything that shapes the network (the name does not)."""
    data = {k: v for k, v in arch.to_dict().items() if k != "name"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class LatencyCache:
    """Measure each (architecture, context) once per study; a JSON file carries it across resumes.

    A result that stopped early is reused only for a bound at or below the one it stopped at.
    Several processes may share a file: each write merges the file's entries with its own and
    replaces the file atomically.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.hits = 0
        self.misses = 0
        self._entries: dict[tuple[str, LatencyContext], LatencyResult] = {}
        if self.path is not None and self.path.exists():
            self._entries.update(self._read())

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_measure(self, key: str, model_fn: Callable[[], nn.Module], *,
                       input_size: int = 224, device: str = "cpu", batch_size: int = 1,
                       threads: int | None = None, channels_last: bool = True,
                       min_runs: int = 20, min_time_s: float = 1.0, max_time_s: float = 2.0,
                       stop_above_ms: float | None = None, clock: str | None = None,
                       runtime: str = "eager", precision: str = "fp32",
                       calibration: torch.Tensor | None = None,
                       measure: Callable[[], LatencyResult] | None = None,
                       context: LatencyContext | None = None) -> LatencyResult:
        """The cached result for `key` in this context, else build with `model_fn` and measure;
        or, with `measure`, what it returns (a latency server's measurement, an interleaved
        one), cached under `context` (what it measures in)."""
        if context is None:
            context = latency_context(input_size, device=device, batch_size=batch_size,
                                      threads=threads, channels_last=channels_last, clock=clock,
                                      runtime=runtime, precision=precision)
        cached = self._entries.get((key, context))
        if cached is not None and _reusable(cached, stop_above_ms):
            self.hits += 1
            return cached
        self.misses += 1
        result = measure() if measure is not None else measure_latency(
            model_fn(), input_size, device=device, batch_size=batch_size, threads=threads,
            channels_last=channels_last, min_runs=min_runs, min_time_s=min_time_s,
            max_time_s=max_time_s, stop_above_ms=stop_above_ms, clock=clock, runtime=runtime,
            precision=precision, calibration=calibration)
        self._entries[(key, result.context)] = result
        if self.path is not None:
            self._write()
        return result

    def _read(self) -> dict[tuple[str, LatencyContext], LatencyResult]:
        try:
            data = json.loads(self.path.read_text())
            entries = [(e["key"], LatencyResult.from_dict(e["result"])) for e in data["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LatencyError(f"latency cache {self.path}: unreadable ({type(e).__name__}: "
                               f"{e}); delete it to measure afresh") from None
        return {(key, r.context): r for key, r in entries}

    def _write(self) -> None:
        merged = self._read() if self.path.exists() else {}
        merged.update(self._entries)
        entries = [{"key": k, "result": r.to_dict()} for (k, _), r in merged.items()]
        write_atomic(self.path, json.dumps({"version": self.VERSION, "entries": entries},
                                           indent=1))


def _reusable(cached: LatencyResult, stop_above_ms: float | None) -> bool:
    if not cached.stopped_early:
        return True
    return stop_above_ms is not None and stop_above_ms <= (cached.stop_above_ms or math.inf)


# --------------------------------------------------------------------------- networks

TORCHVISION_PREFIX = "torchvision:"


def network_builder(spec: str) -> Callable[[], nn.Module]:
    """Check `spec` now (cheap) and return a function that builds the network later."""
    if spec.startswith(TORCHVISION_PREFIX):
        return _torchvision_builder(spec[len(TORCHVISION_PREFIX):])
    try:
        arch = load_architecture(spec)
    except ArchError as e:
        raise LatencyError(f"{e}; or torchvision:NAME for a torchvision model") from None
    return lambda: build_model(arch)


def _torchvision_builder(name: str) -> Callable[[], nn.Module]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise LatencyError(f"torchvision:{name}: not a torchvision model; see "
                           f"torchvision.models.list_models(), e.g. resnet18, vgg16, "
                           f"mobilenet_v3_small, efficientnet_b0")
    return lambda: torchvision.models.get_model(name, weights=None)


def resolve_network(spec: str) -> tuple[str, nn.Module]:
    """'torchvision:NAME' (untrained, 1000 classes), a reference name or an architecture file."""
    return spec, network_builder(spec)()


# --------------------------------------------------------------------------- side-by-side tool


def measure_networks(specs: Sequence[str], *, input_size: int = 224, device: str = "cpu",
                     batch_size: int = 1, threads: int | None = None, channels_last: bool = True,
                     min_time_s: float = 1.0, max_time_s: float = 2.0,
                     clock: str | None = None, runtime: str = "eager",
                     precision: str = "fp32", protocol: str = "single") -> list[dict[str, Any]]:
    """One flat row per network: its latency result plus parameters and multiply-adds.
    `protocol` interleaved: each network against the reference (nas.interleaved), batch 1 and
    the runtime's own layout and clock; min_time_s and max_time_s are the single protocol's."""
    latency_context(input_size, device=device, batch_size=batch_size, threads=threads,
                    channels_last=channels_last, clock=clock, runtime=runtime,
                    precision=precision)
    _check_budget(1, min_time_s, max_time_s, None)
    builders = [(spec, network_builder(spec)) for spec in specs]  # fail before measuring
    rows = []
    for spec, build in builders:
        model = _built(spec, build)
        params = count_params(model)
        macs = _guarded(spec, input_size, functools.partial(count_macs, model, input_size))
        if protocol == "interleaved":
            from nas.interleaved import measure_interleaved  # it builds on this module

            result = _guarded(spec, input_size, lambda model=model: measure_interleaved(
                model, input_size, device=device, threads=threads, runtime=runtime,
                precision=precision).as_result())
        else:
            result = _measured(spec, model, input_size, device=device, batch_size=batch_size,
                               threads=threads, channels_last=channels_last,
                               min_time_s=min_time_s, max_time_s=max_time_s, clock=clock,
                               runtime=runtime, precision=precision)
        rows.append({"network": spec, **result.to_dict(), "params": params, "macs": macs})
    return rows


def _built(spec: str, build: Callable[[], nn.Module]) -> nn.Module:
    try:
        return build()
    except TooLargeError as e:
        raise LatencyError(f"{spec}: {e}") from None


def _measured(spec: str, model: nn.Module, input_size: int, **options: Any) -> LatencyResult:
    """measure_latency, with a network that cannot be converted or run as one line."""
    return _guarded(spec, input_size, lambda: measure_latency(model, input_size, **options))


def _guarded(spec: str, input_size: int, run: Callable[[], Any]) -> Any:
    """run(), with a network that cannot be converted, fit in memory or run as one line."""
    try:
        return run()
    except ConversionError as e:
        raise LatencyError(f"{spec}: {e}") from None
    except RuntimeError as e:
        if is_out_of_memory(e):
            raise LatencyError(f"{spec}: out of memory at --input-size {input_size} "
                               f"({failed_allocation(e)})") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LatencyError(f"{spec}: forward failed at input size {input_size}: "
                           f"{first}") from None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table, then the context line the numbers were taken in."""
    w = max([len("network"), *(len(r["network"]) for r in rows)])
    header = (f"{'network':<{w}} {'median ms':>10} {'p10':>8} {'p90':>8} {'CV %':>6} "
              f"{'runs':>5} {'params M':>9} {'MACs M':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['network']:<{w}} {r['median_ms']:>10.2f} {r['p10_ms']:>8.2f} "
                     f"{r['p90_ms']:>8.2f} {100 * r['cv']:>6.1f} {r['runs']:>5d} "
                     f"{r['params'] / 1e6:>9.2f} {r['macs'] / 1e6:>9.1f}")
    if rows:
        first = LatencyResult.from_dict(rows[0])
        ctx = first.context
        if ctx.protocol.startswith("interleaved"):
            how = (f"the median over {first.runs} rounds of each network's ratio to "
                   f"{ctx.protocol.split(':', 1)[1]} timed alternately, times its latency on "
                   f"this machine ({first.reference_ms:.2f} ms, the median of its kept "
                   f"sittings); p10/p90 and CV of the ratio, 'runs' the rounds")
        else:
            how = "median of timed runs after warm-up, CV = IQR / (1.349 * median)"
        lines.append(f"context: {ctx.describe()}; {how}; {_load_note(rows)}")
    return "\n".join(lines)


def _load_note(rows: Sequence[dict[str, Any]]) -> str:
    loads = [r["load_avg"] for r in rows if r.get("load_avg") is not None]
    if not loads:
        return "load average unknown"
    return f"load average {min(loads):.1f}-{max(loads):.1f} on {available_cpus()} CPUs"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error of this tool."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise LatencyError(message)


def _threads_arg(text: str) -> int:
    value = int_in_range(1)(text)
    if value > available_cpus():
        raise argparse.ArgumentTypeError(f"{value} exceeds the {available_cpus()} CPU(s) this "
                                         f"process may use")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m nas.latency", formatter_class=HelpFormatter,
        description="Measure the inference latency of several networks on this machine and "
                    "print one table (median, p10/p90, CV, parameters, multiply-adds). "
                    "Protocol: eval + inference_mode, warm-up until settled, then timed in "
                    "rounds alternating with a reference network (--protocol); see "
                    "docs/latency.md.")
    parser.add_argument("networks", nargs="+", metavar="NETWORK",
                        help="an architecture file (.yaml/.json), a reference network "
                             "(e.g. mnasnet_a1) or torchvision:NAME (e.g. torchvision:resnet18)")
    parser.add_argument("--runtime", choices=RUNTIME_NAMES, default=DEFAULT_RUNTIME,
                        help="what runs the network: the runtime you deploy with (eager is "
                             "PyTorch itself, kept for comparison; docs/latency.md says which "
                             "runtime fits which target)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="int8: the network statically quantized by the runtime's own "
                             "quantizer (onnxruntime, executorch)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where to measure; cuda times with CUDA events and needs a GPU")
    parser.add_argument("--input-size", type=int_in_range(MIN_INPUT_SIZE), default=224,
                        help="square input side in pixels: the deployment resolution")
    parser.add_argument("--batch-size", type=int_in_range(1), default=1,
                        help="images per forward pass; 1 is one user's request, as MnasNet")
    parser.add_argument("--threads", type=_threads_arg, default=DEFAULT_THREADS,
                        help="CPU threads; 1 mimics the single big phone core MnasNet timed "
                             "and is steadier on a shared machine")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="eager runtime: NHWC tensors, the faster layout on CPU "
                             "(docs/latency.md); the other runtimes choose their own")
    parser.add_argument("--clock", choices=CLOCKS,
                        help="thread: CPU time of the one measuring thread, which leaves out "
                             "the time other jobs hold the core (needs --threads 1); wall: "
                             "perf_counter. None: thread for 1 thread, else wall")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="interleaved",
                        help="interleaved: each network timed in rounds alternating with a "
                             "reference network (mnasnet_a1), as the median ratio times the "
                             "reference's latency on this machine, as nas.search measures by "
                             "default: it ranked 12 networks with Spearman 0.986 between fresh "
                             "processes against 0.86-0.89 for single "
                             "(benchmarks/results/latency_aa_zen4.txt); single: each network "
                             "timed alone (--batch-size, --clock, --no-channels-last, "
                             "--min-time and --max-time are its options)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="single protocol: seconds of timed runs per network (at least 20 "
                             "runs) (default: 1.0)")
    parser.add_argument("--max-time", type=float, default=None,
                        help="single protocol: wall-time budget per network in seconds, "
                             "warm-up included (default: 2.0)")
    parser.add_argument("--csv", type=Path, help="also write the rows, with context, as CSV")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="measure on the device running `python -m nas.latency serve` "
                             "(needs --token-file); `python -m nas.latency serve --help` starts "
                             "one")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="the latency server's shared token")
    parser.add_argument("--match-latency", type=float, default=None, metavar="MS",
                        help="instead, find for each network the width multiplier (NAME@m, m a "
                             "multiple of 0.05 from 0.1 to 2) whose latency is nearest MS: "
                             "baselines at equal latency")
    return parser


def _check_cli(args: argparse.Namespace) -> None:
    """What argparse cannot check, named by flag, before minutes of measuring."""
    if args.protocol == "interleaved":
        given = [flag for flag, value, default in (
            ("--batch-size", args.batch_size, 1), ("--clock", args.clock, None),
            ("--no-channels-last", args.channels_last, True),
            ("--min-time", args.min_time, None), ("--max-time", args.max_time, None))
            if value != default]
        if given:
            raise LatencyError(f"{given[0]}: an option of the single protocol; the interleaved "
                               f"one (the default) times batch 1 in its own rounds; add "
                               f"--protocol single to use it")
    args.min_time = 1.0 if args.min_time is None else args.min_time
    args.max_time = 2.0 if args.max_time is None else args.max_time
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LatencyError("--device cuda: torch finds no CUDA GPU on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu")
    if args.clock == "thread" and args.threads != 1:
        raise LatencyError(f"--clock thread counts only the calling thread's CPU time, so it "
                           f"needs --threads 1, not --threads {args.threads}")
    if not (math.isfinite(args.max_time) and args.max_time > 0):
        raise LatencyError(f"--max-time {args.max_time:g} must be a number of seconds > 0")
    if not (0 <= args.min_time <= args.max_time):
        raise LatencyError(f"--min-time {args.min_time:g} must be from 0 to --max-time "
                           f"{args.max_time:g}")
    if bool(args.server) != bool(args.token_file):
        raise LatencyError("--server and --token-file go together")
    if args.server and args.match_latency is not None:
        raise LatencyError("--match-latency measures here; leave out --server")
    if args.csv is not None and args.csv.is_dir():
        raise LatencyError(f"--csv {args.csv}: is a folder; give a file name, e.g. "
                           f"{args.csv / 'latency.csv'}")
    if args.csv is not None and not args.csv.parent.is_dir():
        problem = "is not a folder" if args.csv.parent.exists() else "does not exist"
        raise LatencyError(f"--csv {args.csv}: folder {args.csv.parent} {problem}")
    if args.csv is not None and not os.access(args.csv.parent, os.W_OK):  # before minutes of
        raise LatencyError(f"--csv {args.csv}: folder {args.csv.parent} is not writable")  # work


def main(argv: Sequence[str] | None = None) -> int:
    """Run the side-by-side tool; user errors are one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from nas.latency_server import serve

        return serve(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        _check_cli(args)
        if args.match_latency is not None:
            return _match_cli(args)
        if args.server:
            rows = _remote_rows(args)
        else:
            rows = measure_networks(
                args.networks, input_size=args.input_size, device=args.device,
                batch_size=args.batch_size, threads=args.threads,
                channels_last=args.channels_last, min_time_s=args.min_time,
                max_time_s=args.max_time, clock=args.clock, runtime=args.runtime,
                precision=args.precision, protocol=args.protocol)
    except LatencyError as e:
        print(f"nas.latency: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    loads = [r["load_avg"] for r in rows if r.get("load_avg") is not None]
    if loads and max(loads) > available_cpus():
        print(f"nas.latency: warning: load average reached {max(loads):.1f} on "
              f"{available_cpus()} CPUs while measuring; other jobs shared the CPU, so expect "
              f"a few % more noise", file=sys.stderr)
    if args.csv is not None:
        import pandas as pd

        try:
            write_atomic(args.csv, pd.DataFrame(rows).to_csv(index=False))
        except OSError as e:  # e.g. the disk filled while measuring
            print(f"nas.latency: error: --csv {args.csv}: cannot be written ({e.strerror or e})",
                  file=sys.stderr)
            return 2
    return 0


def _remote_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The table's rows, measured by a latency server: architectures only (the server builds
    them from their description; a torchvision network has none to send)."""
    from nas.latency_client import LatencyClient, read_token, server_url

    client = LatencyClient(server_url(args.server, "--server"),
                           read_token(args.token_file, "--token-file"))
    archs = []
    for spec in args.networks:
        if spec.startswith(TORCHVISION_PREFIX):
            raise LatencyError(f"{spec}: --server measures architectures (names or files); a "
                               f"torchvision network has no description to send")
        try:
            archs.append((spec, load_architecture(spec)))
        except ArchError as e:
            raise LatencyError(str(e)) from None
    rows = []
    reference_ms = None  # interleaved: the server's calibration, then every row's yardstick
    for spec, arch in archs:
        model = _built(spec, lambda arch=arch: build_model(arch))
        result = client.measure(arch, num_classes=1000, input_size=args.input_size,
                                device=args.device, threads=args.threads, runtime=args.runtime,
                                precision=args.precision, min_time_s=args.min_time,
                                max_time_s=args.max_time, protocol=args.protocol,
                                reference_ms=reference_ms)
        reference_ms = result.reference_ms
        rows.append({"network": spec, **result.to_dict(), "params": count_params(model),
                     "macs": count_macs(model, args.input_size)})
    return rows


def _match_cli(args: argparse.Namespace) -> int:
    from nas.width_match import match_width

    if not (math.isfinite(args.match_latency) and args.match_latency > 0):
        raise LatencyError(f"--match-latency {args.match_latency:g}: must be a number of ms > 0")
    for spec in args.networks:
        if spec.startswith(TORCHVISION_PREFIX) or ("@" in Path(spec).name
                                                   and not Path(spec).exists()):
            raise LatencyError(f"--match-latency: {spec} is not a family to scale; give a "
                               f"reference name or an architecture file, without @m")
        network_builder(spec)  # a bad name fails before minutes of measuring
    context = None

    def measure(spec_at: str) -> float:
        nonlocal context
        [row] = measure_networks(
            [spec_at], input_size=args.input_size, device=args.device,
            batch_size=args.batch_size, threads=args.threads, channels_last=args.channels_last,
            min_time_s=args.min_time, max_time_s=args.max_time, clock=args.clock,
            runtime=args.runtime, precision=args.precision, protocol=args.protocol)
        context = LatencyResult.from_dict(row).context
        return row["median_ms"]

    matches = [match_width(spec, args.match_latency, measure) for spec in args.networks]
    w = max(len("network"), *(len(m.spec) for m in matches))
    header = f"{'network':<{w}} {'multiplier':>10} {'median ms':>10} {'target':>8} {'gap %':>7}"
    print("\n".join([header, "-" * len(header), *(
        f"{m.spec:<{w}} {m.mult:>10g} {m.latency_ms:>10.2f} {m.target_ms:>8.2f} "
        f"{100 * m.gap:>+7.1f}   measured " + ", ".join(f"@{k:g} {v:.2f}"
                                                      for k, v in m.measured.items())
        for m in matches)]))
    print(f"context: {context.describe()}")
    return 0


if __name__ == "__main__":
    run_module("nas.latency")
