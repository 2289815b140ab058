"""A run folder's result files, written from storage so they can always be regenerated."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd

from nas.arch import Architecture, save_architecture
from nas.figures import write_plots
from nas.files import write_atomic
from nas.pareto import best_trial_row, is_baseline, pareto_frame, trials_frame
from nas.run_folder import FRONT_LATENCY

BASELINES_FILE = "baselines.csv"
BASELINE_COLUMNS = ("baseline", "state")  # what nas.search writes for a failed baseline too


class BaselinesError(ValueError):
    """A damaged baselines.csv, in one line: the file, what is wrong, and what to do."""


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    write_atomic(path, df.to_csv(index=False))


def load_baselines(run_dir: Path) -> pd.DataFrame:
    """Reference networks measured through the same latency and proxy, if any were asked for.

    Raises BaselinesError if the file is there but is not the table nas.search writes.
    """
    path = run_dir / BASELINES_FILE
    if not path.exists():
        return pd.DataFrame()
    again = "delete it and rerun nas.search with --baselines to measure them again"
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:  # pandas' ParserError, EmptyDataError; decoding errors
        first = (str(e).strip().splitlines() or [""])[0]
        raise BaselinesError(f"{path}: not a readable CSV table ({type(e).__name__}: {first}); "
                             f"{again}") from None
    missing = [c for c in BASELINE_COLUMNS if c not in df.columns]
    if missing:
        raise BaselinesError(f"{path}: no column {', '.join(missing)} (needs "
                             f"{', '.join(BASELINE_COLUMNS)}; has "
                             f"{', '.join(map(str, df.columns))[:80] or 'none'}); {again}")
    unnamed = df.index[~is_baseline(df)]
    if len(unnamed):
        raise BaselinesError(f"{path}: column baseline must name the reference network in every "
                             f"row; data row {unnamed[0] + 1} has none; {again}")
    return df


def save_baselines(df: pd.DataFrame, run_dir: Path) -> None:
    _atomic_csv(df, run_dir / BASELINES_FILE)


def write_results(study: optuna.Study, run_dir: Path, *, target_ms: float) -> dict[str, Path]:
    """trials.csv, pareto.csv, best.yaml and the interactive plots.

    Everything is read and checked (baselines.csv included) before the first file is written, so
    a damaged input leaves the previous results as they were.
    """
    df = _with_final_latency(trials_frame(study), run_dir, "number")
    baselines = _with_final_latency(load_baselines(run_dir), run_dir, "baseline")
    best = best_trial_row(df)
    arch = Architecture.from_dict(_arch_dict(best["arch_dict"])) if best is not None else None
    out = {"trials": run_dir / "trials.csv", "pareto": run_dir / "pareto.csv"}
    _atomic_csv(df, out["trials"])
    _atomic_csv(pareto_frame(df), out["pareto"])
    if arch is not None:
        out["best"] = save_architecture(arch, run_dir / "best.yaml")
    plot_df = pd.concat([df, baselines], ignore_index=True) if len(baselines) else df
    if len(plot_df):
        settings = study.user_attrs.get("settings") or {}  # older studies timed eager fp32
        measured_in = (f"{settings.get('runtime', 'eager')} "
                       f"{settings.get('precision', 'fp32')}") if isinstance(settings, dict) else ""
        for path in write_plots(plot_df, run_dir, target_ms=target_ms, measured_in=measured_in):
            out[path.name] = path
    return out


def _with_final_latency(df: pd.DataFrame, run_dir: Path, key: str) -> pd.DataFrame:
    """`df` with the re-measured latency columns of front_latency.csv, where it has them."""
    path = run_dir / FRONT_LATENCY
    if not len(df) or key not in df or not path.exists():
        return df
    try:
        final = pd.read_csv(path)
    except (OSError, ValueError):  # a damaged file: the results without it
        return df
    final = final[final[key].notna()].drop(columns=[c for c in ("number", "baseline")
                                                    if c != key])
    if key == "number":
        final[key] = final[key].astype(int)
    return df.merge(final, on=key, how="left")


def _arch_dict(value) -> dict:
    return json.loads(value) if isinstance(value, str) else value
