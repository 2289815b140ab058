"""Which runtime should a search measure latency in? Do the runtimes even agree on the ranking?

    python benchmarks/runtime_ranking.py [--archs 20] [--state S.json] [--out T.txt]

The six reference networks, torchvision:resnet18 and --archs architectures sampled from the
default space (Optuna RandomSampler, --seed) are each measured in every runtime of
nas.runtimes (and int8 in the runtimes that quantize) with nas.latency's protocol: 1 thread,
224x224, batch 1, thread-CPU clock, up to 2 s per measurement after conversion. For each
network the runtimes run in a shuffled order, so drift of the machine over the run does not
favour one runtime. Results go to --state as they come, so an interrupted run resumes.

Printed: latency per network and runtime, conversion seconds, then Spearman's rank correlation
between each pair of runtimes and between each runtime's latency and the multiply-add count.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import random
import statistics
import sys
from pathlib import Path

import optuna
import torch
from scipy import stats

from nas.cost import count_macs
from nas.files import save_table, write_atomic
from nas.host import cpu_name
from nas.latency import measure_latency, network_builder
from nas.runtimes import RUNTIMES, ConversionError
from nas.space import load_space

REFERENCES = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
              "mnasnet_a1", "mnasnet_b1", "torchvision:resnet18")
INPUT_SIZE = 224


def columns() -> list[tuple[str, str, str]]:
    """(column name, runtime, precision) for every runtime and precision installed here."""
    cols = []
    for name, rt in RUNTIMES.items():
        if not rt.available():
            print(f"runtime_ranking: {name} is not installed here; skipped", file=sys.stderr)
            continue
        for precision in rt.precisions:
            cols.append((name if precision == "fp32" else f"{name}-{precision}", name, precision))
    return cols


def networks(n_archs: int, seed: int) -> list[tuple[str, str]]:
    """(label, spec) for the references and the sampled architectures (as block strings)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("mnasnet")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sampled = [space.sample(study.ask()) for _ in range(n_archs)]
    return [(r, r) for r in REFERENCES] + [(f"sampled-{i}", json.dumps(a.to_dict()))
                                           for i, a in enumerate(sampled)]


def spec_builder(spec: str):
    """A reference name, torchvision:NAME, or a sampled architecture as JSON."""
    if spec in REFERENCES:
        return network_builder(spec)
    from nas.arch import Architecture
    from nas.model import build_model

    arch = Architecture.from_json(spec)
    return lambda: build_model(arch)


def measure_all(nets, cols, state: dict, state_path: Path | None, seed: int) -> None:
    rng = random.Random(seed)
    for label, spec in nets:
        build = spec_builder(spec)
        macs = None
        order = list(cols)
        rng.shuffle(order)
        for col, runtime, precision in order:
            key = f"{label}|{col}"
            if key in state["results"]:
                continue
            model = build()
            macs = macs or count_macs(model, INPUT_SIZE)
            try:
                r = measure_latency(model, INPUT_SIZE, runtime=runtime, precision=precision)
                row = {"median_ms": r.median_ms, "cv": r.cv, "convert_s": r.convert_s,
                       "seconds": r.seconds}
            except ConversionError as e:
                row = {"error": str(e)}
            state["results"][key] = {**row, "macs": macs, "spec": spec}
            print(f"{label:>20} {col:>16}: "
                  + (f"{row['median_ms']:8.2f} ms (convert {row['convert_s']:.1f} s)"
                     if "median_ms" in row else row["error"]), flush=True)
            if state_path is not None:
                write_atomic(state_path, json.dumps(state, indent=1))


def report(nets, cols, state: dict, args: argparse.Namespace) -> str:
    res = state["results"]
    names = [c for c, _, _ in cols]
    w = max(len(label) for label, _ in nets)
    lines = [f"# runtime_ranking: {datetime.date.today()}, {cpu_name()}, "
             f"{platform.python_version()}, torch {torch.__version__}",
             f"# command: python benchmarks/runtime_ranking.py --archs {args.archs} "
             f"--seed {args.seed}",
             "# latency: median ms, 1 thread, 224x224, batch 1 (nas.latency protocol); "
             "MACs in millions", ""]
    lines.append(f"{'network':<{w}} {'MACs M':>8} " + " ".join(f"{n:>16}" for n in names))
    for label, _ in nets:
        cells = []
        for n in names:
            r = res.get(f"{label}|{n}", {})
            cells.append(f"{r['median_ms']:>16.2f}" if "median_ms" in r else f"{'fail':>16}")
        macs = next((res[f"{label}|{n}"]["macs"] for n in names if f"{label}|{n}" in res), 0)
        lines.append(f"{label:<{w}} {macs / 1e6:>8.1f} " + " ".join(cells))
    def convert_s(n: str) -> float:
        times = [res.get(f"{lb}|{n}", {}).get("convert_s") for lb, _ in nets]
        return statistics.median([t for t in times if t is not None] or [0.0])

    lines += ["", "conversion seconds per network (median): "
              + ", ".join(f"{n} {convert_s(n):.1f}" for n in names)]
    for label, _ in nets:
        for n in names:
            if "error" in res.get(f"{label}|{n}", {}):
                lines.append(f"failed: {label} in {n}: {res[f'{label}|{n}']['error']}")

    def series(n: str) -> dict[str, float]:
        return {lb: res[f"{lb}|{n}"]["median_ms"] for lb, _ in nets
                if "median_ms" in res.get(f"{lb}|{n}", {})}

    lines += ["", "Spearman between runtimes (all networks; sampled only in brackets):"]
    sampled = {lb for lb, _ in nets if lb.startswith("sampled-")}
    for a, b in itertools.combinations(names, 2):
        sa, sb = series(a), series(b)
        common = sorted(set(sa) & set(sb))
        rho = stats.spearmanr([sa[k] for k in common], [sb[k] for k in common])[0]
        cs = [k for k in common if k in sampled]
        rho_s = stats.spearmanr([sa[k] for k in cs], [sb[k] for k in cs])[0]
        ratio = statistics.median(sb[k] / sa[k] for k in common)
        lines.append(f"  {a:>16} vs {b:<16} {rho:6.3f} ({rho_s:6.3f})   median {b}/{a} "
                     f"{ratio:5.2f}   n={len(common)}")
    lines += ["", "Spearman of multiply-adds with each runtime's latency (all; sampled):"]
    for n in names:
        s = series(n)
        keys = sorted(s)
        macs = [res[f"{k}|{n}"]["macs"] for k in keys]
        rho = stats.spearmanr(macs, [s[k] for k in keys])[0]
        ks = [k for k in keys if k in sampled]
        rho_s = stats.spearmanr([res[f"{k}|{n}"]["macs"] for k in ks], [s[k] for k in ks])[0]
        lines.append(f"  {n:>16}: {rho:6.3f} ({rho_s:6.3f})")
    lines += ["", "sampled architectures:"]
    from nas.arch import Architecture

    lines += [f"  {label}: {Architecture.from_json(spec).to_str()}" for label, spec in nets
              if label.startswith("sampled-")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", type=int, default=20, help="architectures sampled from the space")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", type=Path, default=None, help="JSON of partial results (resume)")
    p.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = p.parse_args()
    torch.manual_seed(0)
    cols = columns()
    nets = networks(args.archs, args.seed)
    state = {"results": {}}
    if args.state is not None and args.state.exists():
        state = json.loads(args.state.read_text())
    measure_all(nets, cols, state, args.state, args.seed)
    text = report(nets, cols, state, args)
    if args.out is not None:
        save_table(text, args.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
