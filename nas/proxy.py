"""Short proxy training on CIFAR-10: the ACC(m) of the MnasNet reward.

Airbench-style: data lives in memory as uint8 tensors, augmentation runs on whole batches, the
network runs channels-last with the convolutions that are matrix products computed as such
(`nas.fastconv`), and every hyperparameter sits in `ProxyBudget` with its unit.

The network trained is the *deployed* architecture adapted to the data (`adapt_to_input`): if
its downsampling would leave less than `final_map` pixels at the end, the earliest stride-2
layers (stem first) run at stride 1 until it does. The default, 1, trains CIFAR's 32x32 images
through the deployed strides (a 1x1 final map): in proxy_fidelity it ranked architectures as
well as the 2x2 adaptation with twice the images, and trained 2-4x faster per image, so the
same time buys 4x the images. Channel widths, kernels, ops, SE and repeats always stay as
searched; latency is measured on the deployed architecture at its own input size. One
difference a final map above 1 can make: a layer moved to stride 1 whose input and output
widths match gains the identity shortcut its block's skip allows, as it would at stride 1
in the search space (with `final_map=4`, a sampled architecture trained 10 shortcuts;
deployed, it has 9).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nas.arch import Architecture, adapt_to_input
from nas.data import CIFAR10_MEAN, CIFAR10_STD, DataSplits, ImageDataset, batches
from nas.fastconv import matmul_convs
from nas.host import failed_allocation, is_out_of_memory, pin_malloc_thresholds
from nas.model import build_model

# the proxy's optimizers, each with its peak learning rate and decoupled/L2 weight decay
# defaults: AdamW as tuned by proxy_fidelity; SGD as nas.train trains (Nesterov, momentum 0.9)
OPTIMIZER_DEFAULTS = {"adamw": {"lr": 3e-3, "weight_decay": 0.05},
                      "sgd": {"lr": 0.1, "weight_decay": 5e-4}}


@dataclass(frozen=True)
class ProxyBudget:
    """Everything that decides how much a candidate is trained. Defaults from proxy_fidelity."""

    train_images: int = 8_000  # fixed stratified subset of the proxy-train split. Against a
    # reference of 20x these image-passes (fm1 40000x8), on a 2-core Cascade Lake in one run
    # (proxy_fidelity_ghost_cascadelake.txt; its parts' dropout still drew from the global
    # generator): 8,000 x 2 in batches of 128 as 2 ghost batches, Kendall tau 0.689 (90%
    # interval 0.41-0.94) at 24.3 s per candidate; the default before, 8,000 x 2 in one batch of
    # 64, 0.778 (0.54-1.00) at 35.0 s; 16,000 x 2 as 2 x 64, 0.822 (0.61-1.00) at 43.5 s. All
    # within each other's noise (10 architectures). The same 10 first trials of a real search
    # took a median 34.8 s, 41.6 s and 71.7 s: 16,000 breaks the 60 s target, the batch of 64
    # the 5x throughput one (search_ghost_budgets_cascadelake.txt)
    epochs: int = 2
    batch_size: int = 128
    ghost_batches: int = 2  # the batch trains as this many equal parts, each normalised by its
    # own BN statistics (ghost batch norm: BN sees 64 images, as in the old batch-64 default),
    # run at once on one thread each when the CPU share has the cores: as fast as one batch of
    # 128 on 2 threads (proxy_throughput_ghost_cascadelake.txt). Weights do not depend on how
    # many ran at once while the share is below 2 x parts (train_step)
    lr: float = OPTIMIZER_DEFAULTS["adamw"]["lr"]  # peak learning rate, linear warm-up then
    # linear decay (make_optimizer)
    optimizer: str = "adamw"  # against 20-epoch trainings with nas.train's clipped recipe (what
    # nas.confirm trains), AdamW ranked 19 networks at Kendall tau 0.462 (90% interval
    # 0.21-0.70) and SGD (lr 0.1; the default 2026-12-05/06) at 0.282; SGD at lr 0.05 at 0.520,
    # but it repeats its own ranking on another CPU at tau 0.60, AdamW at 0.87
    # (proxy_fidelity_clip_zen3.txt, proxy_repeat_zen3.txt; docs/proxy.md)
    warmup: float = 0.2  # fraction of all steps spent warming up
    weight_decay: float = OPTIMIZER_DEFAULTS["adamw"]["weight_decay"]  # on conv/linear
    # weights only, not BN or biases (decoupled: AdamW)
    clip_grad: float | None = None  # largest gradient norm per step, as nas.train --clip-grad;
    # None: unclipped (proxy_repeat_zen3.txt: at norm 1 it ranked worse; docs/proxy.md)
    label_smoothing: float = 0.1
    val_images: int = 5_000  # how much of the validation split scores the candidate (all of it)
    final_map: int = 1  # reduce the earliest strides only if the last map would be smaller;
    # 1 keeps the deployed strides on 32x32 (a 2x2 map took 2-4x longer per image, a 4x4 one
    # 3.5x more again, and neither ranked better per second: proxy_fidelity)
    bn_momentum: float = 0.1  # overrides slow BN momenta (e.g. MnasNet's 0.0003) for short runs
    bn_recalibrate: int = 8  # batches used to re-estimate BN statistics before scoring; 0 = off
    channels_last: bool = True  # 2.8x faster here at final map 1, 1.6x at 2 (proxy_throughput)
    bf16: bool = False  # autocast to bfloat16; 2.2x slower than fp32 on this Zen 4 CPU
    report_every: int = 1  # epochs between intermediate validation reports to the Optuna trial

    @staticmethod
    def parts_fit(batch_size: int, ghost_batches: int) -> bool:
        """Equal parts, each of at least 2 images when split (batch norm needs 2)."""
        return batch_size % ghost_batches == 0 and (ghost_batches == 1
                                                    or batch_size >= 2 * ghost_batches)

    def validate(self) -> None:
        """One-line errors naming the field, for the search's --proxy-* flags."""
        for name in ("train_images", "epochs", "batch_size", "ghost_batches", "val_images",
                     "final_map"):
            if getattr(self, name) < 1:
                raise ValueError(f"proxy budget: {name}={getattr(self, name)} must be >= 1")
        if self.report_every < 1:
            raise ValueError(f"proxy budget: report_every={self.report_every} must be >= 1")
        if self.bn_recalibrate < 0:
            raise ValueError(f"proxy budget: bn_recalibrate={self.bn_recalibrate} must be >= 0 "
                             "(0 = off)")
        for name in ("lr", "bn_momentum"):
            if not getattr(self, name) > 0:
                raise ValueError(f"proxy budget: {name}={getattr(self, name)} must be > 0")
        if self.batch_size > self.train_images:
            raise ValueError(f"proxy budget: batch_size={self.batch_size} must be <= "
                             f"train_images={self.train_images}")
        if self.ghost_batches > 1 and not self.bn_recalibrate:
            raise ValueError(f"proxy budget: ghost_batches={self.ghost_batches} needs "
                             "bn_recalibrate >= 1 (parts update BN running statistics in "
                             "whatever order they run)")
        if not self.parts_fit(self.batch_size, self.ghost_batches):
            raise ValueError(f"proxy budget: batch_size={self.batch_size} must be a multiple of "
                             f"ghost_batches={self.ghost_batches}, at least 2 images a part "
                             "(batch norm needs 2)")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"proxy budget: warmup={self.warmup} must be in [0, 1)")
        if self.optimizer not in OPTIMIZER_DEFAULTS:
            raise ValueError(f"proxy budget: optimizer={self.optimizer!r} must be one of "
                             f"{', '.join(OPTIMIZER_DEFAULTS)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"proxy budget: weight_decay={self.weight_decay} must be >= 0")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad)
                                               and self.clip_grad > 0):
            raise ValueError(f"proxy budget: clip_grad={self.clip_grad} must be a finite "
                             "number > 0, or None for no clipping")


@dataclass(frozen=True)
class ProxyResult:
    """What one proxy training produced, for the trial's record."""

    accuracy: float  # top-1 on the validation split held out of the training set
    train_seconds: float
    eval_seconds: float
    images_per_second: float  # training throughput
    epoch_losses: tuple[float, ...]
    val_curve: tuple[float, ...]  # intermediate validation accuracy per report
    trained_arch: str  # the 32x32 adaptation that was actually trained
    threads: tuple[int, ...] = ()  # CPU thread counts trained with, one per change, if asked
    extra: dict[str, Any] = field(default_factory=dict)


class CandidateFailed(RuntimeError):
    """The candidate cannot be scored (NaN loss, out of memory); the reason goes in the trial."""


def training_model(trained: Architecture, num_classes: int, *, device: str = "cpu",
                   channels_last: bool = True) -> nn.Module:
    """The network as built, laid out and computed for fast training (same parameters), its
    dropout seeded per part of a ghost-batch step (as nn.Dropout otherwise)."""
    model = build_model(trained, num_classes=num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return seeded_dropout(matmul_convs(model))


def proxy_arch(arch: Architecture, budget: ProxyBudget, input_size: int = 32) -> Architecture:
    """The architecture that is trained: strides adapted to the data, fast-moving BN statistics."""
    adapted = adapt_to_input(arch, input_size, min_final=budget.final_map)
    momentum = max(arch.settings.bn_momentum, budget.bn_momentum)
    return dataclasses.replace(
        adapted, settings=dataclasses.replace(adapted.settings, bn_momentum=momentum))


def proxy_train(arch: Architecture, data: DataSplits, budget: ProxyBudget | None = None, *,
                device: str = "cpu", seed: int = 0, trial: Any = None,
                threads: Callable[[], int] | None = None) -> ProxyResult:
    """Train briefly, score on validation; reports to `trial` so pruners can stop it early.

    `threads`, asked before every training step (so keep it cheap), sets the CPU threads
    (restored afterwards): processes training on one machine share its cores as they come
    and go."""
    budget = budget or ProxyBudget()
    budget.validate()
    pin_malloc_thresholds()  # no page faults per step: 2x2-map training ran ~15% faster here
    torch.manual_seed(seed)
    size = data.train.images.shape[-1]
    trained = proxy_arch(arch, budget, size)
    model = training_model(trained, data.num_classes, device=device,
                           channels_last=budget.channels_last)
    previous = torch.get_num_threads()
    try:
        return _train(model, trained, data, budget, device=device, seed=seed, trial=trial,
                      threads=threads)
    except RuntimeError as e:  # CUDA's OutOfMemoryError or the CPU allocator's report
        if not is_out_of_memory(e):
            raise
        raise CandidateFailed(f"out of memory ({failed_allocation(e)})") from None
    finally:
        torch.set_num_threads(previous)


def _train(model: nn.Module, trained: Architecture, data: DataSplits, budget: ProxyBudget, *,
           device: str, seed: int, trial: Any,
           threads: Callable[[], int] | None = None) -> ProxyResult:
    gen = torch.Generator().manual_seed(seed)
    n = min(budget.train_images, len(data.train))
    if n < budget.batch_size:
        raise ValueError(f"proxy budget: batch_size={budget.batch_size} must be <= the {n} "
                         "training images (else no training step is taken)")
    steps_per_epoch = max(1, n // budget.batch_size)
    optimizer, scheduler = make_optimizer(model, budget, steps_per_epoch * budget.epochs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=budget.label_smoothing)
    losses, curve, seen, train_s, eval_s, used = [], [], 0, 0.0, 0.0, []
    for epoch in range(budget.epochs):
        t0 = time.perf_counter()
        model.train()
        epoch_loss = 0.0
        for x, y in batches(data.train, batch_size=budget.batch_size, shuffle=True, augment=True,
                            generator=gen, drop_last=True, device=device, mean=data.mean,
                            std=data.std, channels_last=budget.channels_last, limit=n):
            if threads is not None and (now := threads()) != (used[-1] if used else None):
                used.append(now)
                torch.set_num_threads(now)
            loss = train_step(model, x, y, loss_fn, optimizer, budget.bf16, device,
                              parts=budget.ghost_batches, gen=gen, clip_grad=budget.clip_grad)
            if not math.isfinite(loss):
                raise CandidateFailed(f"non-finite training loss ({loss}) in epoch {epoch + 1}")
            scheduler.step()
            epoch_loss += loss
            seen += len(y)
        train_s += time.perf_counter() - t0
        losses.append(epoch_loss / steps_per_epoch)
        last = epoch == budget.epochs - 1
        if last or (trial is not None and (epoch + 1) % budget.report_every == 0):
            t0 = time.perf_counter()
            acc = _score(model, data, budget, device=device, gen=gen)
            eval_s += time.perf_counter() - t0
            curve.append(acc)
            if trial is not None and not last:
                _report(trial, acc, epoch)
    return ProxyResult(curve[-1], train_s, eval_s, seen / max(train_s, 1e-9), tuple(losses),
                       tuple(curve), trained.to_str(), tuple(used))


def make_optimizer(model: nn.Module, budget: ProxyBudget, total_steps: int):
    """SGD (or AdamW) without decay on BN and biases, linear warm-up then linear decay.

    The peak is held for two steps and the last step runs at peak / (decay steps), not 0: the
    fidelity benchmark chose the default budget with exactly this schedule."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    # SGD at lr 0.1 leaves some deep candidates without skips near chance after ~125 steps,
    # which AdamW trains; yet it is SGD's ranking that matches nas.train's (docs/proxy.md).
    # fused: one kernel for all parameters; on this CPU the step fell from ~14 ms to ~3 ms of a
    # ~185 ms training step (mnasnet_a1, batch 64, 1 thread)
    fused = decay[0].device.type in ("cpu", "cuda")
    groups = [{"params": decay, "weight_decay": budget.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if budget.optimizer == "sgd":  # nas.train's optimizer, so the proxy ranks as it trains
        optimizer = torch.optim.SGD(groups, lr=budget.lr, momentum=0.9, nesterov=True,
                                    fused=fused)
    else:
        optimizer = torch.optim.AdamW(groups, lr=budget.lr, fused=fused)
    warm = max(1, int(budget.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(enabled: bool, device: str):
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else nullcontext()


def train_step(model, x, y, loss_fn, optimizer, bf16: bool, device: str, *, parts: int = 1,
               gen: torch.Generator | None = None, clip_grad: float | None = None) -> float:
    """One optimisation step; returns the loss so the caller can stop on NaN. `clip_grad`
    clips the whole batch's gradient norm (all parts summed) before the step.

    With `parts` > 1 the batch trains as that many ghost batches whose weighted losses add up
    to the batch's mean, each with its own dropout generator seeded from `gen`, as many at once
    as this thread's CPU share (`torch.get_num_threads()`) has cores, each on share // at-once
    threads. Their gradients are summed in part order, so weights do not depend on how many
    ran at once while each runs on one thread (shares below 2 x parts)."""
    optimizer.zero_grad(set_to_none=True)
    if parts == 1:
        with _autocast(bf16, device):
            loss = loss_fn(model(x), y)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        return loss.item()
    seeds, n = torch.randint(2**62, (parts,), generator=gen).tolist(), len(y)
    params = [p for p in model.parameters() if p.requires_grad]

    def part(x: torch.Tensor, y: torch.Tensor, seed: int):
        with _dropout_seed(seed), _autocast(bf16, device):
            loss = loss_fn(model(x), y) * (len(y) / n)
        return loss.detach(), torch.autograd.grad(loss, params, materialize_grads=True)

    done = _run_parts(part, list(zip(x.chunk(parts), y.chunk(parts), seeds, strict=True)),
                      cpu=torch.device(device).type == "cpu")
    total = list(done[0][1])
    for _, grads in done[1:]:
        torch._foreach_add_(total, grads)
    for p, g in zip(params, total, strict=True):
        p.grad = g
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    return sum(loss.item() for loss, _ in done)


def _run_parts(fn: Callable[..., Any], args: list[tuple], *, cpu: bool) -> list[Any]:
    """fn(*a) for each a, at once on up to this thread's CPU share; results in order. If one
    fails, the others are finished or cancelled first: none trains on behind the caller."""
    if not cpu:
        return [fn(*a) for a in args]
    share = torch.get_num_threads()
    at_once = min(len(args), share)
    each = max(1, share // at_once)
    futures = [_part_pool(at_once).submit(_on_threads, each, fn, *a) for a in args]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()
        concurrent.futures.wait(futures)


@functools.cache
def _part_pool(workers: int) -> ThreadPoolExecutor:
    """Long-lived, so a thread keeps its OpenMP team warm between steps; its threads never take
    SIGINT or SIGTERM, which nas.search holds back from every thread while it spawns workers."""
    return ThreadPoolExecutor(workers, thread_name_prefix=f"ghost{workers}",
                              initializer=signal.pthread_sigmask,
                              initargs=(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}))


os.register_at_fork(after_in_child=_part_pool.cache_clear)  # a forked child has no such threads
_local = threading.local()


def _on_threads(count: int, fn: Callable[..., Any], *args) -> Any:
    """Run on `count` CPU threads: OpenMP and MKL thread counts are per calling thread."""
    if getattr(_local, "threads", None) != count:
        torch.set_num_threads(count)
        _local.threads = count
    return fn(*args)


@contextmanager
def _dropout_seed(seed: int) -> Iterator[None]:
    """This thread's SeededDropout layers draw from a generator of their own, not the global one
    that parts running at once would take turns on in whatever order they come."""
    _local.dropout = seed
    try:
        yield
    finally:
        _local.dropout = _local.dropout_gen = None


class SeededDropout(nn.Dropout):
    """nn.Dropout drawing from the calling thread's `_dropout_seed` generator when one is set."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = getattr(_local, "dropout", None)
        if seed is None or not self.training or self.p == 0:
            return super().forward(x)
        gen = getattr(_local, "dropout_gen", None)
        if gen is None:  # one stream per part, on the device of its tensors
            gen = _local.dropout_gen = torch.Generator(x.device).manual_seed(seed)
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=gen)
        return x * keep / (1 - self.p)


def seeded_dropout(model: nn.Module) -> nn.Module:
    """Every nn.Dropout of `model` as a SeededDropout with the same rate, in place."""
    for name, child in model.named_children():
        if type(child) is nn.Dropout:
            setattr(model, name, SeededDropout(child.p, child.inplace))
        else:
            seeded_dropout(child)
    return model


def _report(trial: Any, acc: float, epoch: int) -> None:
    import optuna

    trial.report(acc, step=epoch + 1)
    if trial.should_prune():
        raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at val accuracy {acc:.4f}")


def _score(model: nn.Module, data: DataSplits, budget: ProxyBudget, *, device: str,
           gen: torch.Generator) -> float:
    """Top-1 on validation in eval mode, after re-estimating BN statistics on training data."""
    if budget.bn_recalibrate:
        # copies of the batch stream and of dropout's global RNG: scoring after an epoch (for a
        # pruner) must not change what later epochs train on, or a candidate's score would
        # depend on whether a pruner was watching
        fork = torch.Generator().set_state(gen.get_state())
        dev = torch.device(device)
        gpus = [torch.cuda.current_device() if dev.index is None else dev.index] \
            if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):
            recalibrate_bn(model, data, budget, device=device, gen=fork)
    return top1_accuracy(model, data.val, batch_size=256, device=device,
                         limit=budget.val_images, channels_last=budget.channels_last,
                         bf16=budget.bf16, mean=data.mean, std=data.std)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: DataSplits, budget: ProxyBudget, *, device: str,
                   gen: torch.Generator) -> None:
    """Exact BN statistics of the final weights: running averages lag behind a fast-moving net."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    it = batches(data.train, batch_size=budget.batch_size, shuffle=True, augment=False,
                 generator=gen, device=device, mean=data.mean, std=data.std,
                 channels_last=budget.channels_last, limit=budget.train_images)
    for _, (x, _y) in zip(range(budget.bn_recalibrate), it, strict=False):
        model(x)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


@torch.inference_mode()
def top1_accuracy(model: nn.Module, split: ImageDataset, *, batch_size: int = 256,
                  device: str = "cpu", limit: int | None = None, channels_last: bool = True,
                  bf16: bool = False, mean: tuple[float, ...] = CIFAR10_MEAN,
                  std: tuple[float, ...] = CIFAR10_STD) -> float:
    """Top-1 accuracy in eval mode; diverged weights fail rather than score as one class."""
    model.eval()
    correct = total = 0
    for x, y in batches(split, batch_size=batch_size, shuffle=False, augment=False, device=device,
                        channels_last=channels_last, limit=limit, mean=mean, std=std):
        with _autocast(bf16, device):
            logits = model(x)
        if not torch.isfinite(logits).all():  # argmax would call NaN the largest: class 0
            raise CandidateFailed("non-finite network outputs when scoring (diverged weights)")
        pred = logits.argmax(1)
        correct += (pred == y).sum().item()
        total += len(y)
    return correct / max(total, 1)
