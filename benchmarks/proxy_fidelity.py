"""Does the short proxy rank architectures the way much longer training does?

    python benchmarks/proxy_fidelity.py --data ../shared/datasets/cifar10-jpg.tar.gz \
        [--state runs/proxy_fidelity.json] [--out benchmarks/results/NEW.txt]

Samples --archs architectures from the search space (Optuna RandomSampler, --seed), trains each
with every budget in --budgets and with the --reference budget, all scored on the same
validation split, then prints accuracy per budget, seconds per candidate, and Kendall tau /
Spearman of each budget against the reference. Budgets are named by what they do, so results
stay comparable when the default proxy changes: `fm2 4000x2 b64` is final map 2, 4,000 train
images x 2 epochs, batch 64 (omitted tokens take the fixed BASE below; `lr0.003` sets the peak
learning rate, `wd` the weight decay, `sgd` trains with nas.train's optimizer and its lr 0.1 and
weight decay 5e-4 unless lr/wd tokens say otherwise; `clip1` clips each step's gradient norm
to 1, as nas.train does). `train e20` is not a proxy but what
nas.confirm trains: nas.train's recipe (SGD, 50,000 images, test split) for 20 epochs on the
proxy's network form, the reference that says whether the proxy ranks as the confirmation will
(issue #18, item 5). Partial results live
in --state (JSON), so an interrupted run resumes (a `train` reference mid-training too, from its
checkpoint beside the state); short budgets run for every architecture before the reference.
--reference-networks adds named networks (references, `name@width`) after the sampled ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy import stats

from nas.arch import Architecture, load_architecture
from nas.cost import count_macs, count_params
from nas.data import load_data
from nas.files import save_table, write_atomic
from nas.host import cpu_name
from nas.model import build_model
from nas.proxy import OPTIMIZER_DEFAULTS, CandidateFailed, ProxyBudget, proxy_train
from nas.space import load_space
from nas.train import TrainConfig, train

_TOKEN = re.compile(r"^(?:fm(?P<fm>\d+)|(?P<n>\d+)x(?P<ep>\d+)|b(?P<b>\d+)|g(?P<g>\d+)"
                    r"|lr(?P<lr>[\d.e-]+)|wd(?P<wd>[\d.e-]+)|clip(?P<clip>[\d.e-]+)|(?P<opt>sgd|adamw)"
                    r"|@(?P<tag>\w+))$")
# what a name leaves out, fixed: stored results keep their meaning when nas.proxy's defaults change
BASE = ProxyBudget(train_images=8000, epochs=2, batch_size=64, ghost_batches=1, optimizer="adamw",
                   lr=2e-3, warmup=0.2, weight_decay=0.05, label_smoothing=0.1, val_images=5000,
                   final_map=1, bn_momentum=0.1, bn_recalibrate=8, channels_last=True, bf16=False,
                   report_every=1)


_TRAIN = re.compile(r"^train e(?P<epochs>\d+)(?: clip(?P<clip>[0-9.]+))?$")


def parse_budget(name: str) -> ProxyBudget | TrainConfig:
    """'fm1 16000x2 b128 g2 lr0.003' -> BASE with those fields replaced (g: ghost batches);
    'train e20' -> nas.train's recipe for 20 epochs on the proxy's network form (final map 1),
    unclipped as the committed references trained ('train e20 clip1': clipped to norm 1, as
    nas.train trains since 2026-12-06).

    A trailing '@tag' only labels results merged from another run (--merge FILE@tag)."""
    if m := _TRAIN.match(name.split(" @")[0]):
        return TrainConfig(epochs=int(m["epochs"]), final_map=BASE.final_map, seed=0,
                           clip_grad=float(m["clip"]) if m["clip"] else None)
    changes: dict = {}
    matches = []
    for token in name.split():
        m = _TOKEN.match(token)
        if not m:
            raise SystemExit(f"budget {name!r}: token {token!r} is not one of fm<final map>, "
                             "<images>x<epochs>, b<batch>, g<ghost batches>, lr<peak lr>, "
                             "wd<weight decay>, clip<gradient norm>, sgd, adamw, @<tag>")
        matches.append(m)
    for m in matches:  # the optimizer first: its lr and weight decay unless lr/wd tokens say
        if m["opt"] and m["opt"] != BASE.optimizer:
            changes.update(optimizer=m["opt"], **OPTIMIZER_DEFAULTS[m["opt"]])
    for m in matches:
        if m["fm"]:
            changes["final_map"] = int(m["fm"])
        if m["n"]:
            changes.update(train_images=int(m["n"]), epochs=int(m["ep"]))
        if m["b"]:
            changes["batch_size"] = int(m["b"])
        if m["g"]:
            changes["ghost_batches"] = int(m["g"])
        if m["lr"]:
            changes["lr"] = float(m["lr"])
        if m["wd"]:
            changes["weight_decay"] = float(m["wd"])
        if m["clip"]:
            changes["clip_grad"] = float(m["clip"])
    return dataclasses.replace(BASE, **changes)


def sample_archs(space_name: str, n: int, seed: int) -> list[Architecture]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


def reference_networks(args: argparse.Namespace) -> list[str]:
    return [n.strip() for n in args.reference_networks.split(",") if n.strip()]


def state_archs(state: dict, args: argparse.Namespace, where: str) -> list[Architecture]:
    """The architectures a state's results belong to. Results are keyed by index, so a state
    keeps its list: sampling again after the search space or Optuna changed would draw others
    and silently pair their results with the stored reference's."""
    if "archs" not in state:
        if state:
            raise SystemExit(f"{where}: results without the architectures they belong to; add "
                             "them as 'archs' (Architecture.to_dict) or use another --state")
        return (sample_archs(args.space, args.archs, args.seed)
                + [load_architecture(n) for n in reference_networks(args)])
    archs = [Architecture.from_dict(d, f"{where}: archs[{i}]")
             for i, d in enumerate(state["archs"])]
    given = reference_networks(args)
    named = state.get("named", len(given))  # states from before it was kept: as given
    if "named" in state and given and len(given) != named:
        raise SystemExit(f"--reference-networks: {where} holds {named} named networks ("
                         f"{', '.join(a.name or '?' for a in archs[len(archs) - named:])}); "
                         "leave the flag out to keep them, or use another --state")
    sampled = len(archs) - named
    if args.archs > sampled:
        raise SystemExit(f"--archs {args.archs}: {where} holds {sampled} architectures; pass "
                         f"--archs {sampled} or use another --state")
    if args.archs < sampled and named:  # results are keyed by position in the list
        raise SystemExit(f"--archs {args.archs}: {where} holds {sampled} sampled architectures "
                         f"before its named ones; pass --archs {sampled}")
    return archs[:args.archs] + archs[sampled:sampled + named]


def run_one(arch: Architecture, data, budget: ProxyBudget | TrainConfig,
            run_dir: Path) -> dict:
    """Validation accuracy of a proxy budget, or test accuracy of a nas.train reference (resumed
    from its checkpoint in run_dir; seconds then count only this process's epochs)."""
    t0 = time.perf_counter()
    if isinstance(budget, TrainConfig):
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = train(arch, run_dir, budget, data=data, progress=False)
        return {"accuracy": metrics["test_accuracy"], "seconds": time.perf_counter() - t0,
                "history": [h["test_accuracy"] for h in metrics["history"]],
                "epoch_seconds": [round(h["seconds"], 1) for h in metrics["history"]]}
    try:
        r = proxy_train(arch, data, budget, seed=0)
        acc = r.accuracy
    except CandidateFailed as e:
        acc = float("nan")
        print(f"  failed: {e}")
    return {"accuracy": acc, "seconds": time.perf_counter() - t0}


def merged_state(spec: str, archs: list[dict]) -> dict:
    """'FILE' or 'FILE@tag': another run's results; with a tag its budgets become 'budget @tag'
    columns, so a run on another machine (or an older reference) ranks beside this one."""
    path, _, tag = spec.rpartition("@") if "@" in spec else (spec, "", "")
    state = json.loads(Path(path).read_text())
    theirs = state.pop("archs", [])
    state.pop("named", None)  # ours says where our named networks start
    shared = min(len(theirs), len(archs))  # a shorter list: the first architectures of ours
    if not shared or theirs[:shared] != archs[:shared]:
        raise SystemExit(f"--merge {spec!r}: its results belong to other architectures than "
                         "this run's (or it does not list them)")
    if not tag:
        return state
    if not re.fullmatch(r"\w+", tag):
        raise SystemExit(f"--merge {spec!r}: the tag after '@' must be letters, digits or _")
    return {f"{key} @{tag}": value for key, value in state.items()}


def tau_interval(x, y, draws: int = 2000) -> tuple[float, float]:
    """Bootstrap over architectures: with 10-20 of them one discordant pair moves tau a lot."""
    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(0)
    taus = [stats.kendalltau(x[s], y[s]).statistic
            for s in rng.integers(0, len(x), (draws, len(x)))]
    return tuple(np.nanpercentile(taus, [5, 95]))


def accuracy_pairs(state: dict, n_archs: int, a: str, b: str) -> list[tuple[float, float]]:
    """(accuracy under a, under b) for every architecture that has both, failures left out."""
    pairs = [(state[f"{i}|{a}"]["accuracy"], state[f"{i}|{b}"]["accuracy"])
             for i in range(n_archs) if f"{i}|{a}" in state and f"{i}|{b}" in state]
    return [p for p in pairs if p[0] == p[0] and p[1] == p[1]]


def report(archs, ladder, state, args) -> str:
    names = list(ladder)
    long = names[-1]
    widths = [max(10, len(k)) for k in names]
    bw = max(16, *map(len, names))
    lines = [
        f"# proxy_fidelity  {datetime.date.today()}  {cpu_name()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, python {platform.python_version()}",
        f"# command: python {' '.join(sys.argv)}",
        f"# {len(archs)} architectures listed in {args.state} (sampled, when it was new, from "
        f"the space then called {args.space!r}, RandomSampler seed {args.seed}); reference "
        f"{names[-1]!r}; fm = final feature map of the 32x32 adaptation, NxE = train images x "
        "epochs, b = batch, g = ghost batches",
        "",
        f"{'#':>2} {'architecture':70s} "
        + " ".join(f"{k:>{w}s}" for k, w in zip(names, widths, strict=True)),
    ]
    for i, a in enumerate(archs):
        row = [state.get(f"{i}|{k}") for k in names]
        cells = [f"{r['accuracy']:{w}.4f}" if r else f"{'-':>{w}s}"
                 for r, w in zip(row, widths, strict=True)]
        lines.append(f"{i:>2} {a.to_str()[:70]:70s} " + " ".join(cells))
    lines.append("")
    lines.append(f"{'budget':>{bw}s} {'median s/cand':>14s} {'kendall tau':>12s} "
                 f"{'tau 90% CI':>14s} {'spearman':>9s} {'n':>3s}")
    for k in names:
        secs = [state[f"{i}|{k}"]["seconds"] for i in range(len(archs)) if f"{i}|{k}" in state]
        pairs = accuracy_pairs(state, len(archs), k, long)
        if len(pairs) >= 3 and k != long:
            corr = correlation_cells(*zip(*pairs, strict=True))
        else:
            corr = f"{'-':>12s} {'-':>14s} {'-':>9s}"
        med = f"{statistics.median(secs):14.1f}" if secs else f"{'-':>14s}"
        lines.append(f"{k:>{bw}s} {med} {corr} {len(pairs):3d}")
    lines += cost_rankings(archs, state, long, bw)
    lines += early_epochs(len(archs), state, long, bw)
    lines += twin_agreement(len(archs), names, state, long)
    return "\n".join(lines)


EARLY_EPOCHS = (1, 2, 3, 5, 10)


def early_epochs(n_archs: int, state: dict, reference: str, width: int = 16) -> list[str]:
    """The reference's own test accuracy after its first epochs, ranked against its last: what
    a proxy of nas.train's recipe on all the training images would rank like. These epochs ran
    at the start of the reference's schedule (a high learning rate), not a short schedule."""
    runs = {i: r for i in range(n_archs) if (r := state.get(f"{i}|{reference}"))
            and len(r.get("history", ())) > 1 and r["accuracy"] == r["accuracy"]}
    if len(runs) < 3:
        return []
    lines = []
    for k in EARLY_EPOCHS:
        if k >= min(len(r["history"]) for r in runs.values()):
            break
        early = [r["history"][k - 1] for r in runs.values()]
        secs = statistics.median(sum(r["epoch_seconds"][:k]) for r in runs.values())
        corr = correlation_cells(early, [r["accuracy"] for r in runs.values()])
        lines.append(f"{f'reference epoch {k}':>{width}s} {secs:14.1f} {corr} {len(runs):3d}")
    return lines


def cost_rankings(archs: list[Architecture], state: dict, reference: str, width: int = 16
                  ) -> list[str]:
    """What a search could rank by without training: multiply-adds and parameters (of the
    deployed network at 224x224, 10 classes) against the reference, as the budgets are."""
    ref = {i: r["accuracy"] for i in range(len(archs))
           if (r := state.get(f"{i}|{reference}")) and r["accuracy"] == r["accuracy"]}  # no NaN
    if len(ref) < 3:
        return []
    models = {i: build_model(archs[i], num_classes=10) for i in ref}
    return [f"{label:>{width}s} {'-':>14s} "
            f"{correlation_cells([count(m) for m in models.values()], list(ref.values()))} "
            f"{len(ref):3d}"
            for label, count in (("multiply-adds", lambda m: count_macs(m, 224)),
                                 ("parameters", count_params))]


def tau_with_interval(x, y) -> tuple[float, float, float]:
    return (stats.kendalltau(x, y).statistic, *tau_interval(x, y))


def correlation_text(x, y) -> str:
    tau, lo, hi = tau_with_interval(x, y)
    return f"kendall tau {tau:.3f} (90% CI {lo:.2f}..{hi:.2f})"


def correlation_cells(x, y) -> str:
    """Kendall tau, its bootstrap interval and Spearman, as the report's columns."""
    tau, lo, hi = tau_with_interval(x, y)
    return f"{tau:12.3f} {f'{lo:.2f}..{hi:.2f}':>14s} {stats.spearmanr(x, y).statistic:9.3f}"


def twin_agreement(n_archs: int, names: list[str], state: dict, reference: str | None = None
                   ) -> list[str]:
    """The same budget in two runs ('b' and 'b @tag'): how far the proxy's own noise goes, and
    how the mean of the two ranks against the reference (a proxy run twice, at twice the cost)."""
    lines = []
    for tagged in names:
        base = tagged.split(" @")[0]
        if tagged == base or base not in names:
            continue
        pairs = accuracy_pairs(state, n_archs, base, tagged)
        if len(pairs) < 3:
            continue
        x, y = zip(*pairs, strict=True)
        gaps = [abs(a - b) for a, b in pairs]
        if not lines:
            lines += ["", "same budget in two runs (another machine or other numerics):"]
        lines.append(f"  {base!r} vs {tagged!r}: kendall tau {stats.kendalltau(x, y).statistic:.3f}"
                     f", |acc difference| median {statistics.median(gaps):.4f} max "
                     f"{max(gaps):.4f}, n {len(pairs)}")
        if not reference:
            continue
        means = [((state[f"{i}|{base}"]["accuracy"] + state[f"{i}|{tagged}"]["accuracy"]) / 2,
                  state[f"{i}|{reference}"]["accuracy"]) for i in range(n_archs)
                 if all(f"{i}|{k}" in state for k in (base, tagged, reference))]
        means = [(m, r) for m, r in means if m == m and r == r]  # failures (NaN) left out
        if len(means) >= 3:
            lines.append(f"    their mean against {reference!r}: "
                         f"{correlation_text(*zip(*means, strict=True))}, n {len(means)}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="../shared/datasets/cifar10-jpg.tar.gz")
    p.add_argument("--space", default="mnasnet")
    p.add_argument("--archs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", default="fm1 8000x2 b128 g2 sgd,fm1 8000x2 b128 g2 lr0.003",
                   help="comma-separated budgets to rank against the reference (default: the "
                        "default proxy and the AdamW one before it)")
    p.add_argument("--reference", default="train e20",
                   help="the long training whose ranking the budgets should reproduce (default: "
                        "what nas.confirm trains, nas.train's recipe for 20 epochs: 7-25 min per "
                        "architecture on a Zen 4 core; 'fm1 40000x8', the reference until "
                        "2026-12-05, was a longer AdamW proxy)")
    p.add_argument("--reference-networks", default="",
                   help="comma-separated named networks (mobilenet_v3_small, mobilenet_v2@0.75, "
                        "an architecture file) ranked after the sampled ones, when --state is "
                        "new (a state keeps them: leave it out to resume)")
    p.add_argument("--threads", type=int, default=1)
    # neither default is under benchmarks/results/: a plain run must not overwrite a committed
    # table or train into a committed state (one did, 2026-12-06); commit with --out
    p.add_argument("--out", default=None, help="also write the table here (default: print it)")
    p.add_argument("--state", default="runs/proxy_fidelity.json",
                   help="partial results, to resume (default: %(default)s)")
    p.add_argument("--only", default=None,
                   help="comma-separated architecture indices this process trains (to split the "
                        "work over processes, each with its own --state)")
    p.add_argument("--merge", default=None,
                   help="comma-separated extra state files to merge into the report (no "
                        "training); FILE@tag renames its budgets to 'budget @tag', so they can be "
                        "listed in --budgets beside this run's")
    return p


def main() -> int:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.budgets.split(",") if n.strip()] + [args.reference]
    ladder = {n: parse_budget(n) for n in names}
    state_path = Path(args.state)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    archs = state_archs(state, args, args.state)
    listed = state.setdefault("archs", [a.to_dict() for a in archs])[:len(archs)]
    state.setdefault("named", len(reference_networks(args)))
    for extra in filter(None, (args.merge or "").split(",")):
        state.update(merged_state(extra, listed))
    data = load_data(args.data)
    mine = (range(len(archs)) if args.only is None
            else [int(i) for i in args.only.split(",")])
    order = [(k, i) for k in list(ladder)[:-1] for i in mine]
    order += [(list(ladder)[-1], i) for i in mine]
    if args.merge:  # a report of finished runs: a training here would mix them into --state
        missing = sum(f"{i}|{k}" not in state for k, i in order)
        if missing:
            print(f"--merge: report only; {missing} results missing here are not trained (run "
                  "without --merge, with its own --state, to train them)", file=sys.stderr)
        order = []
    if order:
        state_path.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default
    for k, i in order:
        key = f"{i}|{k}"
        if key in state:
            continue
        if " @" in k:
            raise SystemExit(f"budget {k!r}: tagged budgets come from --merge FILE@tag, and "
                             f"{key!r} is not in it")
        print(f"arch {i} budget {k}: {archs[i].to_str()}", flush=True)
        run_dir = state_path.with_suffix("") / f"{i}-{k.replace(' ', '-')}"
        state[key] = run_one(archs[i], data, ladder[k], run_dir)
        print(f"  acc {state[key]['accuracy']:.4f} in {state[key]['seconds']:.1f}s", flush=True)
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)
        if args.out:
            write_atomic(args.out, report(archs, ladder, state, args) + "\n")  # so far
    save_table(report(archs, ladder, state, args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
