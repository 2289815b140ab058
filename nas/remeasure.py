"""A finished run's networks timed again as the run timed them (runtime, precision, input size,
threads, device and protocol), here or on the run's latency server: `nas.confirm`'s sitting,
`nas.plot --remeasure`, and the front a search re-measures at its end."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch

from nas.arch import Architecture, load_architecture
from nas.data import DataSplits, load_data
from nas.files import write_atomic
from nas.interleaved import measure_interleaved, warm_runs_of
from nas.latency import LatencyError, LatencyResult, latency_context, measure_latency
from nas.latency_client import LatencyClient
from nas.model import build_model
from nas.pareto import pareto_frame, trials_frame
from nas.results import load_baselines
from nas.run_folder import FRONT_LATENCY
from nas.runtimes.base import LATENCY_CALIBRATION_IMAGES, calibration_sample

FRONT_COLUMNS = ["number", "baseline", "latency_final_ms", "latency_final_p10_ms",
                 "latency_final_p90_ms"]


class RunLatency:
    """Latency as the run measured it. Interleaved: against `reference_ms` (None: calibrated
    once in this process, or by the server on its first answer), so every network of the
    sitting shares one yardstick."""

    def __init__(self, settings: dict[str, Any], num_classes: int, seconds: float = 2.0,
                 remote: LatencyClient | None = None, calibration: torch.Tensor | None = None,
                 reference_ms: float | dict[str, float] | None = None) -> None:
        self.settings, self.num_classes, self.seconds = settings, num_classes, seconds
        self.remote, self.calibration, self.reference_ms = remote, calibration, reference_ms

    def result(self, arch: Architecture) -> LatencyResult:
        s = self.settings
        options = dict(device=s["device"], threads=s["threads"],
                       runtime=s.get("runtime", "eager"), precision=s.get("precision", "fp32"))
        protocol = s.get("latency_protocol", "single")
        interleaved = protocol.startswith("interleaved")
        ladder = protocol.startswith("interleaved-ladder")
        warm = warm_runs_of(protocol)  # the run's: 0 for studies from before warm runs
        if self.remote is not None:
            lat = self.remote.measure(
                arch, num_classes=self.num_classes, input_size=s["input_size"], **options,
                min_time_s=self.seconds / 2, max_time_s=self.seconds,
                protocol="interleaved" if interleaved else "single",
                reference_ms=self.reference_ms, warm_runs=warm if interleaved else None)
            self.reference_ms = lat.reference_ms
            return lat
        model = build_model(arch, num_classes=self.num_classes)
        if interleaved:
            return measure_interleaved(model, s["input_size"], num_classes=self.num_classes,
                                       reference_ms=self.reference_ms, ladder=ladder,
                                       calibration=self.calibration, warm_runs_per_block=warm,
                                       **options).as_result()
        return measure_latency(model, s["input_size"], min_time_s=self.seconds / 2,
                               max_time_s=self.seconds, calibration=self.calibration, **options)

    def __call__(self, arch: Architecture) -> tuple[float, float]:
        """(median ms, cv)."""
        lat = self.result(arch)
        return lat.median_ms, lat.cv


def calibration_for(settings: dict[str, Any], data: DataSplits | None = None
                    ) -> torch.Tensor | None:
    """The training images that quantize an int8 network for its latency, taken as nas.search
    takes them (None for fp32); `data` defaults to the run's."""
    if settings.get("precision", "fp32") == "fp32":
        return None
    data = data or load_data(settings.get("data"), val_size=0)
    return calibration_sample(data.train, LATENCY_CALIBRATION_IMAGES, mean=data.mean, std=data.std)


def check_same_target(settings: dict[str, Any], remote: LatencyClient | None = None, *,
                      otherwise: str) -> str:
    """The latency device (this machine's, or the server's); LatencyError if the run measured
    on another one, ending with `otherwise` (what the user can do instead)."""
    options = dict(input_size=settings["input_size"], device=settings["device"],
                   threads=settings["threads"], runtime=settings.get("runtime", "eager"),
                   precision=settings.get("precision", "fp32"))
    if remote is not None:
        if settings.get("latency_protocol", "").startswith("interleaved-ladder"):
            raise LatencyError("the run measured latency by the ladder protocol, which a "
                               "latency server does not measure yet; " + otherwise)
        here = remote.context(**options).device_name
        where = f"the latency server {remote.url} is"
    else:
        here = latency_context(options.pop("input_size"), **options).device_name
        where = "this machine is"
    there = settings.get("latency_device")
    if there and there != here:
        raise LatencyError(f"the run measured latency on {there}, {where} {here}: latency "
                           f"cannot be re-measured here; {otherwise}")
    return here


def remeasure_front(study: optuna.Study, run_dir: Path,
                    measure: Callable[[Architecture], LatencyResult], seed: int = 0
                    ) -> pd.DataFrame:
    """Time the front's trials and the complete baselines again, together, in a shuffled
    order; written to front_latency.csv (results.write_results adds it to pareto.csv and the
    plot). Their latencies were otherwise taken hours apart under different loads."""
    nets: list[tuple[int | None, str | None, Architecture]] = []
    for _, row in pareto_frame(trials_frame(study)).iterrows():
        value = row["arch_dict"]
        nets.append((int(row["number"]), None, Architecture.from_dict(
            json.loads(value) if isinstance(value, str) else value)))
    baselines = load_baselines(run_dir)
    for _, row in (baselines[baselines.state == "COMPLETE"].iterrows() if len(baselines)
                   else ()):
        nets.append((None, row["baseline"], load_architecture(row["baseline"])))
    random.Random(seed).shuffle(nets)
    rows = []
    for number, baseline, arch in nets:
        lat = measure(arch)
        rows.append({"number": number, "baseline": baseline, "latency_final_ms": lat.median_ms,
                     "latency_final_p10_ms": lat.p10_ms, "latency_final_p90_ms": lat.p90_ms})
    df = pd.DataFrame(rows, columns=FRONT_COLUMNS)
    write_atomic(run_dir / FRONT_LATENCY, df.to_csv(index=False))
    return df
