"""Regenerate a run's result files and plots from its storage.

    python -m nas.plot runs/search
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nas.export import ExportError, load_run_study
from nas.results import write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nas.plot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder, e.g. runs/search")
    p.add_argument("--storage", default=None, help="Optuna storage URL if not the run's own")
    p.add_argument("--target-ms", type=float, default=None,
                   help="target line in the Pareto plot (default: the run's --target-ms)")
    args = p.parse_args(argv)
    try:
        study, meta = load_run_study(Path(args.run), args.storage)
    except ExportError as e:
        print(f"nas.plot: error: {e}", file=sys.stderr)
        return 2
    target = args.target_ms or meta.get("settings", {}).get("target_ms")
    files = write_results(study, Path(args.run), target_ms=target)
    print("\n".join(str(f) for f in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
