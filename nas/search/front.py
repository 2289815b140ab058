"""The answer re-measured together: at the end of a search, the Pareto front and the baselines
are timed again in one sitting, by the study's protocol, in a shuffled order, with no training
beside them; their latencies were otherwise taken hours apart under different loads."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import optuna
import pandas as pd

from nas.arch import Architecture, load_architecture
from nas.files import write_atomic
from nas.latency import LatencyCache
from nas.model import build_model
from nas.pareto import pareto_frame, trials_frame
from nas.results import load_baselines
from nas.run_folder import FRONT_LATENCY
from nas.search.objective import Context, candidate_latency

COLUMNS = ["number", "baseline", "latency_final_ms", "latency_final_p10_ms",
           "latency_final_p90_ms"]


def remeasure_front(study: optuna.Study, ctx: Context, run_dir: Path, seed: int = 0
                    ) -> pd.DataFrame:
    """Time the front's trials and the complete baselines again, together; written to
    front_latency.csv (results.write_results adds it to pareto.csv and the plot)."""
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
    fresh = dataclasses.replace(ctx, cache=LatencyCache())  # measured now, not looked up
    rows = []
    for number, baseline, arch in nets:
        lat = candidate_latency(arch, build_model(arch, num_classes=ctx.data.num_classes),
                                fresh, bound=None)
        rows.append({"number": number, "baseline": baseline, "latency_final_ms": lat.median_ms,
                     "latency_final_p10_ms": lat.p10_ms, "latency_final_p90_ms": lat.p90_ms})
    df = pd.DataFrame(rows, columns=COLUMNS)
    write_atomic(run_dir / FRONT_LATENCY, df.to_csv(index=False))
    return df
