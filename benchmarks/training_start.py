"""Why does a network train badly in nas.train? The first epochs of its schedule, per variant.

Issue #18: the default space's best candidate (trial-6 of `search_outcome_mnasnet_xeon.txt`)
ended 20 epochs at 52.8% (training loss 1.58) where the width-matched mobilenet_v2 reached
76.0%, and its first epoch ended at chance. This runs the first `--epochs` epochs of exactly
nas.train's schedule for `--total-epochs` (same seed, batches, warm-up and learning rate; no
checkpoint), for the network as given and for variants that each change one thing toward
MobileNetV2 or MobileNetV3, and prints per part of an epoch: mean training loss, the largest
gradient norm, and at the end the test accuracy and the share of activation channels that are
zero for every one of 1,024 test images (dead units).

    python benchmarks/training_start.py runs/outcome_mnasnet/best.yaml \
        --data ../shared/datasets/cifar10-jpg.tar.gz --variants as-is,no-se,relu6,v3-se,lr0.05
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nas.arch import Architecture, load_architecture  # noqa: E402
from nas.data import batches, load_data  # noqa: E402
from nas.host import pin_malloc_thresholds  # noqa: E402
from nas.proxy import top1_accuracy, training_model  # noqa: E402
from nas.train import TrainConfig, _optimizer, trained_arch  # noqa: E402


def _all_acts(arch: Architecture, old: str, new: str) -> Architecture:
    def swap(a: str) -> str:
        return new if a == old else a

    return dataclasses.replace(
        arch, stem=dataclasses.replace(arch.stem, act=swap(arch.stem.act)),
        head=dataclasses.replace(arch.head, act=swap(arch.head.act)),
        blocks=tuple(dataclasses.replace(b, act=swap(b.act)) for b in arch.blocks))


# name -> (what it changes, architecture transform, learning-rate factor, clip norm)
VARIANTS = {
    "as-is": ("nothing", lambda a: a, 1.0, None),
    "no-se": ("every squeeze-and-excite removed",
              lambda a: dataclasses.replace(a, blocks=tuple(
                  dataclasses.replace(b, se_ratio=0.0) for b in a.blocks)), 1.0, None),
    "relu6": ("ReLU -> ReLU6 everywhere (MobileNetV2)", lambda a: _all_acts(a, "relu", "relu6"),
              1.0, None),
    "v3-se": ("SE squeeze from the expanded width, hard-sigmoid gate (MobileNetV3)",
              lambda a: dataclasses.replace(a, settings=dataclasses.replace(
                  a.settings, se_from="expanded", se_gate="hardsigmoid", se_divisor=8)),
              1.0, None),
    "sigmoid-in": ("SE squeeze from the block input, sigmoid gate (MnasNet)",
                   lambda a: dataclasses.replace(a, settings=dataclasses.replace(
                       a.settings, se_from="input", se_gate="sigmoid", se_divisor=1)),
                   1.0, None),
    "eps1e-5": ("BN eps 1e-5 (PyTorch's) instead of 1e-3",
                lambda a: dataclasses.replace(a, settings=dataclasses.replace(
                    a.settings, bn_eps=1e-5)), 1.0, None),
    "lr0.05": ("peak learning rate halved", lambda a: a, 0.5, None),
    "clip1": ("gradients clipped to norm 1", lambda a: a, 1.0, 1.0),
}


def dead_share(model: nn.Module, images: torch.Tensor) -> float:
    """Share of activation-output channels that are zero for every image (ReLU/ReLU6 only)."""
    dead, total, hooks = [0], [0], []

    def hook(_m, _i, out):
        alive = (out.detach() > 0).flatten(2).any(2).any(0) if out.ndim == 4 else \
            (out.detach() > 0).any(0)
        dead[0] += int((~alive).sum())
        total[0] += alive.numel()

    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            hooks.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(images.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return dead[0] / max(1, total[0])


def run(arch: Architecture, variant: str, data, args) -> dict:
    _, transform, lr_factor, clip = VARIANTS[variant]
    cfg = TrainConfig(epochs=args.total_epochs, lr=args.lr * lr_factor, final_map=args.final_map,
                      seed=args.seed)
    torch.manual_seed(cfg.seed)
    model = training_model(trained_arch(transform(arch), cfg, data.train.images.shape[-1]),
                           data.num_classes)
    steps = max(1, len(data.full_train) // cfg.batch_size)
    optimizer, scheduler = _optimizer(model, cfg, steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    parts, rows, t0 = args.parts, [], time.perf_counter()
    for epoch in range(args.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # as nas.train
        model.train()
        losses, norms = [], []
        for x, y in batches(data.full_train, batch_size=cfg.batch_size, shuffle=True,
                            augment=True, generator=gen, drop_last=True, mean=data.mean,
                            std=data.std):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            norms.append(float(norm))
        for p in range(parts):
            lo, hi = p * len(losses) // parts, (p + 1) * len(losses) // parts
            rows.append((epoch + p / parts, sum(losses[lo:hi]) / max(1, hi - lo),
                         max(norms[lo:hi], default=float("nan"))))
    acc = top1_accuracy(model, data.test, mean=data.mean, std=data.std)
    images = next(iter(batches(data.test, batch_size=1024, shuffle=False, augment=False,
                               mean=data.mean, std=data.std)))[0]
    return {"variant": variant, "rows": rows, "test": acc, "dead": dead_share(model, images),
            "seconds": time.perf_counter() - t0, "lr": cfg.lr}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", help="architecture file or reference name (NAME@m too)")
    p.add_argument("--data", required=True)
    p.add_argument("--variants", default="as-is,no-se,relu6,v3-se,lr0.05",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=2, help="epochs run of the schedule")
    p.add_argument("--total-epochs", type=int, default=20, help="the schedule's length")
    p.add_argument("--parts", type=int, default=4, help="rows per epoch")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--final-map", type=int, default=1, help="as nas.confirm trains (fm1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    pin_malloc_thresholds()
    arch = load_architecture(args.arch)
    data = load_data(args.data, val_size=0)
    print(f"# {args.arch}: {arch.to_str()}")
    print(f"# first {args.epochs} epochs of nas.train's {args.total_epochs}-epoch schedule, "
          f"lr {args.lr}, final map {args.final_map}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads")
    results = []
    for v in variants:
        r = run(arch, v, data, args)
        results.append(r)
        print(f"# {v}: {VARIANTS[v][0]} ({r['seconds']:.0f} s)", flush=True)
    print()
    print("| epoch | " + " | ".join(f"{r['variant']} loss (max grad norm)" for r in results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for i, row in enumerate(results[0]["rows"]):
        cells = [f"{r['rows'][i][1]:.3f} ({r['rows'][i][2]:.1f})" for r in results]
        print(f"| {row[0]:.2f} | " + " | ".join(cells) + " |")
    print("| test accuracy | " + " | ".join(f"{r['test']:.4f}" for r in results) + " |")
    print("| dead ReLU channels | " + " | ".join(f"{r['dead']:.1%}" for r in results) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
