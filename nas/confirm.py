"""Confirm a search's answer the way MnasNet ends its search: train the top candidates and the
baselines fully, re-measure their latency together, and compare them at equal latency.

    python -m nas.confirm runs/search --top 3 --epochs 20 --seeds 2 --match-latency

Writes, beside the run's files: confirm.csv (one row per network: latency, proxy accuracy, test
accuracy per seed and mean +- sd, parameters, multiply-adds), confirm.html (confirmed accuracy
against latency with the baselines; proxy against confirmed accuracy with Kendall tau) and
confirmed.yaml (the candidate with the best confirmed reward; `nas.export --confirmed` picks it).
Trainings are nas.train's recipe on the network form the proxy ranked, each in its own folder
under confirm/, resumed after Ctrl-C or SIGTERM by the same command; a second call trains only
what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from scipy.stats import kendalltau, ttest_ind

from nas.arch import ArchError, Architecture, load_architecture, save_architecture
from nas.cli import MAX_SEED, HelpFormatter, Parser, oserror_line
from nas.cost import count_macs, count_params
from nas.data import DataError, DataSplits, load_data
from nas.figures import label_positions
from nas.files import write_atomic
from nas.host import is_out_of_memory
from nas.interleaved import REFERENCE_ATTR
from nas.interrupts import run_module
from nas.latency import LatencyError
from nas.latency_client import connect
from nas.model import TooLargeError, build_model
from nas.pareto import pareto_frame, trials_frame
from nas.proxy import CandidateFailed
from nas.remeasure import RunLatency, calibration_for, check_same_target
from nas.results import BaselinesError, load_baselines
from nas.reward import reward
from nas.run_folder import (
    CONFIRM_CSV,
    CONFIRM_DIR,
    CONFIRM_HTML,
    CONFIRMED_YAML,
    RunFolderError,
    load_run_study,
)
from nas.train import TrainConfig, train
from nas.width_match import match_width

LATENCY_FILE = "latency.json"  # under confirm/: the one sitting's measurements
MATCHES_FILE = "matches.json"  # under confirm/: the width each family matched each candidate at


class ConfirmError(ValueError):
    """A bad flag or run folder: one line, exit 2, nothing written."""


@dataclasses.dataclass(frozen=True)
class ConfirmConfig:
    run: Path
    top: int = 3
    epochs: int = 20
    seeds: int = 2
    baselines: tuple[str, ...] | None = None  # None: the run's own (baselines.csv)
    match_latency: bool = False
    latency: bool = True  # False: --no-latency, the latencies (and matches) kept in the run
    latency_time: float = 2.0
    latency_server: str | None = None  # measure on that device (nas.latency serve)
    latency_token_file: str | None = None
    data: str | None = None  # None: the run's
    device: str = "cpu"
    batch_size: int = 128
    lr: float = 0.1
    clip_grad: float | None = TrainConfig.clip_grad  # nas.train --clip-grad; None: unclipped
    storage: str | None = None
    progress: bool = True


@dataclasses.dataclass
class Network:
    """One network to confirm: a searched candidate, a baseline or a width-matched baseline."""

    name: str
    kind: str  # candidate | baseline | matched
    arch: Architecture
    trial: int | None = None
    proxy_accuracy: float = math.nan
    latency_ms: float = math.nan  # the run's own measurement until re-measured
    latency_cv: float = math.nan
    matched_to: str = ""  # for a matched baseline: the candidate and how close it got


# --------------------------------------------------------------------------- what to confirm


def candidates(study, settings: dict[str, Any], top: int) -> list[Network]:
    """The top `top` searched trials by reward; with --objective pareto, the front members
    nearest T. A baseline enqueued as a trial is no candidate: it is confirmed as the baseline
    it is (with it, an outcome run at mobilenet_v3_large's latency confirmed the baseline against
    itself)."""
    df = trials_frame(study)
    if "enqueued_baseline" in df:
        df = df[df.enqueued_baseline.isna()]
    done = df[df.state == "COMPLETE"] if len(df) else df
    if not len(done):
        raise ConfirmError("the run has no completed trial yet (enqueued baselines aside): "
                           "nothing to confirm")
    if settings.get("objective") == "pareto":
        front = pareto_frame(df)
        gap = (pd.to_numeric(front.latency_ms) - settings["target_ms"]).abs()
        chosen = front.assign(gap=gap).sort_values(["gap", "number"]).head(top)
    else:
        chosen = done.sort_values(["reward", "number"], ascending=[False, True]).head(top)
    nets = []
    for _, row in chosen.iterrows():
        value = row["arch_dict"]
        arch = Architecture.from_dict(json.loads(value) if isinstance(value, str) else value)
        nets.append(Network(f"trial-{int(row['number'])}", "candidate", arch,
                            trial=int(row["number"]), proxy_accuracy=float(row["accuracy"]),
                            latency_ms=float(row["latency_ms"]),
                            latency_cv=float(row.get("latency_cv", math.nan))))
    return nets


def baselines(run: Path, names: tuple[str, ...] | None) -> list[Network]:
    """--baselines, or the run's own, with their proxy accuracy where the run measured it."""
    table = load_baselines(run)
    known = {r["baseline"]: r for r in table.to_dict("records")} if len(table) else {}
    if names is None:
        names = tuple(known)
    nets = []
    for name in names:
        row = known.get(name, {})
        nets.append(Network(name, "baseline", load_architecture(name),
                            proxy_accuracy=float(row.get("accuracy", math.nan)),
                            latency_ms=float(row.get("latency_ms", math.nan)),
                            latency_cv=float(row.get("latency_cv", math.nan))))
    return nets


# --------------------------------------------------------------------------- latency


def measure_all(nets: list[Network], measure: RunLatency | None, folder: Path) -> None:
    """Every network's latency in one sitting, kept in confirm/latency.json: measured again,
    all together, only when a network is new to it. With no `measure` (--no-latency, a
    confirmation carried to another machine) the kept sitting's, where it has the network."""
    path = folder / LATENCY_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    if measure is not None and any(n.arch.to_str() not in saved.get("ms", {}) for n in nets):
        print(f"measuring the latency of {len(nets)} networks in one sitting ...", flush=True)
        saved = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "ms": {}, "cv": {}}
        for n in nets:
            saved["ms"][n.arch.to_str()], saved["cv"][n.arch.to_str()] = measure(n.arch)
        write_atomic(path, json.dumps(saved, indent=1))
    for n in nets:
        if n.arch.to_str() in saved.get("ms", {}):
            n.latency_ms, n.latency_cv = saved["ms"][n.arch.to_str()], saved["cv"][n.arch.to_str()]


def kept_matches(folder: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{family: {candidate: {mult, latency_ms, gap, arch}}} from confirm/matches.json, or for a
    confirmation from before that file, the matched rows of its confirm.csv (without `arch`)."""
    path = folder / MATCHES_FILE
    if path.exists():
        try:
            kept = json.loads(path.read_text())
            if not isinstance(kept, dict):
                raise ValueError("not an object")
            return kept
        except ValueError as e:
            raise ConfirmError(f"{path}: unreadable ({e}); delete it to match the widths "
                               f"again") from None
    table_path = folder.parent / CONFIRM_CSV
    if not table_path.exists():
        return {}
    kept: dict[str, dict[str, dict[str, Any]]] = {}
    rows = pd.read_csv(table_path)
    for _, row in rows[rows.kind == "matched"].iterrows():
        spec, _, mult = str(row.network).partition("@")
        for cand, gap in re.findall(r"(\S+) \(([+-]?[\d.]+)%\)", str(row.matched_to)):
            kept.setdefault(spec, {})[cand] = {"mult": float(mult), "gap": float(gap) / 100}
    return kept


def matched_baselines(families: list[Network], nets: list[Network],
                      measure: RunLatency | None, folder: Path) -> list[Network]:
    """For each baseline family and each candidate, the width multiplier (multiples of 0.05)
    whose latency on this target is nearest the candidate's. Kept in confirm/matches.json: a
    resumed confirmation keeps its matches (matching again picks a neighbouring width as often
    as not, and trains it) and matches only new pairs, or a candidate whose network changed.
    With no `measure` (--no-latency, on another machine) every pair must have been kept."""
    kept = kept_matches(folder)
    out: dict[str, Network] = {}
    for fam in families:
        spec = fam.name.split("@")[0]
        for cand in (n for n in nets if n.kind == "candidate"):
            old = kept.get(spec, {}).get(cand.name)
            if old is not None and old.get("arch", cand.arch.to_str()) == cand.arch.to_str():
                print(f"{spec}: x{old['mult']:g} matched to {cand.name} before "
                      f"({old['gap']:+.1%}), kept", flush=True)
            elif measure is None:
                raise ConfirmError(f"--match-latency --no-latency: {folder / MATCHES_FILE} "
                                   f"has no match of {spec} for {cand.name}; match the widths "
                                   f"on the machine the run measured latency on")
            else:
                m = match_width(spec, cand.latency_ms,
                                lambda s: measure(load_architecture(s))[0])
                old = {"mult": m.mult, "latency_ms": m.latency_ms, "gap": m.gap,
                       "arch": cand.arch.to_str()}
                kept.setdefault(spec, {})[cand.name] = old
                write_atomic(folder / MATCHES_FILE, json.dumps(kept, indent=1))
                print(f"{spec}: x{m.mult:g} runs at {m.latency_ms:.2f} ms, nearest "
                      f"{cand.name}'s {cand.latency_ms:.2f} ms ({m.gap:+.1%})", flush=True)
            spec_at, how = f"{spec}@{old['mult']:g}", f"{cand.name} ({old['gap']:+.1%})"
            if spec_at in out:
                out[spec_at].matched_to += f", {how}"
            else:
                out[spec_at] = Network(spec_at, "matched", load_architecture(spec_at),
                                       latency_ms=old.get("latency_ms", math.nan),
                                       matched_to=how)
    return list(out.values())


# --------------------------------------------------------------------------- training


def training_order(nets: list[Network], cands: list[Network], seeds: int
                   ) -> list[tuple[Network, int]]:
    """(network, seed) in the order that answers the question soonest: each candidate with the
    baselines matched to it, seed by seed (the top candidate first), then the baselines at
    their published width. The top candidate and every baseline get every seed, the other
    candidates one; a confirmation stopped for time has the top candidate's verdict first.
    Within a candidate's group the family with the best proxy accuracy trains first: the
    candidate must beat every baseline, so the likeliest to beat it answers soonest."""
    def n_seeds(net: Network) -> int:
        return seeds if (net.kind != "candidate" or net is cands[0]) else 1

    proxy = {n.name: n.proxy_accuracy for n in nets if n.kind == "baseline"}

    def strongest_first(net: Network) -> float:
        acc = proxy.get(net.name.split("@")[0], math.nan)
        return -acc if not math.isnan(acc) else math.inf

    order: list[tuple[Network, int]] = []
    placed: set[str] = set()
    for cand in cands:
        group = [cand] + sorted((n for n in nets if n.kind == "matched" and n.name not in placed
                                 and f"{cand.name} (" in n.matched_to), key=strongest_first)
        placed.update(n.name for n in group)
        order += [(n, s) for s in range(seeds) for n in group if s < n_seeds(n)]
    rest = [n for n in nets if n.name not in placed]
    order += [(n, s) for n in rest for s in range(n_seeds(n))]
    return order


def training_name(name: str) -> str:
    """A baseline matched at width 1 (`mobilenet_v3_small@1`) is the baseline itself: one
    training, under the baseline's name."""
    return re.sub(r"@1(\.0*)?$", "", name)


def train_folder(run: Path, net: Network, cfg: TrainConfig) -> Path:
    """confirm/<network>/<recipe>/seed<s>: another recipe is another experiment, not a resume."""
    recipe = f"e{cfg.epochs}-b{cfg.batch_size}-lr{cfg.lr:g}-fm{cfg.final_map}"
    if cfg.clip_grad is not None:  # unclipped folders keep their names
        recipe += f"-clip{cfg.clip_grad:g}"
    return run / CONFIRM_DIR / training_name(net.name) / recipe / f"seed{cfg.seed}"


def finished_seeds(run: Path, net: Network, cfg: TrainConfig) -> dict[int, dict[str, Any]]:
    """Every finished training of `net` in this recipe's folder, by seed: also those an
    earlier call trained later in its order, or beyond this call's --seeds, or that
    `nas.train --runs-dir <folder> --name seed<s>` added (the v3-large confirmation's second
    candidate got its second seed so: search_outcome_v3large_adamw)."""
    recipe = train_folder(run, net, dataclasses.replace(cfg, seed=0)).parent
    found: dict[int, dict[str, Any]] = {}
    for path in recipe.glob("seed*/metrics.json"):
        if m := re.fullmatch(r"seed(\d+)", path.parent.name):
            found[int(m.group(1))] = json.loads(path.read_text())
    return found


def train_one(net: Network, folder: Path, cfg: TrainConfig, data: DataSplits,
              config: ConfirmConfig) -> dict[str, Any]:
    """metrics.json of a finished training (trained now unless it is there); a training that
    fails records its reason in failed.json, which the next call retries."""
    done, failed = folder / "metrics.json", folder / "failed.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    print(f"training {net.name} (seed {cfg.seed}, {cfg.epochs} epochs) in {folder}", flush=True)
    try:
        metrics = train(net.arch, folder, cfg, data=data, device=config.device,
                        progress=config.progress)
    except (CandidateFailed, TooLargeError, ArchError) as e:
        return _failed(failed, str(e))
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        return _failed(failed, "out of memory")
    metrics["seconds"] = sum(h["seconds"] for h in metrics["history"])
    write_atomic(done, json.dumps(metrics, indent=2))
    return metrics


def _failed(path: Path, reason: str) -> dict[str, Any]:
    print(f"  failed: {reason}", flush=True)
    write_atomic(path, json.dumps({"fail_reason": reason}))
    return {"fail_reason": reason}


# --------------------------------------------------------------------------- results


def table(nets: list[Network], results: dict[str, dict[int, dict]], settings: dict[str, Any],
          data: DataSplits, cfg: TrainConfig) -> pd.DataFrame:
    """One row per network; `results` holds each network's trainings by seed."""
    rows = []
    alpha, beta, target = settings["alpha"], settings["beta"], settings["target_ms"]
    for n in nets:
        by_seed = dict(sorted(results.get(n.name, {}).items()))
        runs = list(by_seed.values())
        accs = {seed: r.get("test_accuracy") for seed, r in by_seed.items()}
        ok = [a for a in accs.values() if a is not None]
        model = build_model(n.arch, num_classes=data.num_classes)
        row = {"network": n.name, "kind": n.kind, "trial": n.trial, "arch": n.arch.to_str(),
               "latency_ms": n.latency_ms, "latency_cv": n.latency_cv,
               "proxy_accuracy": n.proxy_accuracy,
               **{f"test_accuracy_seed{seed}": a for seed, a in accs.items()},
               "seeds": len(ok),
               "test_accuracy_mean": sum(ok) / len(ok) if ok else math.nan,
               "test_accuracy_sd": pd.Series(ok).std() if len(ok) > 1 else math.nan,
               "params": count_params(model),
               "macs": count_macs(model, settings["input_size"]),
               "epochs": cfg.epochs, "clip_grad": cfg.clip_grad or 0.0,  # 0: unclipped
               "seconds": sum(r.get("seconds", 0) for r in runs),
               "matched_to": n.matched_to,
               "fail_reason": "; ".join(r["fail_reason"] for r in runs if "fail_reason" in r)}
        row["reward"] = (reward(row["test_accuracy_mean"], n.latency_ms, target, alpha=alpha,
                                beta=beta) if ok and math.isfinite(n.latency_ms) else math.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    best = df[df.kind == "candidate"].reward.astype(float)
    df["confirmed_best"] = False
    if best.notna().any():
        df.loc[best.idxmax(), "confirmed_best"] = True
    return df


def verdict(df: pd.DataFrame) -> str | None:
    """Each trained candidate against the baselines matched to its latency (--match-latency),
    from the table: the test accuracy of both sides, the difference in points and the latency
    gap of the sitting, with Welch's t-test where both sides have 2 or more seeds. None
    without a trained matched pair."""
    def seeds(row: pd.Series) -> list[float]:
        return [float(row[c]) for c in row.index
                if c.startswith("test_accuracy_seed") and pd.notna(row[c])]

    def side(row: pd.Series) -> str:
        n = len(seeds(row))
        sd = f" +- {row.test_accuracy_sd:.2%}" if n > 1 else ""
        return f"{row.test_accuracy_mean:.2%}{sd}, {n} seed{'s' if n > 1 else ''}"

    trained = df[df.seeds > 0]
    matched = trained[trained.kind == "matched"]
    lines, unspread = [], False
    for _, c in trained[trained.kind == "candidate"].iterrows():
        pairs = [m for _, m in matched.iterrows()
                 if c.network in re.findall(r"(\S+) \(", str(m.matched_to))]
        if not pairs:
            continue
        ahead = sum(c.test_accuracy_mean > m.test_accuracy_mean for m in pairs)
        lines.append(f"  {c.network} ({c.latency_ms:.2f} ms; {side(c)}): above {ahead} of "
                     f"the {len(pairs)} matched to it")
        for m in pairs:
            diff = 100 * (c.test_accuracy_mean - m.test_accuracy_mean)
            text = (f"    {m.network} ({m.latency_ms:.2f} ms, "
                    f"{m.latency_ms / c.latency_ms - 1:+.1%}; {side(m)}): "
                    f"{c.network} {diff:+.2f} points")
            a, b = seeds(c), seeds(m)
            if len(a) > 1 and len(b) > 1:
                text += f", Welch's t-test p = {ttest_ind(a, b, equal_var=False).pvalue:.2f}"
            else:
                unspread = True
            lines.append(text)
    if not lines:
        return None
    text = "\n".join(["At equal latency (baselines matched by width), test accuracy:", *lines])
    if unspread:
        text += ("\nA side with one seed has no spread to weigh a difference against: --seeds 2 "
                 "trains a second for the top candidate and its matches (the same command "
                 "trains only what is missing).")
    return text


def figure(df: pd.DataFrame, *, target_ms: float, runtime: str) -> go.Figure:
    done = df[df.seeds > 0]
    both = done[done.proxy_accuracy.notna()]
    tau = (kendalltau(both.proxy_accuracy, both.test_accuracy_mean).statistic
           if len(both) >= 3 else math.nan)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"confirmed accuracy against latency ({runtime})",
        f"proxy against confirmed accuracy (Kendall tau {tau:.2f}, {len(both)} networks)"))
    # placed over all kinds at once, so a candidate's label dodges its matched baseline's
    at = {panel: pd.Series(label_positions(done[x], done.test_accuracy_mean, done.network),
                           index=done.index, dtype=object)
          for panel, x in ((1, "latency_ms"), (2, "proxy_accuracy"))}
    for kind, symbol, color in (("candidate", "circle", "crimson"),
                                ("baseline", "square", "black"),
                                ("matched", "diamond", "royalblue")):
        part = done[done.kind == kind]
        if not len(part):
            continue
        marker = {"symbol": symbol, "size": 10, "color": color}
        fig.add_trace(go.Scatter(
            x=part.latency_ms, y=part.test_accuracy_mean, mode="markers+text", name=kind,
            text=part.network, textposition=list(at[1][part.index]), marker=marker,
            legendgroup=kind, cliponaxis=False,  # a label near the right edge is drawn whole
            error_y={"type": "data", "array": part.test_accuracy_sd.fillna(0)}), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=part.proxy_accuracy, y=part.test_accuracy_mean, mode="markers+text", name=kind,
            text=part.network, textposition=list(at[2][part.index]), marker=marker,
            legendgroup=kind, cliponaxis=False, showlegend=False), row=1, col=2)
    fig.add_vline(x=target_ms, line_dash="dash", annotation_text=f"T = {target_ms:g} ms",
                  row=1, col=1)
    fig.update_xaxes(title_text="latency (ms)", row=1, col=1)
    fig.update_xaxes(title_text="proxy accuracy", row=1, col=2)
    fig.update_yaxes(title_text="test accuracy (mean, +- sd over seeds)", row=1, col=1)
    fig.update_yaxes(title_text="test accuracy", row=1, col=2)
    epochs = int(done.epochs.max()) if len(done) else 0
    fig.update_layout(title=f"nas.confirm: {epochs} epoch{'' if epochs == 1 else 's'}",
                      height=560)
    return fig


def write_outputs(run: Path, df: pd.DataFrame, nets: list[Network], settings: dict[str, Any],
                  meta: dict[str, Any]) -> list[Path]:
    paths = [write_atomic(run / CONFIRM_CSV, df.to_csv(index=False)),
             write_atomic(run / CONFIRM_HTML, figure(
                 df, target_ms=settings["target_ms"],
                 runtime=settings.get("runtime", "eager")).to_html(include_plotlyjs=True))]
    best = df[df.confirmed_best]
    if len(best):
        net = next(n for n in nets if n.name == best.network.iloc[0])
        name = f"{meta.get('study_name', run.name)}-trial-{net.trial}"
        paths.append(save_architecture(dataclasses.replace(net.arch, name=name),
                                       run / CONFIRMED_YAML))
    return paths


# --------------------------------------------------------------------------- the command


def confirm(config: ConfirmConfig) -> pd.DataFrame:
    """Everything that can fail on input is checked before the first file is written."""
    study, meta = load_run_study(config.run, config.storage)
    settings = meta.get("settings") or {}
    missing = [k for k in ("target_ms", "alpha", "beta", "input_size", "device", "threads")
               if k not in settings]
    if missing:
        raise ConfirmError(f"{config.run / 'run.json'}: settings lack {', '.join(missing)}")
    cands = candidates(study, settings, config.top)
    bases = baselines(config.run, config.baselines)
    if config.match_latency and not bases:
        raise ConfirmError("--match-latency: no baseline to match (the run has none; name "
                           "some with --baselines)")
    remote = connect(config.latency_server, config.latency_token_file)
    if config.latency:
        check_same_target(settings, remote, otherwise=(
            "run nas.confirm there, pass --latency-server on that device, or --no-latency to "
            "use the run's own measurements"))
    data = load_data(config.data or settings.get("data"), val_size=0)
    if meta.get("classes") and list(data.classes) != list(meta["classes"]):
        raise ConfirmError(f"--data {config.data or settings.get('data')}: classes "
                           f"{list(data.classes)[:5]} are not the run's {meta['classes'][:5]}")
    if config.batch_size > len(data.full_train):
        raise ConfirmError(f"--batch-size {config.batch_size}: must be <= the "
                           f"{len(data.full_train)} training images")
    final_map = (settings.get("budget") or {}).get("final_map", 1)
    nets = cands + bases
    folder = config.run / CONFIRM_DIR
    # On the study's yardstick (the reference latency it kept), as nas.plot --remeasure: a
    # sitting calibrated anew put every network 26% above the search's own numbers (a slow
    # spell of the VM), and the rewards against T with them. --no-latency measures nothing
    # and writes nothing here: a pair with no kept match fails before the first file.
    measure = (RunLatency(settings, data.num_classes, config.latency_time, remote,
                          calibration_for(settings, data),
                          reference_ms=study.user_attrs.get(REFERENCE_ATTR))
               if config.latency else None)
    if measure is not None:
        folder.mkdir(exist_ok=True)
    measure_all(nets, measure, folder)
    if config.match_latency:
        nets += [m for m in matched_baselines(bases, nets, measure, folder)
                 if m.name not in {n.name for n in nets}]
        measure_all(nets, measure, folder)
    results: dict[str, dict[int, dict]] = {}
    cfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                      final_map=final_map, clip_grad=config.clip_grad or None)
    try:
        for net, seed in training_order(nets, cands, config.seeds):
            c = dataclasses.replace(cfg, seed=seed)
            results.setdefault(net.name, {})[seed] = train_one(
                net, train_folder(config.run, net, c), c, data, config)
    finally:  # after an interrupt too: every finished training is in the table
        for net in nets:
            results.setdefault(net.name, {}).update(
                (seed, m) for seed, m in finished_seeds(config.run, net, cfg).items()
                if seed not in results[net.name])
        df = table(nets, results, settings, data, cfg)
        write_outputs(config.run, df, nets, settings, meta)
    return df


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="nas.confirm", description=__doc__.split("\n\n")[0],
               formatter_class=HelpFormatter)
    p.add_argument("run", type=Path, help="run folder, e.g. runs/search")
    p.add_argument("--top", type=int, default=3,
                   help="candidates to confirm: the best by reward (with --objective pareto, "
                        "the front members nearest T)")
    p.add_argument("--epochs", type=int, default=20, help="full-training epochs (nas.train)")
    p.add_argument("--seeds", type=int, default=2,
                   help="seeds to train for the top candidate and every baseline (the "
                        "others: one); seeds already trained beyond these are reported too")
    p.add_argument("--baselines", default=None,
                   help="comma-separated reference networks, NAME or NAME@m (default: the "
                        "run's --baselines)")
    p.add_argument("--match-latency", action="store_true",
                   help="also train each baseline family at the width multiplier (multiples "
                        "of 0.05) whose latency is nearest each candidate's")
    p.add_argument("--no-latency", dest="latency", action="store_false",
                   help="measure nothing: the latencies of the sitting kept in "
                        "confirm/latency.json, else the run's own, and with --match-latency "
                        "the widths kept in confirm/matches.json (a confirmation carried to "
                        "another machine to train)")
    p.add_argument("--latency-time", type=float, default=2.0,
                   help="seconds of measuring per network")
    p.add_argument("--latency-server", default=None, metavar="URL",
                   help="re-measure on the device a `nas.latency serve` runs on (the run's "
                        "latency device), training here")
    p.add_argument("--latency-token-file", default=None,
                   help="the server's shared token (with --latency-server)")
    p.add_argument("--data", default=None, help="training data (default: the run's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="training device")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    p.add_argument("--clip-grad", type=float, default=TrainConfig.clip_grad, metavar="NORM",
                   help="clip each step's gradient norm to NORM (nas.train --clip-grad); 0: no "
                        "clipping, the recipe of confirmations begun before 2026-12-06")
    p.add_argument("--storage", default=None, help="Optuna storage URL if not the run's own")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no per-step progress bar")
    return p


def config_from_argv(argv: list[str] | None = None) -> ConfirmConfig:
    args = build_parser().parse_args(argv)
    values = vars(args)
    if args.baselines is not None:
        values["baselines"] = tuple(n.strip() for n in args.baselines.split(",") if n.strip())
    if args.clip_grad == 0:
        values["clip_grad"] = None
    config = ConfirmConfig(**values)
    check(config)
    return config


def check(c: ConfirmConfig) -> None:
    for flag in ("top", "epochs", "seeds", "batch_size"):
        if getattr(c, flag) < 1:
            raise ConfirmError(f"--{flag.replace('_', '-')} {getattr(c, flag)}: must be >= 1")
    if c.seeds - 1 > MAX_SEED:
        raise ConfirmError(f"--seeds {c.seeds}: at most {MAX_SEED + 1}")
    if c.clip_grad is not None and not (math.isfinite(c.clip_grad) and c.clip_grad > 0):
        raise ConfirmError(f"--clip-grad {c.clip_grad:g}: must be a finite number > 0, or 0 for "
                           "no clipping")
    for flag in ("lr", "latency_time"):
        value = getattr(c, flag)
        if not (math.isfinite(value) and value > 0):
            raise ConfirmError(f"--{flag.replace('_', '-')} {value:g}: must be a finite number "
                               f"> 0")
    connect(c.latency_server, c.latency_token_file)
    if c.latency_server and not c.latency:
        raise ConfirmError("--latency-server measures latency; leave out --no-latency")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ConfirmError("--device cuda: no CUDA GPU is available on this machine; use cpu")
    if not c.run.is_dir():
        raise ConfirmError(f"{c.run}: no such run folder")
    for name in c.baselines or ():
        try:
            load_architecture(name)
        except ArchError as e:
            raise ConfirmError(f"--baselines: {e}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        df = confirm(config_from_argv(argv))
    except (ConfirmError, RunFolderError, BaselinesError, ArchError, DataError,
            LatencyError) as e:
        print(f"nas.confirm: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"nas.confirm: error: {oserror_line(e)}", file=sys.stderr)
        return 2
    cols = ["network", "latency_ms", "proxy_accuracy", "test_accuracy_mean",
            "test_accuracy_sd", "seeds", "reward"]
    print("\n" + df[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    said = verdict(df)
    if said:
        print("\n" + said)
    return 0


if __name__ == "__main__":
    run_module("nas.confirm")
