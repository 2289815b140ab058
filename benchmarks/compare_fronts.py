"""How do two searches' answers differ? Fronts, best architectures and their operators side by side.

    python benchmarks/compare_fronts.py runs/eager runs/onnxruntime [--out T.txt]

For each run folder (as nas.search writes it): its runtime and target, the Pareto front (latency,
accuracy, multiply-adds, block operators), the best-reward trial, and over all completed trials
the share of each block operator (conv / sep / mb) weighted by repeats, for the front and for the
whole run. Used to see what measuring latency in another runtime changes in what a search picks.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import pandas as pd

from nas.arch import Architecture
from nas.files import save_table


def operators(arch_dict: str) -> collections.Counter:
    """Layers per operator (conv, sep, mbN), counting repeats."""
    arch = Architecture.from_dict(json.loads(arch_dict))
    counts: collections.Counter = collections.Counter()
    for b in arch.blocks:
        counts[b.to_str().split("_")[0]] += b.repeats
    return counts


def shares(rows: pd.DataFrame) -> str:
    total: collections.Counter = collections.Counter()
    for a in rows.arch_dict:
        total += operators(a)
    n = sum(total.values()) or 1
    return ", ".join(f"{op} {100 * c / n:.0f}%" for op, c in total.most_common())


def describe(run: Path) -> list[str]:
    meta = json.loads((run / "run.json").read_text())
    s = meta["settings"]
    trials = pd.read_csv(run / "trials.csv")
    done = trials[trials.state == "COMPLETE"]
    front = pd.read_csv(run / "pareto.csv").sort_values("latency_ms")
    best = done.loc[done.reward.idxmax()]
    lines = [f"## {run.name}: runtime {s.get('runtime', 'eager')} {s.get('precision', 'fp32')}, "
             f"T = {s['target_ms']} ms, {len(done)} complete of {len(trials)} trials",
             f"{'trial':>5} {'lat ms':>7} {'acc':>6} {'reward':>7} {'MACs M':>7}  arch"]
    for _, r in front.iterrows():
        lines.append(f"{int(r.number):>5} {r.latency_ms:>7.2f} {r.accuracy:>6.3f} "
                     f"{r.reward:>7.4f} {r.macs / 1e6:>7.1f}  {r.arch}")
    lines += [f"best reward: trial {int(best.number)}, {best.latency_ms:.2f} ms, accuracy "
              f"{best.accuracy:.3f}, {best.macs / 1e6:.1f} M MACs: {best.arch}",
              f"operators (layers, repeats counted): front {shares(front)}; all trials "
              f"{shares(done)}",
              f"median MACs: front {front.macs.median() / 1e6:.1f} M, "
              f"all {done.macs.median() / 1e6:.1f} M"]
    base = run / "baselines.csv"
    if base.exists():
        b = pd.read_csv(base)
        lines.append("baselines: " + "; ".join(
            f"{r.baseline} {r.latency_ms:.2f} ms / {r.accuracy:.3f} / {r.reward:.4f}"
            for _, r in b.iterrows() if r.state == "COMPLETE"))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    lines: list[str] = []
    for run in args.runs:
        lines += [*describe(run), ""]
    text = "\n".join(lines)
    save_table(text, args.out)  # prints it; writes it with --out


if __name__ == "__main__":
    main()
