"""The search's command line, turned into one frozen, typed SearchConfig: nothing after
`config_from_argv` sees argparse.

Checks that need only the flags live here (one line each, exit status 2 in the runner); those
that need the data or the study (--val-size against the images, a resumed study's settings)
live where that is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from nas.arch import ArchError, load_architecture
from nas.cli import (
    MAX_NAME_BYTES,
    MAX_SEED,
    HelpFormatter,
    Parser,
    file_in_the_way,
    is_plain_folder_name,
)
from nas.host import available_cpus
from nas.interleaved import MAX_WARM_RUNS, WARM_RUNS_PER_BLOCK
from nas.latency import LatencyError
from nas.latency_client import connect
from nas.proxy import OPTIMIZER_DEFAULTS, ProxyBudget
from nas.reward import MODES, exponents
from nas.runtimes import DEFAULT_RUNTIME, PRECISIONS, RUNTIME_NAMES
from nas.space import DEFAULT_SPACE

SAMPLERS = ("tpe", "gp", "nsga2", "evolution", "random")
# Optuna's GP sampler for both objectives: on the surrogate of the default space it had the
# lowest regret of every sampler at 50, 100 and 200 trials for both rewards at both targets,
# and the highest hypervolume on the Pareto objective (30 seeds each;
# benchmarks/results/sampler_efficiency_xeon.txt); TPE was the default until 2026-12-07
DEFAULT_SAMPLER = "gp"
OBJECTIVES = ("reward", "pareto")
PRUNERS = ("none", "median")
LATENCY_PROTOCOLS = ("interleaved", "ladder", "single")


class UsageError(ValueError):
    """A bad flag or file: one line, exit 2, nothing written."""


_BUDGET = ProxyBudget()


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Everything one search process is asked to do, each field the flag of its name
    (`--target-ms` is `target_ms`). Built by config_from_argv, which also resolves the defaults
    that depend on other flags (sampler, train_device, alpha and beta from mode)."""

    target_ms: float
    mode: str = "soft"
    alpha: float | None = None  # None: the mode's
    beta: float | None = None
    objective: str = "reward"
    trials: int = 20
    timeout: float | None = None
    space: str = DEFAULT_SPACE
    sampler: str | None = None  # None: DEFAULT_SAMPLER
    startup_trials: int = 10
    population: int = 20
    pruner: str = "none"
    seed: int = 0
    baselines: tuple[str, ...] = ()
    enqueue_baselines: bool = True  # those in the space become its first trials
    runtime: str = DEFAULT_RUNTIME
    precision: str = "fp32"
    device: str = "cpu"
    input_size: int = 224
    threads: int | None = None  # None: nas.latency's DEFAULT_THREADS
    latency_time: float = 2.0
    latency_protocol: str = "interleaved"  # or "single" (nas.interleaved; latency_aa_zen4.txt)
    latency_warm_runs: int = WARM_RUNS_PER_BLOCK  # interleaved: untimed runs per block
    latency_server: str | None = None  # None: measured here
    latency_token_file: str | None = None
    data: str | None = None
    train_device: str | None = None  # None: --device
    train_threads: int | None = None  # None: a share of the usable CPUs (cpu_share)
    workers: int = 1
    proxy_images: int = _BUDGET.train_images
    proxy_epochs: int = _BUDGET.epochs
    proxy_batch: int = _BUDGET.batch_size
    proxy_ghost_batches: int = _BUDGET.ghost_batches
    proxy_optimizer: str = _BUDGET.optimizer
    proxy_lr: float | None = None  # None: the optimizer's (nas.proxy.OPTIMIZER_DEFAULTS)
    proxy_weight_decay: float | None = None  # None: the optimizer's
    proxy_final_map: int = _BUDGET.final_map
    proxy_clip_grad: float | None = _BUDGET.clip_grad  # None: unclipped (--proxy-clip-grad 0)
    val_size: int = 5000
    name: str = "search"
    runs_dir: str = "runs"
    storage: str | None = None
    # not flags: a --workers child's index, and how many processes its parent started
    worker_index: int = 0
    local_workers: int = 1

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def exponents(self) -> tuple[float, float]:
        """(alpha, beta): the mode's, or the overrides."""
        return exponents(self.mode, self.alpha, self.beta)

    def budget(self) -> ProxyBudget:
        own = OPTIMIZER_DEFAULTS[self.proxy_optimizer]
        return ProxyBudget(train_images=self.proxy_images, epochs=self.proxy_epochs,
                           batch_size=self.proxy_batch, ghost_batches=self.proxy_ghost_batches,
                           optimizer=self.proxy_optimizer,
                           lr=own["lr"] if self.proxy_lr is None else self.proxy_lr,
                           weight_decay=(own["weight_decay"] if self.proxy_weight_decay is None
                                         else self.proxy_weight_decay),
                           val_images=self.val_size, final_map=self.proxy_final_map,
                           clip_grad=self.proxy_clip_grad)

    def child(self, index: int) -> SearchConfig:
        """The configuration of the --workers process number `index` (1, 2, ...)."""
        return dataclasses.replace(self, workers=1, baselines=(), worker_index=index,
                                   local_workers=self.workers)


def _default(field: str):
    return SearchConfig.__dataclass_fields__[field].default


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="nas.search",
               description="Hardware-aware architecture search, MnasNet style.",
               formatter_class=HelpFormatter)
    g = p.add_argument_group("objective")
    g.add_argument("--target-ms", type=float, required=True, help="latency target T in ms")
    g.add_argument("--mode", choices=sorted(MODES), default=_default("mode"),
                   help="soft: alpha = beta = -0.07; hard: alpha = 0, beta = -1 (MnasNet paper)")
    g.add_argument("--alpha", type=float, default=None,
                   help="override the exponent for LAT <= T (default: the --mode's)")
    g.add_argument("--beta", type=float, default=None,
                   help="override the exponent for LAT > T (default: the --mode's)")
    g.add_argument("--objective", choices=OBJECTIVES, default=_default("objective"),
                   help="reward: maximise the scalar MnasNet reward; pareto: maximise accuracy and "
                        "minimise latency jointly. Optuna refuses "
                        "intermediate reports in multi-objective studies, so --pruner applies to "
                        "the reward objective only")
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=int, default=_default("trials"),
                   help="total finished trials the study should hold (a resumed study counts the "
                        "ones it already has; not those cut short by Ctrl-C, SIGTERM or a "
                        "killed worker)")
    g.add_argument("--timeout", type=float, default=None, help="stop starting trials after this "
                   "many seconds (default: no limit)")
    g.add_argument("--space", default=_default("space"),
                   help="search-space YAML file, or the name of one in search_spaces/")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: gp for both objectives (Optuna's Gaussian-process sampler); "
                        "tpe: multivariate TPE (multi-objective TPE for pareto; the default "
                        "until 2026-12-07); evolution: regularized evolution, reward only")
    g.add_argument("--startup-trials", type=int, default=_default("startup_trials"),
                   help="TPE and GP: random trials first")
    g.add_argument("--population", type=int, default=_default("population"),
                   help="population size of NSGA-II and of evolution (regularized evolution: "
                        "each child mutates one parameter of the best of 5 drawn from the "
                        "newest --population trials)")
    g.add_argument("--pruner", choices=PRUNERS, default=_default("pruner"),
                   help="stop candidates whose intermediate validation accuracy is below the "
                        "median of earlier trials (reward objective only)")
    g.add_argument("--seed", type=int, default=_default("seed"),
                   help="sampler and training seed")
    g.add_argument("--baselines", default="",
                   help="comma-separated reference networks to run through the same latency "
                        "and proxy, e.g. mobilenet_v2,mnasnet_b1")
    g.add_argument("--enqueue-baselines", action=argparse.BooleanOptionalAction,
                   default=_default("enqueue_baselines"),
                   help="a baseline that is a member of the space is also enqueued as a trial "
                        "(Optuna's enqueue_trial), so the sampler starts from it and the front "
                        "is never worse than it (mobilenet_v3_small in the mobilenet_v3 space)")
    g = p.add_argument_group("target device")
    g.add_argument("--runtime", default=_default("runtime"), choices=RUNTIME_NAMES,
                   help="what runs the network when latency is measured: the runtime you will "
                        "deploy with (docs/latency.md; eager is PyTorch itself, for "
                        "comparison)")
    g.add_argument("--precision", default=_default("precision"), choices=PRECISIONS,
                   help="int8: each candidate statically quantized by the runtime's own "
                        "quantizer, calibrated on training images (onnxruntime, executorch)")
    g.add_argument("--device", default=_default("device"), choices=("cpu", "cuda"),
                   help="where latency is measured (the deployment target)")
    g.add_argument("--input-size", type=int, default=_default("input_size"),
                   help="deployment input resolution")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for latency (default 1: one core, as MnasNet timed one "
                        "phone core)")
    g.add_argument("--latency-time", type=float, default=_default("latency_time"),
                   help="seconds of measuring per architecture (warm-up included; each "
                        "architecture is measured once per study)")
    g.add_argument("--latency-protocol", choices=LATENCY_PROTOCOLS,
                   default=_default("latency_protocol"),
                   help="interleaved: each candidate timed in rounds with a reference network "
                        "(mnasnet_a1), as the median ratio times the reference's latency, which "
                        "ranked 12 networks with Spearman 0.986 between fresh processes against "
                        "0.86-0.89 for single (benchmarks/results/latency_aa_zen4.txt); single: "
                        "the candidate timed alone, as before; ladder (experimental, measured "
                        "here only): interleaved against the nearest of mnasnet_a1 at 7 widths, "
                        "no better than interleaved in the A/A "
                        "(benchmarks/results/latency_aa_ladder_zen4.txt)")
    g.add_argument("--latency-warm-runs", type=int, default=_default("latency_warm_runs"),
                   help="interleaved and ladder: untimed runs at the start of each block, after "
                        "the other network ran, which leaves the next runs slower than alone "
                        "(benchmarks/results/protocol_bias_xeon.txt); 0 is the protocol of "
                        "studies from before 2026-12-07")
    g.add_argument("--latency-server", default=None, metavar="URL",
                   help="measure latency on the device running `python -m nas.latency serve` "
                        "(training stays here); the study records that device")
    g.add_argument("--latency-token-file", default=None, metavar="FILE",
                   help="the latency server's shared token")
    g = p.add_argument_group("proxy training")
    g.add_argument("--data", default=None,
                   help="CIFAR-10 source: 'cifar10' (torchvision download), an ImageFolder "
                        "directory, or a .tar/.tar.gz of one; default $NAS_DATA or 'cifar10'")
    g.add_argument("--train-device", default=None, help="device for proxy training "
                   "(default: --device)")
    g.add_argument("--train-threads", type=int, default=None,
                   help="CPU threads for proxy training (default: the usable CPUs divided "
                        "by --workers, and by the processes on this machine training this "
                        "study, asked every 2 s while training)")
    g.add_argument("--workers", type=int, default=_default("workers"),
                   help="processes on this machine that evaluate candidates at once, sharing "
                        "the study and its cores (latency is then measured beside training; "
                        "docs/search.md)")
    g.add_argument("--proxy-images", type=int, default=_default("proxy_images"),
                   help="training images per epoch (seeded subset of the proxy-train split)")
    g.add_argument("--proxy-epochs", type=int, default=_default("proxy_epochs"),
                   help="proxy epochs")
    g.add_argument("--proxy-batch", type=int, default=_default("proxy_batch"),
                   help="proxy batch size")
    g.add_argument("--proxy-ghost-batches", type=int, default=_default("proxy_ghost_batches"),
                   help="parts each batch trains as, each with its own batch-norm statistics, "
                        "at once on their own CPU threads when this process's share has the "
                        "cores (weights do not depend on how many ran at once while the share "
                        "is below 2 x parts)")
    g.add_argument("--proxy-optimizer", choices=tuple(OPTIMIZER_DEFAULTS),
                   default=_default("proxy_optimizer"),
                   help="the proxy's optimizer (sgd: nas.train's, Nesterov momentum 0.9)")
    g.add_argument("--proxy-lr", type=float, default=None,
                   help="peak learning rate (default: "
                        + ", ".join(f"{k} {v['lr']:g}" for k, v in OPTIMIZER_DEFAULTS.items())
                        + ")")
    g.add_argument("--proxy-weight-decay", type=float, default=None,
                   help="weight decay on convolution and linear weights (default: "
                        + ", ".join(f"{k} {v['weight_decay']:g}"
                                    for k, v in OPTIMIZER_DEFAULTS.items()) + ")")
    g.add_argument("--proxy-final-map", type=int, default=_default("proxy_final_map"),
                   help="the trained network's earliest strides are reduced until its last "
                        "feature map is at least this wide (1: train the deployed strides)")
    g.add_argument("--proxy-clip-grad", type=float, default=_default("proxy_clip_grad"),
                   metavar="NORM", help="clip each proxy step's gradient norm to NORM, as "
                   "nas.train --clip-grad; 0: no clipping")
    g.add_argument("--val-size", type=int, default=_default("val_size"),
                   help="images held out of the training set to score candidates")
    g = p.add_argument_group("results")
    g.add_argument("--name", default=_default("name"),
                   help="run name: results go to runs/<name>/")
    g.add_argument("--runs-dir", default=_default("runs_dir"),
                   help="parent folder of run folders")
    g.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by several workers (default: SQLite in "
                        "runs/<name>/study.db)")
    return p


def config_from_argv(argv: list[str] | None = None) -> SearchConfig:
    """The flags as a SearchConfig (argparse's own errors exit at once); `resolve` checks it."""
    ns = build_parser().parse_args(argv)
    values = vars(ns)
    values["baselines"] = tuple(n.strip() for n in ns.baselines.split(",") if n.strip())
    if values["proxy_clip_grad"] == 0:
        values["proxy_clip_grad"] = None
    return SearchConfig(**values)


def resolve(config: SearchConfig) -> SearchConfig:
    """Check the flags (UsageError names the first bad one), then fill in the defaults that
    depend on other flags. Resolving a resolved configuration changes nothing."""
    check(config)
    return dataclasses.replace(
        config, sampler=config.sampler or DEFAULT_SAMPLER,
        train_device=config.train_device or config.device)


def check(c: SearchConfig) -> None:
    """User errors found before anything is read or written."""
    for flag in ("target_ms", "latency_time", "proxy_lr", "timeout"):
        value = getattr(c, flag)  # NaN fails every comparison, so it must be asked for
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{flag.replace('_', '-')} {value:g}: must be a finite number "
                             f"> 0")
    if c.proxy_weight_decay is not None and not (math.isfinite(c.proxy_weight_decay)
                                                  and c.proxy_weight_decay >= 0):
        raise UsageError(f"--proxy-weight-decay {c.proxy_weight_decay:g}: must be a finite "
                         "number >= 0")
    if c.proxy_clip_grad is not None and not (math.isfinite(c.proxy_clip_grad)
                                              and c.proxy_clip_grad > 0):
        raise UsageError(f"--proxy-clip-grad {c.proxy_clip_grad:g}: must be a finite number > 0, "
                         "or 0 for no clipping")
    for flag in ("trials", "proxy_images", "proxy_epochs", "proxy_batch", "proxy_ghost_batches",
                 "proxy_final_map", "val_size", "startup_trials"):
        if getattr(c, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(c, flag)}: must be >= 1")
    if c.population < 2:
        raise UsageError(f"--population {c.population}: NSGA-II and evolution need at least 2")
    if c.objective == "pareto" and c.sampler == "evolution":
        others = ", ".join(s for s in SAMPLERS if s != "evolution")
        raise UsageError(f"--sampler evolution is single-objective: use --objective reward, "
                         f"or one of {others} for --objective pareto")
    if not 0 <= c.seed <= MAX_SEED:
        raise UsageError(f"--seed {c.seed}: must be from 0 to {MAX_SEED} (numpy's seeds)")
    if c.input_size < 32:
        raise UsageError(f"--input-size {c.input_size}: must be >= 32")
    for flag in ("threads", "train_threads", "workers"):
        value = getattr(c, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    try:
        connect(c.latency_server, c.latency_token_file)
    except LatencyError as e:
        raise UsageError(str(e)) from None
    if not 0 <= c.latency_warm_runs <= MAX_WARM_RUNS:
        raise UsageError(f"--latency-warm-runs {c.latency_warm_runs}: must be from 0 to "
                         f"{MAX_WARM_RUNS}")
    if c.latency_protocol == "ladder" and c.latency_server:
        raise UsageError("--latency-protocol ladder: measured here only for now; with "
                         "--latency-server use interleaved or single")
    if c.threads is not None and c.threads > available_cpus() and not c.latency_server:
        raise UsageError(f"--threads {c.threads}: this process may use only "
                         f"{available_cpus()} CPU(s)")
    if c.proxy_batch > c.proxy_images:
        raise UsageError(f"--proxy-batch {c.proxy_batch}: must be <= --proxy-images "
                         f"{c.proxy_images} (else no training step is taken)")
    if not ProxyBudget.parts_fit(c.proxy_batch, c.proxy_ghost_batches):
        raise UsageError(f"--proxy-ghost-batches {c.proxy_ghost_batches}: must divide "
                         f"--proxy-batch {c.proxy_batch} into parts of at least 2 images "
                         "(batch norm needs 2)")
    if c.objective == "pareto" and c.pruner != "none":
        raise UsageError("--pruner applies to --objective reward only (Optuna does not prune "
                         "multi-objective studies)")
    try:
        c.exponents  # noqa: B018 (the check is the call)
    except ValueError as e:
        raise UsageError(f"--alpha/--beta: {e}") from None
    for flag in ("device", "train_device"):
        value = getattr(c, flag) or ""
        if "cuda" in value and not torch.cuda.is_available():
            raise UsageError(f"--{flag.replace('_', '-')} {value}: no CUDA GPU is available "
                             f"on this machine; use cpu")
    train_device = c.train_device or c.device
    try:
        kind = torch.device(train_device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--train-device {train_device!r}: expected cpu or cuda")
    if not is_plain_folder_name(c.name):
        raise UsageError(f"--name {c.name!r}: must be a plain folder name (no '/', not "
                         f"starting with '.', at most {MAX_NAME_BYTES} bytes)")
    blocked = file_in_the_way(Path(c.runs_dir))
    if blocked:
        raise UsageError(f"--runs-dir {c.runs_dir}: {blocked} is a file, so no run folder "
                         f"can be made under it")
    for name in c.baselines:
        try:
            load_architecture(name)
        except ArchError as e:
            raise UsageError(f"--baselines: {e}") from None
