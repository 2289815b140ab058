"""Is measured latency stable enough to rank architectures? Three passes, fresh process each.

Each pass is a new Python process that measures every network with `nas.latency.measure_latency`
(default protocol: 1 thread, channels-last, batch 1, 224x224), in a shuffled order, so what one
network leaves behind (allocator state, caches) cannot favour the next in the same way every pass.
A second process per pass times the same networks the seed-style way: the model as constructed
(train mode), gradients on, torch's default threads, no warm-up, ``time.time()`` around 30
forward calls, mean. One change: it stops after 5 s per network (at least one call), because
with the default 2 threads on a machine where another job holds a core, one call of a depthwise
network took 3 s (mnasnet_a1; 21 ms with 1 thread), and 30 of them per network and pass would
not fit in the 10 minutes this benchmark may take.

Printed per network: the median of each pass, the cross-pass CV (sample std / mean of the pass
medians), seconds spent per measurement; the naive numbers beside them; then Spearman's rank
correlation between each pair of passes. Targets on the 2-core CPU: CV <= 3% for every network,
Spearman >= 0.98, <= 2 s per measurement.

    python benchmarks/latency_stability.py [--passes 3] [--out benchmarks/results/...txt]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The six references, torchvision models from 5 to 300 ms, and the seed's VGG-16 comparison.
# Not torchvision:mobilenet_v3_small: it is the reference mobilenet_v3_small again (5.0-5.3 vs
# 5.3-5.5 ms in a first run), a tie whose order is a coin toss in every rank correlation.
NETWORKS = [
    "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "mnasnet_a1",
    "mnasnet_b1", "torchvision:shufflenet_v2_x1_0", "torchvision:squeezenet1_0",
    "torchvision:efficientnet_b0", "torchvision:resnet18", "torchvision:resnet50",
    "torchvision:vgg16",
]
INPUT_SIZE = 224
NAIVE_RUNS = 30  # what the seed material averaged
NAIVE_MAX_S = 5.0  # per network; see the module docstring
TARGET_CV = 0.03
TARGET_SPEARMAN = 0.98
TARGET_SECONDS = 2.0
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- workers (one pass)


def ours_worker(networks: list[str]) -> list[dict[str, Any]]:
    """The nas.latency protocol, one network after another in this process."""
    from nas.latency import measure_latency, resolve_network

    rows = []
    for spec in networks:
        _, model = resolve_network(spec)
        rows.append({"network": spec, **measure_latency(model, INPUT_SIZE).to_dict()})
    return rows


def naive_worker(networks: list[str]) -> list[dict[str, Any]]:
    """Seed-style: as constructed, grad on, default threads, no warm-up, time.time(), mean."""
    import torch

    from nas.latency import resolve_network

    rows = []
    for spec in networks:
        _, model = resolve_network(spec)
        x = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
        start, calls = time.time(), 0
        while calls < NAIVE_RUNS and (calls == 0 or time.time() - start < NAIVE_MAX_S):
            model(x)
            calls += 1
        seconds = time.time() - start
        rows.append({"network": spec, "mean_ms": 1000 * seconds / calls, "calls": calls,
                     "seconds": seconds, "threads": torch.get_num_threads()})
    return rows


def run_pass(kind: str, networks: list[str]) -> list[dict[str, Any]]:
    """One worker in a fresh Python process; its rows come back as JSON on stdout."""
    cmd = [sys.executable, __file__, "--worker", kind, "--networks", *networks]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"latency_stability: {kind} pass failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- analysis


def cross_pass_cv(values: list[float]) -> float:
    """Sample std / mean of one network's per-pass numbers."""
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else 0.0


def spearman_pairs(table: dict[str, list[float]], passes: int) -> list[tuple[int, int, float]]:
    """Spearman's rho between the network rankings of every pair of passes."""
    from scipy.stats import spearmanr

    names = sorted(table)
    out = []
    for i, j in itertools.combinations(range(passes), 2):
        rho = spearmanr([table[n][i] for n in names], [table[n][j] for n in names]).statistic
        out.append((i + 1, j + 1, float(rho)))
    return out


def by_network(passes: list[list[dict[str, Any]]], field: str) -> dict[str, list[float]]:
    """network -> [field in pass 1, pass 2, ...] (passes ran in different orders)."""
    table: dict[str, list[float]] = {}
    for rows in passes:
        for row in rows:
            table.setdefault(row["network"], []).append(row[field])
    return table


def format_report(networks: list[str], ours: list[list[dict]], naive: list[list[dict]]) -> str:
    """The per-network table, the rank correlations and the verdict on each target."""
    n = len(ours)
    med, secs, runs = (by_network(ours, f) for f in ("median_ms", "seconds", "runs"))
    mean = by_network(naive, "mean_ms")
    w = max(len(s) for s in networks)
    head = (f"{'network':<{w}} " + " ".join(f"{'p' + str(i + 1) + ' ms':>8}" for i in range(n))
            + f" {'CV %':>5} {'s/meas':>6} {'runs':>5} | "
            + " ".join(f"{'naive' + str(i + 1):>8}" for i in range(n)) + f" {'CV %':>5}")
    lines = [head, "-" * len(head)]
    for s in networks:
        lines.append(f"{s:<{w}} " + " ".join(f"{v:>8.2f}" for v in med[s])
                     + f" {100 * cross_pass_cv(med[s]):>5.1f} {max(secs[s]):>6.2f}"
                     f" {min(runs[s]):>5d} | " + " ".join(f"{v:>8.2f}" for v in mean[s])
                     + f" {100 * cross_pass_cv(mean[s]):>5.1f}")
    calls = by_network(naive, "calls")
    lines.append("(pN ms: median of pass N; s/meas and runs: worst pass; naiveN: mean of "
                 f"seed-style calls in pass N, {min(min(v) for v in calls.values())}-"
                 f"{NAIVE_RUNS} calls per network)")
    rho, rho_naive = spearman_pairs(med, n), spearman_pairs(mean, n)
    lines.append("Spearman between passes, ours:  "
                 + ", ".join(f"{i}-{j} {r:.4f}" for i, j, r in rho))
    lines.append("Spearman between passes, naive: "
                 + ", ".join(f"{i}-{j} {r:.4f}" for i, j, r in rho_naive))
    lines += _verdict(med, secs, rho)
    return "\n".join(lines)


def format_details(ours: list[list[dict]], naive: list[list[dict]]) -> str:
    """Every measurement in the order it ran, to tell a noisy network from a noisy moment."""
    w = max(len(r["network"]) for rows in ours for r in rows)
    lines = [f"{'pass':>4} {'network':<{w}} {'median':>8} {'p10':>8} {'p90':>8} {'in-run CV%':>10} "
             f"{'runs':>5} {'warm':>4} {'s':>5} {'load':>5} | {'naive ms':>9} {'calls':>5}"]
    for p, (rows, naive_rows) in enumerate(zip(ours, naive, strict=True), start=1):
        naive_by = {r["network"]: r for r in naive_rows}
        for r in rows:
            nv = naive_by[r["network"]]
            lines.append(f"{p:>4} {r['network']:<{w}} {r['median_ms']:>8.2f} {r['p10_ms']:>8.2f} "
                         f"{r['p90_ms']:>8.2f} {100 * r['cv']:>10.1f} {r['runs']:>5d} "
                         f"{r['warmup_runs']:>4d} {r['seconds']:>5.2f} {r['load_avg']:>5.2f} | "
                         f"{nv['mean_ms']:>9.1f} {nv['calls']:>5d}")
    return "\n".join(lines)


def _verdict(med: dict[str, list[float]], secs: dict[str, list[float]],
             rho: list[tuple[int, int, float]]) -> list[str]:
    worst = max(med, key=lambda s: cross_pass_cv(med[s]))
    worst_cv = cross_pass_cv(med[worst])
    slowest = max(secs, key=lambda s: max(secs[s]))
    worst_s = max(secs[slowest])
    min_rho = min(r for *_, r in rho) if rho else float("nan")
    typical_s = statistics.median(v for vals in secs.values() for v in vals)

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"target CV <= {100 * TARGET_CV:g}% for every network: worst {worst} "
        f"{100 * worst_cv:.2f}% -> {mark(worst_cv <= TARGET_CV)}",
        f"target Spearman >= {TARGET_SPEARMAN}: lowest {min_rho:.4f} -> "
        f"{mark(min_rho >= TARGET_SPEARMAN)}",
        f"target <= {TARGET_SECONDS:g} s per measurement: median {typical_s:.2f} s, worst "
        f"{slowest} {worst_s:.2f} s -> {mark(worst_s <= TARGET_SECONDS)}",
    ]


# --------------------------------------------------------------------------- driver


def machine() -> str:
    """What the numbers were taken on."""
    import torch

    from nas.host import available_cpus, cpu_name

    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs ({available_cpus()} usable), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def load() -> str:
    """Load average: other people's jobs share this CPU."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def run_all(networks: list[str], passes: int) -> tuple[list, list, list[str]]:
    """Alternate ours/naive passes, each in a fresh process and a shuffled order."""
    ours, naive, notes = [], [], []
    for p in range(passes):
        order = random.Random(p).sample(networks, len(networks))
        t0 = time.perf_counter()
        ours.append(run_pass("ours", order))
        t1 = time.perf_counter()
        naive.append(run_pass("naive", order))
        notes.append(f"pass {p + 1}: ours {t1 - t0:.1f} s, naive {time.perf_counter() - t1:.1f} s "
                     f"(incl. process start and model builds), {load()} after")
        print(notes[-1], file=sys.stderr, flush=True)
    return ours, naive, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--networks", nargs="+", default=NETWORKS)
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/"
                                                 "latency_stability_<date>.txt)")
    parser.add_argument("--worker", choices=("ours", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker = ours_worker if args.worker == "ours" else naive_worker
        print(json.dumps(worker(args.networks)))
        return 0
    if args.passes < 2:
        parser.error(f"--passes {args.passes}: need at least 2 to compare passes")
    started, load_before = datetime.datetime.now(), load()
    ours, naive, notes = run_all(args.networks, args.passes)
    report = format_report(args.networks, ours, naive)
    header = [f"# latency stability, {started:%Y-%m-%d %H:%M}", f"machine: {machine()}",
              f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
              f"{load_before} before; " + "; ".join(notes),
              f"protocol: nas.latency defaults: 1 thread, channels_last, batch 1, "
              f"{INPUT_SIZE}x{INPUT_SIZE}, median of timed runs", ""]
    details = format_details(ours, naive)
    text = ("\n".join(header) + report + "\n\nEach measurement, in the order it ran (load: "
            "1-minute load average as it finished):\n" + details + "\n")
    from nas.files import save_table

    out = save_table(text.rstrip("\n"),  # prints it too
                     args.out or RESULTS / f"latency_stability_{started:%Y%m%d_%H%M}.txt")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
