"""Regenerate a run's result files and plots from its storage.

    python -m nas.plot runs/search [--remeasure]

--remeasure first times the Pareto front and the baselines again, together, as the search does
at its end (after a resumed search, or one whose workers stopped without it), by the run's
protocol against the study's reference, on this machine or on the run's latency server.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import optuna

from nas.cli import HelpFormatter, Parser
from nas.data import DataError
from nas.interleaved import REFERENCE_ATTR
from nas.interrupts import run_module
from nas.latency import LatencyError
from nas.latency_client import connect
from nas.remeasure import RunLatency, calibration_for, check_same_target, remeasure_front
from nas.results import BaselinesError, write_results
from nas.run_folder import RunFolderError, load_run_study


def build_parser() -> argparse.ArgumentParser:
    """Flags, with their defaults shown in --help."""
    p = Parser(prog="nas.plot", description=__doc__.split("\n\n")[0],
               formatter_class=HelpFormatter)
    p.add_argument("run", help="run folder, e.g. runs/search")
    p.add_argument("--storage", default=None, help="Optuna storage URL if not the run's own")
    p.add_argument("--target-ms", type=float, default=None,
                   help="target line in the Pareto plot if not the run's --target-ms")
    p.add_argument("--remeasure", action="store_true",
                   help="time the front and the baselines again, together (front_latency.csv; "
                        "latency_final_ms in pareto.csv and the plot)")
    p.add_argument("--latency-time", type=float, default=2.0,
                   help="with --remeasure: seconds of measuring per network (single protocol)")
    p.add_argument("--latency-server", default=None, metavar="URL",
                   help="with --remeasure: measure on this server (the run's latency device)")
    p.add_argument("--latency-token-file", default=None,
                   help="the server's shared token (with --latency-server)")
    return p


def plot(args: argparse.Namespace) -> list[Path]:
    """Check the flags, read the run, then rewrite its result files."""
    if args.target_ms is not None and not (math.isfinite(args.target_ms) and args.target_ms > 0):
        raise RunFolderError(f"--target-ms {args.target_ms:g}: must be a finite number > 0")
    if not (math.isfinite(args.latency_time) and args.latency_time > 0):
        raise RunFolderError(f"--latency-time {args.latency_time:g}: must be a finite number "
                             f"> 0")
    connect(args.latency_server, args.latency_token_file)  # the pair and the token, first
    if args.latency_server and not args.remeasure:
        raise RunFolderError("--latency-server measures: add --remeasure")
    study, meta = load_run_study(Path(args.run), args.storage)
    saved = meta.get("settings", {}).get("target_ms")
    target = saved if args.target_ms is None else args.target_ms
    if args.remeasure:
        remeasure(study, meta, args)
    try:
        return list(write_results(study, Path(args.run), target_ms=target).values())
    except OSError as e:
        raise RunFolderError(f"{args.run}: cannot write the results ({e.strerror or e})"
                             ) from None


def remeasure(study: optuna.Study, meta: dict[str, Any], args: argparse.Namespace) -> None:
    """front_latency.csv measured now, as the search measures its front at its end."""
    settings = meta.get("settings") or {}
    missing = [k for k in ("input_size", "device", "threads") if k not in settings]
    if missing:
        raise RunFolderError(f"{Path(args.run) / 'run.json'}: settings lack "
                             f"{', '.join(missing)}; cannot --remeasure")
    remote = connect(args.latency_server, args.latency_token_file)
    check_same_target(settings, remote, otherwise=(
        "run nas.plot --remeasure there, or pass --latency-server on that device"))
    measure = RunLatency(settings, int(meta.get("num_classes") or 10), args.latency_time,
                         remote=remote,
                         calibration=calibration_for(settings),
                         reference_ms=study.user_attrs.get(REFERENCE_ATTR))
    print("measuring the front and the baselines together ...", flush=True)
    remeasure_front(study, Path(args.run), measure.result)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = plot(args)
    except (RunFolderError, BaselinesError, LatencyError, DataError) as e:
        print(f"nas.plot: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    run_module("nas.plot")
