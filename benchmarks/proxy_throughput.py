"""Training images/second: our proxy pipeline against the plain PyTorch pipeline, same network.

    python benchmarks/proxy_throughput.py --data ../shared/datasets/cifar10-jpg.tar.gz

plain:  torchvision ImageFolder over the JPEG files, PIL RandomCrop/Flip/ToTensor/Normalize in a
        DataLoader, default (contiguous) memory format; the seed material's pipeline
ours:   uint8 tensors in memory, batched crop/flip on tensors, channels-last, convolutions that
        are matrix products (one-pixel outputs, pointwise) computed as such and the depthwise
        weight gradients oneDNN computes slowly done another way (nas.fastconv), and
        nas.proxy's own training step (fused AdamW; the batch as --ghost-batches parts trained
        at once on their own threads, nas.proxy's default); plain steps with SGD, as the seed does
ours, 1 part of B: ours with the batch on every thread as one part, to isolate what the parts
        at once buy (only with --ghost-batches above 1)
ours, every conv through oneDNN: ours without nas.fastconv, to isolate what it buys
ours-nchw: ours with the default memory format, to isolate what channels-last buys
ours + bf16: ours under bfloat16 autocast (CPUs with avx512_bf16 / AMX)
ours + torch.compile (--compile): ours through torch.compile (inductor); its first step, which
        compiles, is reported beside the rate: a search compiles every candidate afresh
ours, N x 1 thread: N processes (--parallel, default: one per thread) each training its own
        copy of ours on 1 thread at the same time; the row is their summed img/s, i.e. what
        `nas.search --workers N` trains together on an N-core CPU
Each variant trains the same proxy network (the 32x32 adaptation of --arch) for --steps steps
after --warmup steps, in one process, in interleaved rounds; the table reports the median.
The plain row runs in a fresh process each round, with glibc's own malloc settings, as a seed
script runs. Ours runs in this process with glibc's malloc thresholds pinned as nas.proxy pins
them (--malloc pinned, the default): without that, glibc hands freed activation buffers back to
the kernel and every step faults them in again (~2,000-4,000 page faults a step, here). The row
'plain, malloc pinned' gives the plain pipeline the same help, also in a fresh process.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import multiprocessing as mp
import platform
import queue
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

from nas.arch import Architecture, load_architecture
from nas.data import CIFAR10_MEAN, CIFAR10_STD, DataSplits, batches, load_data
from nas.files import save_table
from nas.host import cpu_name, pin_malloc_thresholds
from nas.model import build_model
from nas.proxy import ProxyBudget, make_optimizer, proxy_arch, train_step, training_model


def plain_loader(root: Path, batch_size: int, workers: int):
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def time_steps(model, it, steps: int, warmup: int, bf16: bool, ours: bool, parts: int = 1
               ) -> tuple[float, float]:
    """Images per second over `steps` training steps after `warmup` untimed ones, and the
    seconds of the first step (where torch.compile compiles; the table shows the slowest round,
    later rounds may hit inductor's cache, which a search's new candidates would not).

    Ours runs nas.proxy's own step (fused AdamW, label smoothing, the batch as `parts` ghost
    batches at once); plain runs the seed's SGD + cross-entropy step.
    """
    if ours:
        budget = ProxyBudget()
        opt, _ = make_optimizer(model, budget, steps + warmup)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=budget.label_smoothing)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        loss_fn = nn.CrossEntropyLoss()
    model.train()
    seeds = torch.Generator().manual_seed(0)
    n, start, first = 0, None, 0.0
    for i, (x, y) in enumerate(it):
        if i == warmup:
            start = time.perf_counter()
        t0 = time.perf_counter()
        train_step(model, x, y, loss_fn, opt, bf16, "cpu", parts=parts if ours else 1,
                   gen=seeds)
        if i == 0:
            first = time.perf_counter() - t0
        if i >= warmup:
            n += len(y)
        if i + 1 == warmup + steps:
            break
    return n / (time.perf_counter() - start), first


def ours(arch: Architecture, data: DataSplits, batch_size: int, gen: torch.Generator,
         channels_last: bool = True, matmul: bool = True):
    """Our proxy's network and one epoch of its batches, in the chosen memory format."""
    if matmul:
        model = training_model(arch, 10, channels_last=channels_last)
    else:  # the convolutions as built, to isolate what nas.fastconv buys
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = build_model(arch, num_classes=10).to(memory_format=fmt)
    return model, batches(data.train, batch_size=batch_size, shuffle=True, augment=True,
                          generator=gen, channels_last=channels_last)


def compiled(arch: Architecture, data: DataSplits, batch_size: int, gen: torch.Generator):
    """Ours through torch.compile's default (inductor) backend; plain training step after it."""
    model, it = ours(arch, data, batch_size, gen)
    return torch.compile(model), it, False


def _parallel_worker(args: argparse.Namespace, arch: Architecture, barrier, out) -> None:
    """One of N concurrent 1-thread trainers; all start timing together after the barrier."""
    torch.set_num_threads(1)
    if args.malloc == "pinned":
        pin_malloc_thresholds()
    data = load_data(args.data)
    torch.manual_seed(0)
    model, it = ours(arch, data, args.batch_size, torch.Generator().manual_seed(0))
    barrier.wait()
    out.put(time_steps(model, it, args.steps, args.warmup, False, ours=True,
                       parts=args.ghost_batches)[0])


def _plain_worker(args: argparse.Namespace, arch: Architecture, root: Path, pinned: bool,
                  out) -> None:
    """The plain pipeline in a fresh process: glibc's malloc defaults (as a seed script has)
    unless `pinned`."""
    torch.set_num_threads(args.threads)
    if pinned:
        pin_malloc_thresholds()
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10)
    it = iter(plain_loader(root, args.batch_size, args.workers))
    out.put(time_steps(model, it, args.steps, args.warmup, False, ours=False))


def plain_fresh(args: argparse.Namespace, arch: Architecture, root: Path,
                pinned: bool = False) -> tuple[float, float]:
    """img/s and first-step seconds of the plain pipeline run in a new process."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_plain_worker, args=(args, arch, root, pinned, out))
    proc.start()
    return collect(out, [proc])[0]


def collect(out, procs: list) -> list:
    """One result per process; a process that dies without one stops the benchmark, not hangs it."""
    results = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode != 0]
            if dead:
                for p in procs:
                    p.terminate()
                raise SystemExit(f"proxy_throughput: a worker process exited with status "
                                 f"{dead[0].exitcode}; its error is printed above") from None
    for p in procs:
        p.join()
    return results


def parallel_ours(args: argparse.Namespace, arch: Architecture) -> float:
    """Summed img/s of `args.parallel` concurrent 1-thread processes training ours."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.parallel), ctx.Queue()
    procs = [ctx.Process(target=_parallel_worker, args=(args, arch, barrier, out))
             for _ in range(args.parallel)]
    for proc in procs:
        proc.start()
    return sum(collect(out, procs))


def image_folder(source: str, scratch: Path) -> Path:
    """The plain pipeline reads JPEG files: unpack an archive into a scratch folder."""
    path = Path(source)
    if path.is_file():
        with tarfile.open(path) as tar:
            tar.extractall(scratch, filter="data")
        path = scratch
    return next(t.parent for t in sorted(path.rglob("train")) if (t.parent / "test").is_dir())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="../shared/datasets/cifar10-jpg.tar.gz")
    p.add_argument("--arch", default="mnasnet_a1")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=ProxyBudget().batch_size)
    p.add_argument("--ghost-batches", type=int, default=ProxyBudget().ghost_batches,
                   help="parts each batch of ours trains as, at once on the threads (nas.proxy)")
    p.add_argument("--final-map", type=int, default=ProxyBudget().final_map,
                   help="the proxy's 32x32 adaptation (nas.proxy): smallest final feature map")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers of the plain pipeline")
    p.add_argument("--parallel", type=int, default=torch.get_num_threads(),
                   help="processes of the 'ours, N x 1 thread' row (0 = skip it)")
    p.add_argument("--compile", action="store_true",
                   help="add the row 'ours + torch.compile' (minutes of compiling per round)")
    p.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                   help="glibc malloc thresholds of ours (pinned as nas.proxy and nas.train pin "
                        "them, or glibc's own); 'pinned' adds the row 'plain, malloc pinned'")
    p.add_argument("--out", default="benchmarks/results/proxy_throughput.txt")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc == "pinned" and not pin_malloc_thresholds():
        p.error("--malloc pinned: this C library has no glibc mallopt; use --malloc default")
    data = load_data(args.data)
    scratch = tempfile.TemporaryDirectory()
    root = image_folder(args.data, Path(scratch.name))
    budget = ProxyBudget(final_map=args.final_map)
    arch = proxy_arch(load_architecture(args.arch), budget, 32)
    gen = torch.Generator().manual_seed(0)
    plain_name = "plain (DataLoader+PIL, NCHW)"
    variants = {  # None: the plain pipeline in a fresh process (plain_fresh)
        plain_name: None,
        **({"plain, malloc pinned": None} if args.malloc == "pinned" else {}),
        "ours-nchw (tensors, NCHW)": lambda: (
            *ours(arch, data, args.batch_size, gen, channels_last=False), False),
        "ours (tensors, channels-last)": lambda: (*ours(arch, data, args.batch_size, gen), False),
        "ours, every conv through oneDNN": lambda: (
            *ours(arch, data, args.batch_size, gen, matmul=False), False),
        "ours + bf16 autocast": lambda: (*ours(arch, data, args.batch_size, gen), True),
    }
    whole = f"ours, 1 part of {args.batch_size}"
    if args.ghost_batches > 1:  # what the parts at once buy over one batch on every thread
        variants[whole] = lambda: (
            *ours(arch, data, args.batch_size, gen), False)
    if args.compile:
        variants["ours + torch.compile"] = lambda: compiled(arch, data, args.batch_size, gen)
    parallel_name = f"ours, {args.parallel} x 1 thread"
    results: dict[str, list[float]] = {k: [] for k in variants}
    first: dict[str, list[float]] = {k: [] for k in variants}
    if args.parallel > 0:
        results[parallel_name] = []
    for r in range(args.rounds):
        if args.parallel > 0:
            results[parallel_name].append(parallel_ours(args, arch))
            print(f"round {r + 1} {parallel_name}: {results[parallel_name][-1]:.1f} img/s",
                  flush=True)
        for name, make in variants.items():
            if make is None:
                rate, first_s = plain_fresh(args, arch, root, pinned=name != plain_name)
                results[name].append(rate)
                first[name].append(first_s)
                print(f"round {r + 1} {name}: {rate:.1f} img/s", flush=True)
                continue
            torch.manual_seed(0)
            model, it, bf16 = make()
            rate, first_s = time_steps(model, it, args.steps, args.warmup, bf16,
                                       ours=not name.startswith("plain"),
                                       parts=1 if name == whole else args.ghost_batches)
            results[name].append(rate)
            first[name].append(first_s)
            del model, it  # stop the plain pipeline's workers before the next variant is timed
            gc.collect()
            print(f"round {r + 1} {name}: {results[name][-1]:.1f} img/s", flush=True)
    plain = statistics.median(results[plain_name])
    lines = [
        f"# proxy_throughput  {datetime.date.today()}  {cpu_name()}, {args.threads} threads, "
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"# command: python {' '.join(sys.argv)}",
        f"# network: {args.arch} adapted to 32x32 with final map {args.final_map} "
        f"({arch.to_str()}), batch {args.batch_size} (ours: {args.ghost_batches} ghost "
        f"batches at once), "
        f"{args.steps} timed steps after {args.warmup}, {args.rounds} interleaved rounds; "
        f"plain rows in a fresh process each round, ours in this one with malloc thresholds "
        f"{args.malloc}",
        f"{'pipeline':32s} {'img/s (median)':>15s} {'rounds':>24s} {'vs plain':>9s} "
        f"{'1st step s max':>14s}",
    ]
    for name, vals in results.items():
        med = statistics.median(vals)
        firsts = f"{max(first[name]):14.2f}" if first.get(name) else f"{'-':>14s}"
        lines.append(f"{name:32s} {med:15.1f} {' '.join(f'{v:7.1f}' for v in vals):>24s} "
                     f"{med / plain:8.2f}x {firsts}")
    per_round = [o / q for o, q in zip(results["ours (tensors, channels-last)"],
                                       results[plain_name], strict=True)]
    lines.append(f"# ours/plain within each round: {' '.join(f'{v:.2f}' for v in per_round)} "
                 f"(median {statistics.median(per_round):.2f}x)")
    save_table("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
