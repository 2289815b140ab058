"""Full training of one architecture on the whole training set, scored on the test set.

    python -m nas.train runs/search/best.yaml --epochs 30 --data cifar10-jpg.tar.gz

Writes runs/<name>/checkpoint.pt (a dict of state_dicts, loadable with weights_only=True) after
every epoch and runs/<name>/metrics.json at the end; the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nas.arch import ArchError, Architecture, load_architecture
from nas.cli import (
    MAX_NAME_BYTES,
    MAX_SEED,
    HelpFormatter,
    Parser,
    file_in_the_way,
    folder_name,
    is_plain_folder_name,
    oserror_line,
)
from nas.data import DataError, DataSplits, batches, load_data
from nas.files import make_folders, remove_if_empty, write_atomic
from nas.host import failed_allocation, is_out_of_memory, pin_malloc_thresholds
from nas.interrupts import INTERRUPTED, catch_stop_signals, interrupt_status
from nas.model import TooLargeError, build_model
from nas.proxy import CandidateFailed, ProxyBudget, proxy_arch, top1_accuracy, training_model
from nas.runtimes import (
    RUNTIMES,
    ConversionError,
    RuntimeUnavailable,
    UnsupportedSetting,
    get_runtime,
)
from nas.runtimes.accuracy import CALIBRATION_IMAGES, calibration_count, runtime_accuracy

INT8_RUNTIMES = tuple(n for n, r in RUNTIMES.items() if "int8" in r.precisions)


class TrainError(ValueError):
    """A bad flag or path: one line, exit 2, no run folder left behind."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a full run (units in comments)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1  # peak SGD learning rate: linear warm-up over the first epoch (at most a
    # tenth of all steps), then cosine-annealed towards 0 at the end of the last step
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    final_map: int = 2  # train the 32x32 adaptation that ends in a 2x2 map (nas.proxy); full
    # training wants accuracy more than speed, unlike the proxy's deployed-stride default
    seed: int = 0
    clip_grad: float | None = 1.0  # largest gradient norm per step (timm's --clip-grad); None:
    # no clipping (the recipe until 2026-12-06). Unclipped, MnasNet-form networks rose above
    # chance loss in the warm-up and the default space's best trained to 52.8% in 20 epochs;
    # clipped, 79.1%, while mobilenet_v2@0.85 and mobilenet_v3_large@0.9 moved +0.3 and -0.9
    # (training_start_zen3.txt, search_outcome_mnasnet_clip_zen3.txt; docs/confirm.md)


def train(arch: Architecture, run_dir: Path, cfg: TrainConfig, *, data, device: str = "cpu",
          progress: bool = True) -> dict:
    """Train (resuming from run_dir/checkpoint.pt when present) and return the metrics."""
    torch.manual_seed(cfg.seed)
    pin_malloc_thresholds()  # as nas.proxy: no page faults in every step
    trained = trained_arch(arch, cfg, data.train.images.shape[-1])
    model = training_model(trained, data.num_classes, device=device)
    steps = max(1, len(data.full_train) // cfg.batch_size)
    optimizer, scheduler = _optimizer(model, cfg, steps)
    ckpt_path = run_dir / "checkpoint.pt"
    start, history = _resume(ckpt_path, arch, cfg, model, optimizer, scheduler, data)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    amp = torch.device(device).type == "cuda"
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        # One generator per epoch: a resumed run sees exactly the batches it would have seen.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        model.train()
        bar = tqdm(batches(data.full_train, batch_size=cfg.batch_size, shuffle=True, augment=True,
                           generator=gen, drop_last=True, device=device, mean=data.mean,
                           std=data.std),
                   total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False)
        total = 0.0
        for x, y in bar:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            value = loss.item()  # one device sync per step
            if not math.isfinite(value):
                raise ArchError(f"training diverged in epoch {epoch + 1} (loss {value}); "
                                f"try a lower --lr")
            total += value
            bar.set_postfix(loss=f"{value:.3f}")
        mean_loss = total / steps
        acc = top1_accuracy(model, data.test, device=device, bf16=amp, mean=data.mean,
                            std=data.std)
        history.append({"epoch": epoch + 1, "loss": mean_loss, "test_accuracy": acc,
                        "seconds": time.perf_counter() - t0})
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {mean_loss:.4f}  test acc {acc:.4f}  "
              f"{history[-1]['seconds']:.0f}s", flush=True)
        _save(ckpt_path, arch, cfg, model, optimizer, scheduler, epoch + 1, history, data)
    return {"arch": arch.to_str(), "trained_arch": trained.to_str(), "epochs": cfg.epochs,
            "test_accuracy": history[-1]["test_accuracy"] if history else None,
            "history": history, "data": data.source, "device": device, "config": cfg.__dict__}


def int8_metrics(arch: Architecture, run_dir: Path, cfg: TrainConfig, data: DataSplits,
                 runtime: str) -> dict:
    """Test accuracy of the last checkpoint's network quantized to int8 by `runtime`."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True, map_location="cpu")
    model = build_model(trained_arch(arch, cfg, data.train.images.shape[-1]),
                        num_classes=data.num_classes)
    model.load_state_dict(ckpt["model"])
    try:
        acc = runtime_accuracy(model, data.test, data.full_train, runtime=runtime,
                               precision="int8", mean=data.mean, std=data.std)
    except (ConversionError, RuntimeUnavailable, UnsupportedSetting) as e:
        raise TrainError(f"--int8 {runtime}: {e}") from None
    return {"runtime": runtime, "version": get_runtime(runtime).version(), "precision": "int8",
            "calibration_images": calibration_count(len(data.full_train)),
            "test_accuracy": acc}


def trained_arch(arch: Architecture, cfg: TrainConfig, input_size: int) -> Architecture:
    """The network this config trains at this input size (export rebuilds it from a checkpoint)."""
    return proxy_arch(arch, ProxyBudget(final_map=cfg.final_map), input_size)


def _optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    total = cfg.epochs * steps_per_epoch
    warm = min(steps_per_epoch, max(1, total // 10))  # a 1-epoch run must still anneal

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        # as CosineAnnealingLR over the decay steps: the last step runs just above 0
        return 0.5 * (1 + math.cos(math.pi * (step - warm + 1) / (total - warm + 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _data_record(data) -> str:
    """What a resumed run must train on again, in terms that survive moving the files."""
    return json.dumps({"classes": list(data.classes), "train": len(data.full_train),
                       "test": len(data.test), "image": list(data.train.images.shape[1:]),
                       "mean": [round(v, 6) for v in data.mean],
                       "std": [round(v, 6) for v in data.std]})


def _save(path: Path, arch, cfg: TrainConfig, model, optimizer, scheduler, epoch: int,
          history: list, data) -> None:
    """Atomic and durable: an interrupt or power cut mid-write leaves the previous checkpoint."""
    buffer = io.BytesIO()
    torch.save({"arch": arch.to_json(), "config": json.dumps(cfg.__dict__),
                "data": _data_record(data), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "history": json.dumps(history),
                # dropout's random stream, so a resumed run trains exactly as an uninterrupted one
                "rng": torch.get_rng_state(), "cuda_rng": _cuda_rng(model)}, buffer)
    write_atomic(path, buffer.getvalue())


def _cuda_rng(model: nn.Module) -> torch.Tensor | list:
    """The training GPU's RNG state (dropout on CUDA draws from it); [] when training on CPU."""
    device = next(model.parameters()).device
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else []


def _resume(path: Path, arch, cfg: TrainConfig, model, optimizer, scheduler,
            data) -> tuple[int, list]:
    if not path.exists():
        return 0, []
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        saved_arch, saved_cfg = Architecture.from_json(ckpt["arch"]), json.loads(ckpt["config"])
    except Exception as e:
        raise ArchError(f"{path}: not a nas.train checkpoint ({type(e).__name__})") from None
    if saved_arch != arch:
        raise ArchError(f"{path}: checkpoint is of another architecture; use another --name")
    # epochs too: the cosine schedule spans them, so a changed count is a different run
    changed = [k for k, v in cfg.__dict__.items() if saved_cfg.get(k) != v]
    if changed:
        k = changed[0]
        hint = (" (--clip-grad 0 trains unclipped, as every run before 2026-12-06)"
                if k == "clip_grad" else "")
        raise ArchError(f"{path}: checkpoint was trained with {k}={saved_cfg.get(k)}, not "
                        f"{getattr(cfg, k)}; use the same settings{hint} or another --name")
    if "data" in ckpt and json.loads(ckpt["data"]) != json.loads(_data_record(data)):
        raise ArchError(f"{path}: checkpoint was trained on other data (classes, sizes or "
                        "normalisation differ); use the same --data or another --name")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"])
    device = next(model.parameters()).device
    if device.type == "cuda" and isinstance(ckpt.get("cuda_rng"), torch.Tensor):
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    print(f"resuming {path} after epoch {ckpt['epoch']}", flush=True)
    return int(ckpt["epoch"]), json.loads(ckpt["history"])


def build_parser() -> argparse.ArgumentParser:
    """Flags, with their defaults shown in --help."""
    d = TrainConfig()
    p = Parser(prog="nas.train", description=__doc__.split("\n\n")[0],
               formatter_class=HelpFormatter)
    p.add_argument("config", help="architecture .yaml/.json (e.g. runs/<name>/best.yaml) or a "
                   "reference name")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per SGD step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, > 0")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, metavar="NORM",
                   help="clip each step's gradient norm to NORM; 0: no clipping (the recipe "
                        "before 2026-12-06)")
    p.add_argument("--final-map", type=int, default=d.final_map,
                   help="reduce the earliest strides until the last feature map is at least "
                        "this wide (1: the deployed strides)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of the initial weights, batch order and augmentation "
                        f"(0 to {MAX_SEED})")
    p.add_argument("--data", default=None, help="as nas.search --data")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    p.add_argument("--name", default=None,
                   help="run folder under --runs-dir if not train-<config name>")
    p.add_argument("--runs-dir", default="runs", help="parent folder of run folders")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--int8", choices=INT8_RUNTIMES, default=None, metavar="RUNTIME",
                   help="after training, also score the network statically quantized to int8 "
                        f"by this runtime's quantizer ({', '.join(INT8_RUNTIMES)}), calibrated "
                        f"on {CALIBRATION_IMAGES} training images: the accuracy the deployed "
                        "int8 network keeps (metrics.json: int8)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """User errors found before the data is loaded or anything is written."""
    for flag in ("epochs", "batch_size", "final_map"):
        if getattr(args, flag) < 1:
            raise TrainError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise TrainError(f"--lr {args.lr:g}: must be a finite number > 0")
    if not 0 <= args.seed <= MAX_SEED:
        raise TrainError(f"--seed {args.seed}: must be in 0..{MAX_SEED}")
    if not (math.isfinite(args.clip_grad) and args.clip_grad >= 0):
        raise TrainError(f"--clip-grad {args.clip_grad:g}: must be a finite number > 0, or 0 "
                         "for no clipping")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is available on this machine; use cpu")
    if args.name is not None and not is_plain_folder_name(args.name):
        raise TrainError(f"--name {args.name!r}: must be a plain folder name (no '/', not "
                         f"starting with '.', at most {MAX_NAME_BYTES} bytes)")
    if args.int8:
        try:
            get_runtime(args.int8).check(precision="int8")
        except (RuntimeUnavailable, UnsupportedSetting) as e:
            raise TrainError(f"--int8 {args.int8}: {e}") from None
    blocked = file_in_the_way(Path(args.runs_dir))
    if blocked:
        raise TrainError(f"--runs-dir {args.runs_dir}: {blocked} is a file, not a folder")


def prepare(args: argparse.Namespace) -> tuple[Architecture, DataSplits, TrainConfig, Path]:
    """Everything that can fail on user input, before the run folder is touched."""
    check_args(args)
    arch = load_architecture(args.config)
    data = load_data(args.data, val_size=0)  # full training uses every training image
    if args.batch_size > len(data.full_train):
        raise TrainError(f"--batch-size {args.batch_size}: must be <= the "
                         f"{len(data.full_train)} training images")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      final_map=args.final_map, seed=args.seed,
                      clip_grad=args.clip_grad or None)
    default = f"train-{arch.name or Path(args.config).stem}"  # as before, when it is plain
    name = args.name or (default if is_plain_folder_name(default) else folder_name(default))
    return arch, data, cfg, Path(args.runs_dir) / name


def make_run_dir(run_dir: Path) -> list[Path]:
    """Make the run folder; returns the folders this call created, deepest first."""
    try:
        return make_folders(run_dir)
    except OSError as e:
        raise TrainError(f"--runs-dir {run_dir.parent}: cannot make the run folder {run_dir} "
                         f"({e.strerror or e})") from None


def interrupted(run_dir: Path | None) -> int:
    """Say whether the same command can resume, as the user will want to know."""
    ckpt = run_dir / "checkpoint.pt" if run_dir else None
    kept = (f"; {ckpt} holds the last finished epoch, and the same command resumes from it"
            if ckpt and ckpt.exists() else "")
    print(f"nas.train: interrupted{INTERRUPTED.label()}{kept}", file=sys.stderr)
    return interrupt_status()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir, created = None, []
    try:
        arch, data, cfg, run_dir = prepare(args)
        created = make_run_dir(run_dir)
        try:
            metrics = train(arch, run_dir, cfg, data=data, device=args.device,
                            progress=not args.no_progress)
        except TooLargeError as e:
            raise TrainError(f"{args.config}: {e}") from None
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            raise TrainError(f"{args.config}: out of memory while training "
                             f"({failed_allocation(e)}); try a smaller --batch-size") from None
        write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        if args.int8:  # after the float32 metrics are safe: quantizing may still fail
            metrics["int8"] = int8_metrics(arch, run_dir, cfg, data, args.int8)
            write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    except CandidateFailed as e:
        print(f"nas.train: error: {e}; try a lower --lr", file=sys.stderr)
        return 2
    except (TrainError, ArchError, DataError) as e:
        print(f"nas.train: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk: the checkpoint's write, its read
        print(f"nas.train: error: {oserror_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(run_dir)
    finally:
        remove_if_empty(created)
    print(f"test accuracy {metrics['test_accuracy']:.4f}; checkpoint {run_dir / 'checkpoint.pt'}")
    if "int8" in metrics:
        q = metrics["int8"]
        print(f"int8 test accuracy {q['test_accuracy']:.4f} ({q['runtime']} {q['version']}, "
              f"{q['test_accuracy'] - metrics['test_accuracy']:+.4f} against float32)")
    return 0


if __name__ == "__main__":  # the package module, not this __main__ copy: see run_module
    from nas import train as _tool

    catch_stop_signals()
    sys.exit(_tool.main())
