"""A run folder's result files, written from storage so they can always be regenerated."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd

from nas.arch import Architecture, save_architecture
from nas.files import write_atomic
from nas.pareto import best_trial_row, pareto_frame, trials_frame
from nas.plots import write_plots

BASELINES_FILE = "baselines.csv"


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    write_atomic(path, df.to_csv(index=False))


def load_baselines(run_dir: Path) -> pd.DataFrame:
    """Reference networks measured through the same latency and proxy, if any were asked for."""
    path = run_dir / BASELINES_FILE
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def save_baselines(df: pd.DataFrame, run_dir: Path) -> None:
    _atomic_csv(df, run_dir / BASELINES_FILE)


def write_results(study: optuna.Study, run_dir: Path, *, target_ms: float) -> dict[str, Path]:
    """trials.csv, pareto.csv, best.yaml and the interactive plots."""
    df = trials_frame(study)
    out = {"trials": run_dir / "trials.csv", "pareto": run_dir / "pareto.csv"}
    _atomic_csv(df, out["trials"])
    _atomic_csv(pareto_frame(df), out["pareto"])
    best = best_trial_row(df)
    if best is not None:
        arch = Architecture.from_dict(_arch_dict(best["arch_dict"]))
        out["best"] = save_architecture(arch, run_dir / "best.yaml")
    baselines = load_baselines(run_dir)
    plot_df = pd.concat([df, baselines], ignore_index=True) if len(baselines) else df
    if len(plot_df):
        for path in write_plots(plot_df, run_dir, target_ms=target_ms):
            out[path.name] = path
    return out


def _arch_dict(value) -> dict:
    return json.loads(value) if isinstance(value, str) else value
