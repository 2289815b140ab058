"""Reference networks (--baselines) through the same latency and proxy as the candidates,
measured once per run folder into baselines.csv, so the plots and the reward table compare
the search's answer with what a user would take off the shelf."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from nas.arch import load_architecture
from nas.interrupts import INTERRUPTED
from nas.proxy import CandidateFailed
from nas.results import load_baselines, save_baselines
from nas.search.cpu_share import training_threads
from nas.search.liveness import set_baselines_flag
from nas.search.objective import Context, evaluate_architecture
from nas.space import SearchSpace, SpaceError


def run_baselines(names: list[str] | tuple[str, ...], ctx: Context, run_dir: Path,
                  study: optuna.Study | None = None) -> pd.DataFrame:
    """Measure and proxy-train the baselines not yet in baselines.csv.

    A baseline that failed (interrupted, out of memory) is measured again on the next resume.
    With the study, they train on a ThreadShare of it, and other processes count this one
    while it trains them.
    """
    if study is None:
        return _run_baselines(list(names), ctx, run_dir, None)
    set_baselines_flag(study, True)
    try:
        # every core at most: the --workers children start once the baselines are done
        return _run_baselines(list(names), ctx, run_dir,
                              training_threads(ctx.config, study, workers=1))
    finally:
        if not INTERRUPTED.is_set():  # else it is left to the dead pid, which nobody counts:
            set_baselines_flag(study, False)  # a write now could wait on the interrupted read


def enqueue_baselines(study: optuna.Study, space: SearchSpace,
                      names: list[str] | tuple[str, ...]) -> list[str]:
    """Enqueue each baseline that is a member of the space as a trial (once: Optuna skips one
    already there), so the sampler learns from it and the front is never worse than it.
    Returns the names enqueued."""
    queued = []
    for name in names:
        try:
            params = space.params_of(load_architecture(name))
        except SpaceError:  # not a member: measured as a baseline only
            continue
        study.enqueue_trial(params, user_attrs={"enqueued_baseline": name},
                            skip_if_exists=True)
        queued.append(name)
    return queued


def _run_baselines(names: list[str], ctx: Context, run_dir: Path,
                   threads: Callable[[], int] | None) -> pd.DataFrame:
    done = load_baselines(run_dir)
    rows = [r for r in (done.to_dict("records") if len(done) else [])
            if r.get("state") == "COMPLETE"]
    have = {r["baseline"] for r in rows}
    for name in names:
        if name in have:
            continue
        print(f"baseline {name} ...", flush=True)
        rec: dict[str, Any] = {}  # what was measured stays, latency above all, if training fails
        try:
            evaluate_architecture(load_architecture(name), ctx, record=rec, threads=threads)
        except (CandidateFailed, optuna.TrialPruned) as e:
            rec["fail_reason"] = str(e)
        except Exception as e:  # a reference network that fails here fails as a baseline only
            reason = str(e).splitlines()[0] if str(e) else ""
            rec["fail_reason"] = f"{type(e).__name__}: {reason}"
        rec.update(baseline=name, state="COMPLETE" if "accuracy" in rec else "FAIL",
                   arch_dict=json.dumps(rec.get("arch_dict")), val_curve=None)
        rows.append(rec)
        print(f"baseline {name}: lat {rec.get('latency_ms', float('nan')):.2f} ms  acc "
              f"{rec.get('accuracy', float('nan')):.4f}  reward "
              f"{rec.get('reward', float('nan')):.4f}", flush=True)
        rows.sort(key=lambda r: names.index(r["baseline"]) if r["baseline"] in names
                  else len(names))
        save_baselines(pd.DataFrame(rows), run_dir)
    return pd.DataFrame(rows)
