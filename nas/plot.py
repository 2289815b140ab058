"""Regenerate a run's result files and plots from its storage.

    python -m nas.plot runs/search
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from nas.cli import HelpFormatter, Parser
from nas.interrupts import run_tool
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
    return p


def plot(args: argparse.Namespace) -> list[Path]:
    """Check the flags, read the run, then rewrite its result files."""
    if args.target_ms is not None and not (math.isfinite(args.target_ms) and args.target_ms > 0):
        raise RunFolderError(f"--target-ms {args.target_ms:g}: must be a finite number > 0")
    study, meta = load_run_study(Path(args.run), args.storage)
    saved = meta.get("settings", {}).get("target_ms")
    target = saved if args.target_ms is None else args.target_ms
    try:
        return list(write_results(study, Path(args.run), target_ms=target).values())
    except OSError as e:
        raise RunFolderError(f"{args.run}: cannot write the results ({e.strerror or e})"
                             ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = plot(args)
    except (RunFolderError, BaselinesError) as e:
        print(f"nas.plot: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    run_tool(main, "nas.plot")
