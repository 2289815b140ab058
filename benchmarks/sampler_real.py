"""Does the surrogate's verdict on samplers hold in a real search? (issue #21, item 4)

    python benchmarks/sampler_real.py --data ../shared/datasets/cifar10-jpg.tar.gz \\
        --samplers evolution,random --seeds 0 --trials 40 --target-ms 9.6 \\
        [--runs-dir runs] [--out benchmarks/results/sampler_real_zen4.txt]

Runs one `nas.search` per sampler and seed (run folder `sampler_<sampler>_s<seed>`, so the
same command resumes them), one after another with every core each, and prints per search
the best reward after 10, 20, 30 and `--trials` trials, how many trials it took to reach the
last sampler's best at `--trials` (random's, as listed last), and its best architecture. The
histories (`trials.csv`) and fronts (`pareto.csv`) are copied beside the table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from nas.files import save_table


def run_name(sampler: str, seed: int) -> str:
    return f"sampler_{sampler}_s{seed}"


def best_curve(trials: pd.DataFrame, n: int) -> np.ndarray:
    """Best reward after each of the first `n` trials (a trial without one scores nothing)."""
    rows = trials[trials["baseline"].isna() | (trials["baseline"] == "")] \
        if "baseline" in trials else trials
    values = rows.sort_values("number")["reward"].to_numpy(dtype=float)[:n]
    values = np.where(np.isfinite(values), values, -np.inf)
    return np.maximum.accumulate(values)


def summarise(curves: dict[tuple[str, int], np.ndarray], bests: dict[tuple[str, int], str],
              trials: int, bar_sampler: str) -> str:
    marks = [m for m in (10, 20, 30) if m < trials] + [trials]
    bars = {seed: c[-1] for (s, seed), c in curves.items() if s == bar_sampler}
    lines = ["| sampler | seed | " + " | ".join(f"best @{m}" for m in marks)
             + f" | trials to {bar_sampler}'s best @{trials} | best architecture |",
             "|---" * (len(marks) + 4) + "|"]
    for (s, seed), c in curves.items():
        reach = np.flatnonzero(c >= bars.get(seed, np.inf))
        shown = str(reach[0] + 1) if len(reach) else f">{len(c)}"
        lines.append(f"| {s} | {seed} | " + " | ".join(
            f"{c[m - 1]:.4f}" if len(c) >= m else "-" for m in marks)
            + f" | {shown} | {bests[(s, seed)]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--samplers", default="evolution,random",
                   help="comma-separated; the last is the bar the others are held to")
    p.add_argument("--seeds", default="0", help="comma-separated")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--target-ms", type=float, required=True)
    p.add_argument("--mode", default="soft")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--search-flags", default="", help="more nas.search flags, one string")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sampler_real.txt"))
    a = p.parse_args(argv)
    samplers = a.samplers.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    curves, bests, commands = {}, {}, []
    for seed in seeds:
        for sampler in samplers:
            name = run_name(sampler, seed)
            cmd = [sys.executable, "-m", "nas.search", "--data", a.data, "--target-ms",
                   str(a.target_ms), "--mode", a.mode, "--trials", str(a.trials), "--sampler",
                   sampler, "--seed", str(seed), "--runs-dir", str(a.runs_dir), "--name", name,
                   *a.search_flags.split()]
            commands.append(" ".join(cmd[1:]))
            rc = subprocess.call(cmd)
            if rc != 0:
                print(f"sampler_real: {name} exited {rc}", file=sys.stderr)
                return rc
            run = a.runs_dir / name
            trials = pd.read_csv(run / "trials.csv")
            curves[(sampler, seed)] = best_curve(trials, a.trials)
            top = trials.loc[trials["reward"].idxmax()]
            bests[(sampler, seed)] = (f"trial {int(top['number'])}: {top['arch']} "
                                      f"({top['latency_ms']:.2f} ms, acc {top['accuracy']:.4f})")
            keep = a.out.parent / a.out.stem
            keep.mkdir(parents=True, exist_ok=True)
            for f in ("trials.csv", "pareto.csv"):
                shutil.copyfile(run / f, keep / f"{name}_{f}")
    head = [f"# sampler_real: {', '.join(samplers)} x seeds {a.seeds}, {a.trials} trials, "
            f"--mode {a.mode} --target-ms {a.target_ms}", *[f"# {c}" for c in commands], ""]
    save_table("\n".join(head) + summarise(curves, bests, a.trials, samplers[-1]), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
