"""The answer re-measured together: at the end of a search, the Pareto front and the baselines
are timed again in one sitting, by the study's protocol and yardstick, with no training beside
them (`nas.remeasure.remeasure_front`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pandas as pd

from nas.latency import LatencyCache
from nas.model import build_model
from nas.remeasure import remeasure_front as _remeasure
from nas.search.objective import Context, candidate_latency


def remeasure_front(study: optuna.Study, ctx: Context, run_dir: Path, seed: int = 0
                    ) -> pd.DataFrame:
    fresh = dataclasses.replace(ctx, cache=LatencyCache())  # measured now, not looked up
    return _remeasure(study, run_dir, lambda arch: candidate_latency(
        arch, build_model(arch, num_classes=ctx.data.num_classes), fresh, bound=None), seed)
