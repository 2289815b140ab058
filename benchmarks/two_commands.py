"""The same nas.search command started twice on one machine: do the two share the cores?

    python benchmarks/two_commands.py --data ../shared/datasets/cifar10-jpg.tar.gz

The README's way to add workers to a study is to start the same command again. On one machine
each command trained on every core before, and two proxy trainings with every core's worth of
threads each ran 12x slower together than one alone (oversubscription.py: libgomp's idle
threads spin while their team-mates wait for a core). nas.search now asks, every 2 s while it
trains, how many processes on this machine train the study, and trains on its equal share of
the CPUs.

For each variant, two `python -m nas.search` processes start on one fresh study (at the same
moment, or the second --stagger seconds later; real data, a small proxy budget so that the old
behaviour finishes in minutes) and run until the study holds --trials finished trials.
Variants:

  every core each   --train-threads <all CPUs>: what both commands did before
  shared (default)  no --train-threads: an equal share while both train, asked every 2 s
  shared, staggered the second command starts --stagger seconds later, while the first
                    trains alone on every core

It reports the wall time until both exit, the finished trials per minute, the median training
img/s of a trial, and each trial's thread counts (one per change) with its img/s (trials.csv).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def run_pair(extra: list[str], common: list[str], runs_dir: Path, name: str,
             delay_s: float) -> float:
    """Seconds until both commands, the second started delay_s later, have exited."""
    cmd = [sys.executable, "-m", "nas.search", *common, "--runs-dir", str(runs_dir),
           "--name", name, *extra]
    logs = [runs_dir / f"{name}-{i}.log" for i in range(2)]
    procs: list[subprocess.Popen] = []
    start = time.perf_counter()
    try:
        for i, log in enumerate(logs):
            if i:
                time.sleep(delay_s)
            with log.open("w") as f:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f))
        for proc, log in zip(procs, logs, strict=True):
            if proc.wait() != 0:
                raise SystemExit(f"two_commands: a search failed ({proc.returncode}): "
                                 f"{log.read_text()[-2000:]}")
        return time.perf_counter() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> int:
    from nas.files import save_table
    from nas.host import available_cpus, cpu_name

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="nas.search's --data")
    p.add_argument("--trials", type=int, default=6, help="finished trials per study")
    p.add_argument("--proxy-images", type=int, default=2000)
    p.add_argument("--proxy-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the variants")
    p.add_argument("--stagger", type=float, default=20.0,
                   help="seconds after the first that the second command starts, in the "
                        "staggered variant (the first then trains alone on every core)")
    p.add_argument("--out", default="benchmarks/results/two_commands.txt")
    args = p.parse_args()
    if min(args.trials, args.proxy_images, args.proxy_epochs, args.rounds) < 1:
        p.error("--trials, --proxy-images, --proxy-epochs and --rounds must be >= 1")
    if args.stagger < 0:
        p.error("--stagger must be >= 0")
    cpus = available_cpus()
    common = ["--data", args.data, "--trials", str(args.trials), "--proxy-images",
              str(args.proxy_images), "--proxy-epochs", str(args.proxy_epochs),
              "--latency-time", "0.5", "--target-ms", "80", "--mode", "soft"]
    variants = {f"every core each (--train-threads {cpus})": (["--train-threads", str(cpus)], 0),
                "shared (default)": ([], 0),
                f"shared, 2nd started {args.stagger:g} s later": ([], args.stagger)}
    rows = {v: [] for v in variants}
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (variant, (extra, delay_s)) in enumerate(variants.items()):
                name = f"r{r}v{i}"
                wall = run_pair(extra, common, Path(tmp), name, delay_s)
                df = pd.read_csv(Path(tmp) / name / "trials.csv")
                done = df[df.state == "COMPLETE"]
                trials = " ".join(f"{json.loads(t)}:{ips:.0f}" for t, ips in zip(
                    done.train_threads, done.images_per_s, strict=True))
                rows[variant].append((wall, len(done), float(done.images_per_s.median()),
                                      trials))
                print(f"round {r + 1} {variant}: {wall:.0f} s, {len(done)} trials, median "
                      f"{done.images_per_s.median():.0f} img/s per trial; per trial, threads "
                      f"used:img/s {trials}", flush=True)
    lines = [
        f"# two_commands  {started:%Y-%m-%d %H:%M} UTC  {cpu_name()}, {cpus} usable CPUs, "
        f"python {platform.python_version()}",
        f"# command: python {' '.join(sys.argv)}",
        f"# two nas.search commands started on one fresh study until it holds "
        f"{args.trials} finished trials; proxy {args.proxy_images} images x "
        f"{args.proxy_epochs} epochs; medians over {args.rounds} round(s)",
        f"{'variant':40s} {'wall s':>8s} {'trials/min':>11s} {'img/s/trial':>12s}",
    ]
    for variant, rs in rows.items():
        wall = statistics.median(r[0] for r in rs)
        per_min = statistics.median(r[1] / r[0] * 60 for r in rs)
        ips = statistics.median(r[2] for r in rs)
        lines.append(f"{variant:40s} {wall:8.0f} {per_min:11.2f} {ips:12.0f}")
    lines += [f"# {v}, round {i + 1}, per trial (threads used:img/s): {r[3]}"
              for v, rs in rows.items() for i, r in enumerate(rs)]
    save_table("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
