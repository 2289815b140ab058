"""Two proxy trainings at once on one CPU, and how long OpenMP threads spin-wait.

    python benchmarks/oversubscription.py --rounds 3

The README's way to add workers is to start the same nas.search command again; on one machine
each then trains with every core's worth of threads, so two commands put twice as many busy
threads as cores. torch's CPU wheel uses GNU OpenMP, whose idle threads spin for
GOMP_SPINCOUNT iterations (300,000 by default) before sleeping: a thread that spins while its
team-mate waits for a core slows both teams down.

For each GOMP_SPINCOUNT (or OMP_WAIT_POLICY=PASSIVE) it trains mnasnet_a1's proxy network
(nas.proxy's step, random batches) in fresh processes, as:

  1 x T threads   one training alone (one nas.search command)
  2 x 1 thread    two at once, one thread each (nas.search --workers 2)
  2 x T threads   two at once, T threads each (the same command started twice)

and reports the summed img/s. Variants run in interleaved rounds; each process starts timing at
a shared barrier. The environment variable is set before the process imports torch (libgomp
reads it once, when it is loaded). Shorter spinning ends the collapse of '2 x T threads' but
can slow a training alone (see the results file): nas keeps libgomp's default, and the README
says to add workers on one machine with --workers N.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

LIBGOMP_DEFAULT = "300000"
VARIANTS = {  # label: environment of the training processes
    f"GOMP_SPINCOUNT={LIBGOMP_DEFAULT} (libgomp's default)": {"GOMP_SPINCOUNT": LIBGOMP_DEFAULT},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def _train(threads: int, steps: int, batch: int, barrier, out) -> None:
    """One proxy training process: warm up, wait for the others, time `steps` steps."""
    import torch
    from torch import nn

    from nas.arch import load_architecture
    from nas.host import pin_malloc_thresholds
    from nas.proxy import ProxyBudget, make_optimizer, proxy_arch, train_step, training_model

    torch.set_num_threads(threads)
    pin_malloc_thresholds()
    budget = ProxyBudget()
    torch.manual_seed(0)
    model = training_model(proxy_arch(load_architecture("mnasnet_a1"), budget, 32), 10)
    optimizer, _ = make_optimizer(model, budget, 10_000)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=budget.label_smoothing)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    for _ in range(2):
        train_step(model, x, y, loss_fn, optimizer, False, "cpu")
    barrier.wait()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, x, y, loss_fn, optimizer, False, "cpu")
    out.put(batch * steps / (time.perf_counter() - start))


def run(env: dict[str, str], processes: int, threads: int, steps: int, batch: int) -> float:
    """Summed img/s of `processes` trainings started together under `env`."""
    saved = {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for key in saved:
        os.environ.pop(key, None)
    os.environ.update(env)  # inherited by the spawned processes, read by their libgomp
    try:
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=_train, args=(threads, steps, batch, barrier, out))
                 for _ in range(processes)]
        for proc in procs:
            proc.start()
        rates = [out.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join()
        return sum(rates)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="T: threads of one training (nas.search's default: the usable CPUs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/oversubscription.txt")
    args = p.parse_args()
    if min(args.threads, args.rounds, args.steps, args.batch_size) < 1:
        p.error("--threads, --rounds, --steps and --batch-size must be >= 1")
    t = args.threads
    shapes = {f"1 x {t} threads": (1, t), "2 x 1 thread": (2, 1), f"2 x {t} threads": (2, t)}
    results = {(v, s): [] for v in VARIANTS for s in shapes}
    started = datetime.datetime.now(datetime.UTC)
    for r in range(args.rounds):
        for variant, env in VARIANTS.items():
            for shape, (n, threads) in shapes.items():
                rate = run(env, n, threads, args.steps, args.batch_size)
                results[variant, shape].append(rate)
                print(f"round {r + 1} {variant}, {shape}: {rate:.1f} img/s", flush=True)
    from nas.files import save_table
    from nas.host import cpu_name  # imports torch: after the runs, which set the env first

    lines = [
        f"# oversubscription  {started:%Y-%m-%d %H:%M} UTC  {cpu_name()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}",
        f"# command: python {' '.join(sys.argv)}",
        f"# mnasnet_a1's proxy network, batch {args.batch_size}, {args.steps} timed steps per "
        f"process, {args.rounds} interleaved rounds; summed img/s, median over rounds",
        f"{'spin-wait setting':44s} " + " ".join(f"{s:>16s}" for s in shapes),
    ]
    for variant in VARIANTS:
        meds = [statistics.median(results[variant, s]) for s in shapes]
        lines.append(f"{variant:44s} " + " ".join(f"{m:16.1f}" for m in meds))
    lines.append("# rounds: " + "; ".join(
        f"{v.split(' ')[0]} {s}: {' '.join(f'{x:.0f}' for x in results[v, s])}"
        for v in VARIANTS for s in shapes))
    save_table("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
