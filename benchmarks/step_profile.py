"""Where one proxy training step spends its time on this CPU, and what bounds it.

    python benchmarks/step_profile.py --threads 2

Runs nas.proxy's own training step (the 32x32 adaptation of --arch, channels-last, nas.fastconv,
fused AdamW, malloc thresholds pinned) on random batches, in one process:

1. Step time against batch size, interleaved rounds: a least-squares line through the medians
   splits a step into a cost per step that no batch size amortises away and a cost per image.
2. torch.profiler over --steps steps at --batch-size: self time per operator and per
   (operator, input shape), in ms per step and as a share of the step.
3. A bandwidth probe: copying, ReLU and ReLU's backward on one tensor of the largest
   activation's size, to compare the profile's element-wise and batch-norm times with what
   memory alone allows.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from nas.arch import load_architecture
from nas.files import save_table
from nas.host import cpu_name, pin_malloc_thresholds
from nas.proxy import ProxyBudget, make_optimizer, proxy_arch, train_step, training_model


def setup(arch_name: str, batch_sizes: list[int]):
    """The proxy network, its optimiser and loss, and one random batch per size."""
    budget = ProxyBudget()
    torch.manual_seed(0)
    model = training_model(proxy_arch(load_architecture(arch_name), budget, 32), 10)
    optimizer, _ = make_optimizer(model, budget, 10_000)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=budget.label_smoothing)
    data = {b: (torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (b,))) for b in batch_sizes}
    return model, optimizer, loss_fn, data


def step_ms(model, optimizer, loss_fn, x, y, steps: int) -> float:
    """Median ms of `steps` training steps after one untimed step."""
    train_step(model, x, y, loss_fn, optimizer, False, "cpu")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(model, x, y, loss_fn, optimizer, False, "cpu")
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def batch_scan(model, optimizer, loss_fn, data, rounds: int, steps: int) -> list[str]:
    """Step time per batch size (median over rounds) and the fixed / per-image split."""
    times: dict[int, list[float]] = {b: [] for b in data}
    for _ in range(rounds):
        for b, (x, y) in data.items():
            times[b].append(step_ms(model, optimizer, loss_fn, x, y, steps))
    sizes = sorted(times)
    med = [statistics.median(times[b]) for b in sizes]
    fixed, per_image = fit_line([float(b) for b in sizes], med)
    lines = [f"{'batch':>6s} {'ms/step (median)':>17s} {'rounds':>30s} {'img/s':>7s}"]
    for b, m in zip(sizes, med, strict=True):
        lines.append(f"{b:6d} {m:17.1f} {' '.join(f'{t:6.1f}' for t in times[b]):>30s} "
                     f"{b / m * 1000:7.0f}")
    lines.append(f"# least squares: {fixed:.1f} ms per step + {per_image:.3f} ms per image")
    for b, m in zip(sizes, med, strict=True):
        lines.append(f"#   at batch {b}: the per-step part is {fixed / m:.0%} of the step")
    return lines


def op_profile(model, optimizer, loss_fn, x, y, steps: int, top: int) -> list[str]:
    """Self time per operator and per (operator, shape) over `steps` profiled steps."""
    for _ in range(3):
        train_step(model, x, y, loss_fn, optimizer, False, "cpu")
    plain = step_ms(model, optimizer, loss_fn, x, y, steps)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            train_step(model, x, y, loss_fn, optimizer, False, "cpu")
    by_op = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in by_op) / steps / 1000
    lines = [f"# unprofiled step {plain:.1f} ms; aten operators' self time under the profiler "
             f"{total:.1f} ms per step (the rest: Python, autograd, profiler)",
             f"{'operator':40s} {'ms/step':>8s} {'share':>6s} {'calls/step':>10s}"]
    for e in sorted(by_op, key=lambda e: -e.self_cpu_time_total)[:top]:
        ms = e.self_cpu_time_total / steps / 1000
        lines.append(f"{e.key:40s} {ms:8.2f} {ms / total:6.1%} {e.count / steps:10.0f}")
    lines.append(f"{'operator, input shapes':90s} {'ms/step':>8s} {'calls':>5s}")
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    for e in sorted(shaped, key=lambda e: -e.self_cpu_time_total)[:top]:
        shapes = ", ".join(str(s) for s in e.input_shapes if s)[:60]
        lines.append(f"{e.key + ' ' + shapes:90s} {e.self_cpu_time_total / steps / 1000:8.2f} "
                     f"{e.count // steps:5d}")
    return lines


def bandwidth_probe(shape: tuple[int, ...], repeats: int) -> list[str]:
    """Median ms and GB/s of memory-bound operations on one channels-last tensor of `shape`."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    out = torch.relu(x)
    nbytes = x.numel() * x.element_size()
    ops = {"copy (read 1, write 1)": (lambda: x.clone(), 2),
           "relu (read 1, write 1)": (lambda: torch.relu(x), 2),
           "relu backward (read 2, write 1)": (
               lambda: torch.ops.aten.threshold_backward(grad, out, 0), 3)}
    lines = [f"# tensor {list(shape)} float32 channels-last, {nbytes / 2**20:.1f} MiB; "
             f"median of {repeats}, warm (it fits this CPU's last-level cache or not: see lscpu)"]
    for name, (fn, passes) in ops.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1000
        lines.append(f"{name:34s} {ms:7.2f} ms  {passes * nbytes / ms / 1e6:6.1f} GB/s")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="mnasnet_a1")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch-size", type=int, default=64,
                   help="the profiled batch size")
    p.add_argument("--scan", default="8,16,32,64,128",
                   help="comma-separated batch sizes of the step-time scan")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=20, help="rows of each profile table")
    p.add_argument("--out", default="benchmarks/results/step_profile.txt")
    args = p.parse_args()
    try:
        scan = sorted({int(b) for b in args.scan.split(",")})
    except ValueError:
        p.error(f"--scan {args.scan!r}: expected comma-separated integers, e.g. 8,16,32,64")
    if len(scan) < 2 or scan[0] < 2 or args.batch_size < 2:
        p.error("--scan needs at least two batch sizes and every batch size must be >= 2 "
                "(batch norm needs two images)")
    torch.set_num_threads(args.threads)
    pin_malloc_thresholds()
    model, optimizer, loss_fn, data = setup(args.arch, sorted({*scan, args.batch_size}))
    started = datetime.datetime.now(datetime.UTC)
    scan_lines = batch_scan(model, optimizer, loss_fn, {b: data[b] for b in scan}, args.rounds,
                            args.steps)
    x, y = data[args.batch_size]
    profile_lines = op_profile(model, optimizer, loss_fn, x, y, args.steps, args.top)
    probe = bandwidth_probe((args.batch_size, 96, 16, 16), repeats=30)
    lines = [
        f"# step_profile  {started:%Y-%m-%d %H:%M} UTC  {cpu_name()}, {args.threads} threads, "
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"# command: python {' '.join(sys.argv)}",
        f"# network: {args.arch}'s proxy network (32x32, final map 1), nas.proxy's training step",
        "## 1. step time against batch size", *scan_lines,
        f"## 2. operators at batch {args.batch_size}, {args.steps} profiled steps", *profile_lines,
        "## 3. memory-bound operations alone (the largest activation of mnasnet_a1's proxy "
        "network: 96 channels at 16x16)", *probe,
    ]
    save_table("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
