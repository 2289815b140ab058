"""Interactive plots of a search: plotly only draws the frames that `nas.pareto` computes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nas.files import write_atomic
from nas.pareto import history_frame, pareto_frame, points_frame

_HOVER = "%{hovertext}<extra></extra>"
_BASELINE_SYMBOL = "diamond"
# where a label sits from its point: (x, y) sides, -1 left/below, 0 centred, 1 right/above
_SIDES = {"middle right": (1, 0), "top right": (1, 1), "bottom right": (1, -1),
          "middle left": (-1, 0), "top center": (0, 1), "bottom center": (0, -1)}


def label_positions(x, y, text, *, order=("middle right", "top right", "bottom right",
                                           "middle left"),
                    panel_px=(450, 420), char_px=7.0, line_px=14.0) -> list[str]:
    """A plotly `textposition` per point, so that the labels of nearby points do not overlap
    (plotly places text without looking at other text: two networks 0.2 ms and a point apart
    printed one name over the other in confirm.html). Each label's box is estimated in
    pixels of a panel of `panel_px` spanning the points; points are placed from left to
    right, each at the first position in `order` whose box meets no box placed before, or
    at order[0] if none is free. A point without coordinates gets order[0]."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    names = [str(t) for t in text]
    ok = np.isfinite(xs) & np.isfinite(ys)
    positions = [order[0]] * len(names)
    if not ok.any():
        return positions

    def scaled(v, px):
        lo, hi = v[ok].min(), v[ok].max()
        return (v - lo) / (hi - lo) * px if hi > lo else np.full_like(v, px / 2)

    px, py = scaled(xs, panel_px[0]), scaled(ys, panel_px[1])

    def box(i: int, position: str) -> tuple[float, float, float, float]:
        (sx, sy), w, gap = _SIDES[position], char_px * len(names[i]), 6.0
        left = px[i] + gap if sx > 0 else px[i] - gap - w if sx < 0 else px[i] - w / 2
        low = py[i] + gap if sy > 0 else py[i] - gap - line_px if sy < 0 else py[i] - line_px / 2
        return left, low, left + w, low + line_px

    def meets(a, b) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    placed: list[tuple[float, float, float, float]] = []
    for i in sorted(np.flatnonzero(ok), key=lambda i: (px[i], py[i])):
        free = [p for p in order if not any(meets(box(i, p), b) for b in placed)]
        positions[i] = free[0] if free else order[0]
        placed.append(box(i, positions[i]))
    return positions


def pareto_figure(df: pd.DataFrame, *, target_ms: float | None,
                  measured_in: str = "") -> go.Figure:
    """Accuracy vs latency: all trials, the searched front as a step line, target, baselines."""
    pts = points_frame(df)
    searched = pts[~pts["is_baseline"]]
    front = pareto_frame(df)
    base = pts[pts["is_baseline"]]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        name="trials", x=searched["latency_ms"], y=searched["accuracy"], mode="markers",
        marker={"color": "rgba(90, 110, 140, 0.45)", "size": 7},
        hovertext=[_hover(r) for _, r in searched.iterrows()], hovertemplate=_HOVER))
    # The front as an attainment curve: at any latency, the best accuracy reachable within it,
    # so the line runs flat to the next faster-but-better point and then steps up ("hv").
    fig.add_trace(go.Scatter(
        name="Pareto front", x=front["latency_ms"], y=front["accuracy"], mode="lines+markers",
        line={"shape": "hv", "color": "crimson"}, marker={"color": "crimson", "size": 9},
        error_x=_spread(front), hovertext=[_hover(r) for _, r in front.iterrows()],
        hovertemplate=_HOVER))
    names = [str(n) for n in base.get("baseline", [""] * len(base))]
    fig.add_trace(go.Scatter(
        name="baselines", x=base["latency_ms"], y=base["accuracy"], mode="markers+text",
        text=names, textposition=label_positions(
            base["latency_ms"], base["accuracy"], names,
            order=("top center", "bottom center", "middle right", "middle left"),
            panel_px=(900, 420)),
        marker={"symbol": _BASELINE_SYMBOL, "size": 11, "color": "black"},
        error_x=_spread(base), hovertext=[_hover(r) for _, r in base.iterrows()],
        hovertemplate=_HOVER))
    if target_ms is not None:
        fig.add_vline(x=target_ms, line={"dash": "dash", "color": "gray"},
                      annotation_text=f"target T = {target_ms:g} ms",
                      annotation_position="top right")
    fig.update_layout(title="Accuracy vs latency (error bars: p10-p90 latency)",
                      xaxis_title=f"latency (ms, median{'; ' if measured_in else ''}"
                                  f"{measured_in})", yaxis_title="accuracy (proxy)",
                      hovermode="closest", template="plotly_white")
    return fig


def history_figure(df: pd.DataFrame) -> go.Figure:
    """Reward per trial with the best so far; accuracy and latency panels for two objectives."""
    h = history_frame(df)
    hover = [f"trial {n}<br>{a}" for n, a in zip(h["number"], h["arch"], strict=True)]
    if "value" in h:
        fig = go.Figure()
        fig.add_trace(go.Scatter(name="trial", x=h["number"], y=h["value"], mode="markers",
                                 hovertext=hover, hovertemplate=_HOVER))
        fig.add_trace(go.Scatter(name="best so far", x=h["number"], y=h["best_value"],
                                 mode="lines", line={"shape": "hv"}))
        pts = points_frame(df)
        for _, row in pts[pts["is_baseline"]].iterrows():
            if _finite(row.get("reward")):
                fig.add_hline(y=float(row["reward"]), line={"dash": "dot", "color": "gray"},
                              annotation_text=str(row["baseline"]))
        fig.update_layout(title="Optimisation history", xaxis_title="trial",
                          yaxis_title="reward", template="plotly_white")
        return fig
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for row, (col, label) in enumerate((("accuracy", "accuracy"), ("latency_ms", "latency (ms)")),
                                       start=1):
        fig.add_trace(go.Scatter(name=label, x=h["number"], y=h[col], mode="markers",
                                 hovertext=hover, hovertemplate=_HOVER), row=row, col=1)
        fig.add_trace(go.Scatter(name=f"best {label} so far", x=h["number"], y=h[f"best_{col}"],
                                 mode="lines", line={"shape": "hv"}), row=row, col=1)
        fig.update_yaxes(title_text=label, row=row, col=1)
    fig.update_xaxes(title_text="trial", row=2, col=1)
    fig.update_layout(title="Optimisation history (two objectives)", template="plotly_white")
    return fig


def write_plots(df: pd.DataFrame, out_dir: str | os.PathLike, *,
                target_ms: float | None, measured_in: str = "") -> list[Path]:
    """pareto.html and history.html, each self-contained (plotly.js inlined: works offline).
    `measured_in`: the runtime the latencies come from, for the latency axis."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (("pareto", pareto_figure(df, target_ms=target_ms,
                                               measured_in=measured_in)),
                      ("history", history_figure(df))):
        paths.append(write_atomic(out_dir / f"{name}.html",
                                  fig.to_html(include_plotlyjs=True, full_html=True)))
    return paths


def _hover(row: pd.Series) -> str:
    """Trial (or baseline), architecture string and its measured numbers."""
    who = (f"baseline {row['baseline']}" if row.get("is_baseline") else
           f"trial {int(row['number'])}" if _finite(row.get("number")) else "trial ?")
    lines = [who, str(row.get("arch", "") or "")]
    lines.append(f"accuracy {float(row['accuracy']):.4f}, "
                 f"latency {float(row['latency_ms']):.3g} ms")
    if _finite(row.get("latency_final_ms")):
        lines.append(f"re-measured with the front: {float(row['latency_final_ms']):.3g} ms "
                     f"(p10-p90 {float(row['latency_final_p10_ms']):.3g}-"
                     f"{float(row['latency_final_p90_ms']):.3g})")
    if _finite(row.get("reward")):
        lines.append(f"reward {float(row['reward']):.4f}")
    cost = []
    if _finite(row.get("params")):
        cost.append(f"params {float(row['params']) / 1e6:.3g} M")
    if _finite(row.get("macs")):
        cost.append(f"MACs {float(row['macs']) / 1e6:.4g} M")
    if cost:
        lines.append(", ".join(cost))
    return "<br>".join(lines)


def _spread(pts: pd.DataFrame) -> dict[str, Any] | None:
    """p10-p90 latency as asymmetric error bars, where the search recorded them."""
    if not len(pts) or not {"latency_p10_ms", "latency_p90_ms"} <= set(pts.columns):
        return None
    lat = pts["latency_ms"].astype(float).to_numpy()
    hi = pd.to_numeric(pts["latency_p90_ms"], errors="coerce").to_numpy(dtype=float) - lat
    lo = lat - pd.to_numeric(pts["latency_p10_ms"], errors="coerce").to_numpy(dtype=float)
    if not (np.isfinite(hi).any() or np.isfinite(lo).any()):
        return None
    return {"type": "data", "symmetric": False, "array": np.nan_to_num(hi).clip(0),
            "arrayminus": np.nan_to_num(lo).clip(0), "thickness": 1, "width": 0}


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
