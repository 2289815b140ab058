"""Is this CPU's speed steady enough to time networks on? Probes beside a network's runs.

    python benchmarks/cpu_speed.py [--seconds 60] [--network mnasnet_a1] [--out ...]

On a VM the core we run on may be shared with other tenants on the host. nas.latency's thread
clock leaves out time the core runs someone else's job, but not a core that runs our code more
slowly (a busy hyperthread sibling, a lower clock). This script tells the two apart: on one
pinned CPU and 1 thread it repeats, for --seconds,

  compute probe   100 products of 64x64 float32 matrices: stays in L1, measures the core only
  memory probe    one copy of 64 MiB: measures memory bandwidth, hardly the core
  network         one forward pass of --network (eval, inference mode, channels-last, 224x224)

each timed by the thread's CPU time as nas.latency does. It prints their spread (p90/p10), the
spread of 1-second window medians, and how the network's times follow each probe (Pearson r over
the iterations). A steady machine has p90/p10 near 1 for the compute probe; if it swings and the
network follows it, latencies measured here carry that noise whatever the protocol does.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nas.files import save_table
from nas.host import cpu_name, pin_malloc_thresholds
from nas.latency import resolve_network

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_MATMULS = 100
PROBE_SIDE = 64  # 3 matrices of 16 KiB: L1-resident
COPY_BYTES = 64 * 2**20
WINDOW_S = 1.0
STEADY_SPREAD = 1.10  # compute probe p90/p10 above this: the core's speed swings


def thread_ms(fn) -> float:
    t0 = time.thread_time_ns()
    fn()
    return (time.thread_time_ns() - t0) / 1e6


def sample(network: str, seconds: float, cpu: int) -> dict[str, np.ndarray]:
    """Interleaved probe and network times, and when each iteration ended."""
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    pin_malloc_thresholds()
    _, model = resolve_network(network)
    model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 224, 224).to(memory_format=torch.channels_last)
    a, b = torch.randn(PROBE_SIDE, PROBE_SIDE), torch.randn(PROBE_SIDE, PROBE_SIDE)
    src = torch.empty(COPY_BYTES // 4)
    dst = torch.empty_like(src)

    def compute() -> None:
        for _ in range(PROBE_MATMULS):
            torch.mm(a, b)

    out: dict[str, list[float]] = {"compute": [], "memory": [], "network": [], "t": []}
    with torch.inference_mode():
        for _ in range(5):  # oneDNN builds its kernels in the first runs
            model(x)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            out["compute"].append(thread_ms(compute))
            out["memory"].append(thread_ms(lambda: dst.copy_(src)))
            out["network"].append(thread_ms(lambda: model(x)))
            out["t"].append(time.perf_counter() - start)
    return {k: np.asarray(v) for k, v in out.items()}


def window_medians(values: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Median of each whole WINDOW_S window: how far a short measurement can land off."""
    edges = np.arange(0.0, t[-1] - WINDOW_S + 1e-9, WINDOW_S)
    return np.array([np.median(values[(t >= e) & (t < e + WINDOW_S)]) for e in edges])


def report(s: dict[str, np.ndarray], network: str) -> list[str]:
    head = (f"{'series':<10} {'p1 ms':>8} {'p10':>8} {'p50':>8} {'p90':>8} {'p99':>8} "
            f"{'p90/p10':>8} | {'1-s window medians min-max':>27} {'max/min':>8} "
            f"{'r vs network':>12}")
    lines = [head, "-" * len(head)]
    for name in ("compute", "memory", "network"):
        v = s[name]
        q = np.percentile(v, [1, 10, 50, 90, 99])
        w = window_medians(v, s["t"])
        r = np.corrcoef(v, s["network"])[0, 1]
        lines.append(f"{name:<10} " + " ".join(f"{x:>8.2f}" for x in q)
                     + f" {q[3] / q[1]:>8.2f} | {w.min():>13.2f} - {w.max():<11.2f} "
                     f"{w.max() / w.min():>8.2f} {r:>12.2f}")
    spread = np.percentile(s["compute"], 90) / np.percentile(s["compute"], 10)
    verdict = "steady" if spread <= STEADY_SPREAD else "NOT steady: the core's speed swings"
    lines.append(f"({len(s['t'])} iterations; network = {network}; compute probe p90/p10 "
                 f"{spread:.2f} against {STEADY_SPREAD:g} for a steady core -> {verdict})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--network", default="mnasnet_a1",
                        help="a reference name, torchvision:NAME or an architecture file")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU to pin to")
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/"
                                                 "cpu_speed_<date>.txt)")
    args = parser.parse_args(argv)
    if args.seconds < 3 * WINDOW_S:
        parser.error(f"--seconds {args.seconds:g}: need at least {3 * WINDOW_S:g}")
    if args.cpu not in os.sched_getaffinity(0):
        parser.error(f"--cpu {args.cpu}: not one of this process's CPUs "
                     f"{sorted(os.sched_getaffinity(0))}")
    started = datetime.datetime.now()
    steal_before = _steal()
    s = sample(args.network, args.seconds, args.cpu)
    steal = _steal() - steal_before
    header = [f"# cpu speed, {started:%Y-%m-%d %H:%M}",
              f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}",
              f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
              f"pinned to CPU {args.cpu}, 1 thread, thread CPU time; host steal time during the "
              f"run: {steal} jiffies; load average {os.getloadavg()[0]:.2f} after", ""]
    text = "\n".join(header + report(s, args.network)) + "\n"
    out = save_table(text.rstrip("\n"),  # prints it too
                     args.out or RESULTS / f"cpu_speed_{started:%Y%m%d_%H%M}.txt")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _steal() -> int:
    """Jiffies the hypervisor ran someone else while our vCPUs wanted to run (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return -1


if __name__ == "__main__":
    raise SystemExit(main())
