"""A surrogate of the default search space: proxy accuracy and latency predicted for any
architecture, fitted on `results/surrogate_mnasnet.csv` (issue #21, item 1).

    python benchmarks/surrogate.py [--csv benchmarks/results/surrogate_mnasnet.csv] [--folds 5]

prints the held-out quality of each regressor (k-fold: Kendall tau, mean absolute error) and
the analytic multiply-add count against `nas.cost.count_macs`. Features per block: the op
one-hot, kernel, expansion, squeeze-excite ratio, residual layers, repeats, filters, and the
block's multiply-adds at 224x224 counted from the layer shapes `nas.blocks` builds (counting
with torch's FlopCounterMode costs a model build per architecture, too slow for the 10^5
evaluations `sampler_efficiency.py` makes; the printed check shows the two agree up to the
fixed stem and head). The regressors are scikit-learn's gradient boosting: accuracy on the
features, latency on them in log space.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, spearmanr
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.model_selection import KFold

from nas.arch import Architecture
from nas.blocks import layer_configs

CSV = Path(__file__).parent / "results" / "surrogate_mnasnet.csv"
OPS = ("conv", "sepconv", "mbconv")
RESOLUTION = 224


def block_macs(arch: Architecture, resolution: int = RESOLUTION) -> list[float]:
    """Multiply-adds of each block's convolutions and squeeze-excite at `resolution`, from the
    layer shapes `nas.blocks.layer_configs` builds (stem and head left out: the space fixes
    them; batch norm and activations are not multiply-adds)."""
    size = resolution // arch.stem.stride
    layers = iter(layer_configs(arch))
    out = []
    for b in arch.blocks:
        total = 0.0
        for _ in range(b.repeats):
            c = next(layers)
            hw_in, hw = size * size, (size // c.stride) ** 2
            k2 = c.kernel * c.kernel
            if c.op == "conv":
                total += k2 * c.in_channels * c.out_channels * hw
            elif c.op == "sepconv":
                total += (k2 + c.out_channels) * c.in_channels * hw
            else:
                expand = c.in_channels * c.mid_channels * hw_in \
                    if c.mid_channels != c.in_channels else 0
                total += expand + (k2 + c.out_channels) * c.mid_channels * hw
            total += 2 * c.mid_channels * c.se_channels
            size //= c.stride
        out.append(total)
    return out


def features(arch: Architecture) -> np.ndarray:
    row: list[float] = []
    macs = block_macs(arch)
    residual = [c.residual for c in layer_configs(arch)]
    first = 0
    for b, m in zip(arch.blocks, macs, strict=True):
        row += [float(b.op == op) for op in OPS]
        row += [b.kernel, b.expansion, b.se_ratio, sum(residual[first:first + b.repeats]),
                b.repeats, b.filters, np.log(m)]
        first += b.repeats
    row.append(np.log(sum(macs)))
    return np.asarray(row, dtype=float)


def load(csv: Path = CSV) -> tuple[list[Architecture], pd.DataFrame]:
    df = pd.read_csv(csv)
    df = df[df["accuracy"].notna()].reset_index(drop=True)
    return [Architecture.from_json(s) for s in df["arch_dict"]], df


def regressor(seed: int = 0) -> GradientBoostingRegressor:
    # Shallow trees, shrinkage and subsampling: 300 rows and 71 features.
    return GradientBoostingRegressor(n_estimators=400, learning_rate=0.03, max_depth=3,
                                     subsample=0.8, min_samples_leaf=5, random_state=seed)


@dataclasses.dataclass
class Surrogate:
    """Predicted (proxy accuracy, latency in ms) of an architecture."""

    accuracy: GradientBoostingRegressor
    latency: GradientBoostingRegressor | None
    latency_range: tuple[float, float] | None = None

    def predict(self, arch: Architecture) -> tuple[float, float]:
        x = features(arch)[None]
        acc = float(self.accuracy.predict(x)[0])
        lat = float(np.exp(self.latency.predict(x)[0])) if self.latency is not None else \
            float("nan")
        return acc, lat


def fit(csv: Path = CSV, seed: int = 0) -> Surrogate:
    archs, df = load(csv)
    x = np.stack([features(a) for a in archs])
    acc = regressor(seed).fit(x, df["accuracy"].to_numpy())
    lat = None
    if df["latency_ms"].notna().all():
        y = np.log(df["latency_ms"].to_numpy())
        lat = regressor(seed).fit(x, y)
    return Surrogate(acc, lat, None if lat is None else (float(df["latency_ms"].min()),
                                                          float(df["latency_ms"].max())))


def held_out(x: np.ndarray, y: np.ndarray, folds: int, seed: int, log: bool = False) -> dict:
    """k-fold predictions for every row: Kendall tau, Spearman and mean absolute error
    (relative error too when fitted in log space), each over all held-out rows and per fold."""
    pred = np.empty_like(y)
    taus = []
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(x):
        target = np.log(y[train]) if log else y[train]
        p = regressor(seed).fit(x[train], target).predict(x[test])
        pred[test] = np.exp(p) if log else p
        taus.append(kendalltau(y[test], pred[test]).statistic)
    out = {"kendall_tau": kendalltau(y, pred).statistic, "spearman": spearmanr(y, pred).statistic,
           "mae": float(np.mean(np.abs(pred - y))), "tau_per_fold": taus}
    if log:
        out["mean_rel_error"] = float(np.mean(np.abs(pred / y - 1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=CSV)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    archs, df = load(args.csv)
    x = np.stack([features(a) for a in archs])
    counted = df["macs"].to_numpy(dtype=float)
    ours = np.array([sum(block_macs(a)) for a in archs])
    rest = np.unique(np.round(counted - ours))
    print(f"{len(df)} architectures from {args.csv.name}; {args.folds}-fold held-out "
          f"predictions, scikit-learn GradientBoostingRegressor (400 trees of depth 3, "
          f"learning rate 0.03, subsample 0.8)")
    print(f"analytic block multiply-adds vs nas.cost.count_macs: Spearman "
          f"{spearmanr(ours, counted).statistic:.4f}; count_macs minus ours takes "
          f"{len(rest)} values ({', '.join(f'{r / 1e6:.2f}M' for r in rest)}): the fixed stem, "
          f"head and classifier, whose head convolution's input is the last block's width")
    rows = [("proxy accuracy", held_out(x, df["accuracy"].to_numpy(), args.folds, args.seed))]
    if df["latency_ms"].notna().all():
        lat = df["latency_ms"].to_numpy(dtype=float)
        rows.append(("latency (ms)", held_out(x, lat, args.folds, args.seed, log=True)))
        rows.append(("latency from MACs alone", {
            "kendall_tau": kendalltau(lat, counted).statistic,
            "spearman": spearmanr(lat, counted).statistic, "mae": float("nan"),
            "tau_per_fold": []}))
    print()
    print("| target | Kendall tau | per fold | Spearman | MAE | mean relative error |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        folds = " ".join(f"{t:.2f}" for t in r["tau_per_fold"]) or "-"
        rel = f"{100 * r['mean_rel_error']:.1f}%" if "mean_rel_error" in r else "-"
        print(f"| {name} | {r['kendall_tau']:.3f} | {folds} | {r['spearman']:.3f} | "
              f"{r['mae']:.4f} | {rel} |")


if __name__ == "__main__":
    main()
