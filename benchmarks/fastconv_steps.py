"""What each part of nas.fastconv buys on whole training steps, across sampled architectures.

    python benchmarks/fastconv_steps.py --archs 8 --threads 2

Trains the proxy network (the 32x32 adaptation) of mnasnet_a1 and of --archs architectures
sampled from --space (Optuna RandomSampler, --seed) on random batches, in three variants, in
interleaved rounds within one process, the order rotating each round (so machine noise hits all
variants alike), with glibc's malloc thresholds pinned as nas.proxy pins them:

  fastconv                       nas.proxy's training model as shipped
  depthwise wgrad by oneDNN      the same, but every depthwise weight gradient left to oneDNN
  every conv by oneDNN           the network as built, channels-last, no nas.fastconv

Per architecture it prints the median img/s of each variant, and the median and quartiles of
its per-round ratios against 'fastconv' (under 1: slower than shipped), then the geometric mean
of the median ratios over the architectures.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import optuna
import torch
from torch import nn

from nas.arch import Architecture, load_architecture
from nas.fastconv import MatmulConv2d
from nas.host import cpu_name, pin_malloc_thresholds
from nas.model import build_model
from nas.proxy import ProxyBudget, make_optimizer, proxy_arch, train_step, training_model
from nas.space import load_space

VARIANTS = ("fastconv", "depthwise wgrad by oneDNN", "every conv by oneDNN")


def model_for(variant: str, arch: Architecture) -> nn.Module:
    """The proxy network of one variant; the same seed gives the same parameters in all."""
    torch.manual_seed(0)
    if variant == "every conv by oneDNN":
        return build_model(arch, num_classes=10).to(memory_format=torch.channels_last)
    model = training_model(arch, 10)
    for m in model.modules():
        if isinstance(m, MatmulConv2d):
            m.own_depthwise_grad = variant == "fastconv"
    return model


def rate(model: nn.Module, opt, loss_fn, x, y, steps: int) -> float:
    """Images per second over `steps` training steps after one untimed step."""
    train_step(model, x, y, loss_fn, opt, False, "cpu")
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, x, y, loss_fn, opt, False, "cpu")
    return steps * len(y) / (time.perf_counter() - start)


def measure(arch: Architecture, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per variant, the img/s of each interleaved round."""
    budget = ProxyBudget()
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=budget.label_smoothing)
    runs = {}
    for v in VARIANTS:
        model = model_for(v, arch).train()
        runs[v] = (model, make_optimizer(model, budget, 10_000)[0])
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            model, opt = runs[v]
            rates[v].append(rate(model, opt, loss_fn, x, y, args.steps))
    return rates


def sampled(args: argparse.Namespace) -> dict[str, Architecture]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(args.space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    archs = {"mnasnet_a1": load_architecture("mnasnet_a1")}
    archs.update({f"sample {i}": space.sample(study.ask()) for i in range(args.archs)})
    return {k: proxy_arch(a, ProxyBudget(), 32) for k, a in archs.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--space", default="mnasnet")
    p.add_argument("--archs", type=int, default=8, help="sampled architectures beside mnasnet_a1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="benchmarks/results/fastconv_steps.txt")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pin_malloc_thresholds()
    head = f"{'architecture':12s} " + " ".join(f"{v:>36s}" for v in VARIANTS)
    lines = [f"# fastconv_steps  {datetime.date.today()}  {cpu_name()}, {args.threads} threads, "
             f"torch {torch.__version__}, python {platform.python_version()}",
             f"# command: python {' '.join(sys.argv)}",
             f"# img/s median of {args.rounds} interleaved rounds x {args.steps} steps, batch "
             f"{args.batch_size}; (x q1-q3) = median and quartiles of the per-round ratio to "
             "'fastconv'", head]
    print("\n".join(lines), flush=True)
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for name, arch in sampled(args).items():
        rates = measure(arch, args)
        cells = []
        for v in VARIANTS:
            per_round = [a / b for a, b in zip(rates[v], rates["fastconv"], strict=True)]
            q1, r, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [1] * 3
            ratios[v].append(r)
            spread = f"{q1:4.2f}-{q3:4.2f}"
            cells.append(f"{statistics.median(rates[v]):7.1f} img/s ({r:5.3f}x {spread})")
        lines.append(f"{name:12s} " + " ".join(f"{c:>36s}" for c in cells))
        lines.append(f"{'':12s} {arch.to_str()}")
        print("\n".join(lines[-2:]), flush=True)
    gm = [math.exp(statistics.fmean(math.log(r) for r in ratios[v])) for v in VARIANTS]
    lines.append(f"{'geomean':12s} " + " ".join(f"{f'({g:5.3f}x)':>36s}" for g in gm))
    print(lines[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
