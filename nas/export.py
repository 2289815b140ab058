"""Export a searched architecture as a config, and the network in a runtime's format.

    python -m nas.export runs/search --best -o arch.yaml
    python -m nas.export runs/search --pareto 0 -o fastest.yaml --network fastest.onnx
    python -m nas.export runs/search -o best.yaml --network best.pte --checkpoint ckpt.pt

`build_model(load_architecture("arch.yaml"))` rebuilds exactly the searched network. The network
file's suffix picks the runtime (.onnx ONNX Runtime, .pte ExecuTorch, .pt2 AOTInductor); it is
converted as latency was measured, loaded back in its runtime and checked against PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import sys
import warnings
from pathlib import Path

import pandas as pd
import torch

from nas.arch import ArchError, Architecture, architecture_text
from nas.cli import HelpFormatter, Parser
from nas.data import DataError, load_data
from nas.files import write_atomic
from nas.interrupts import run_module
from nas.latency import MIN_INPUT_SIZE
from nas.model import build_model
from nas.pareto import (
    baselines_above,
    best_trial_row,
    pareto_frame,
    target_drift_note,
    trials_frame,
)
from nas.results import BaselinesError, load_baselines
from nas.run_folder import CONFIRM_CSV, RunFolderError, load_run_study
from nas.runtimes import (
    PRECISIONS,
    RUNTIMES,
    ConversionError,
    RuntimeUnavailable,
    UnsupportedSetting,
    get_runtime,
)
from nas.runtimes.base import calibration_sample
from nas.train import TrainConfig, trained_arch


class ExportError(ValueError):
    """One line for the user: which run, trial or file, and what is available."""


# the runtime each network file suffix is written for
SUFFIX_RUNTIMES = {rt.suffix: name for name, rt in RUNTIMES.items() if rt.suffix}
FP32_TOLERANCE = 1e-4  # max abs difference to PyTorch, relative to its largest logit
CALIBRATION_IMAGES = 256  # training images that calibrate an int8 export


def select_row(df: pd.DataFrame, *, trial: int | None, pareto: int | None) -> pd.Series:
    """--trial N, --pareto K (0 = fastest point of the front) or, by default, the best reward."""
    done = df[df.state == "COMPLETE"] if len(df) else df
    if not len(done):
        raise ExportError("the run has no completed trials yet")
    if trial is not None:
        rows = done[done.number == trial]
        if not len(rows):
            raise ExportError(f"--trial {trial}: no completed trial with that number; completed: "
                              f"{sorted(done.number.tolist())[:20]}")
        return rows.iloc[0]
    if pareto is not None:
        front = pareto_frame(df)
        if not 0 <= pareto < len(front):
            raise ExportError(f"--pareto {pareto}: the front has {len(front)} points "
                              f"(0 = fastest .. {len(front) - 1} = most accurate)")
        return front.iloc[pareto]
    return best_trial_row(df)


def confirmed_trial(run: Path) -> int:
    """The trial nas.confirm marked confirmed_best in the run's confirm.csv."""
    path = run / CONFIRM_CSV
    if not path.is_file():
        raise ExportError(f"--confirmed: {path} does not exist; run python -m nas.confirm {run} "
                          f"first")
    try:
        df = pd.read_csv(path)
        best = df[df["confirmed_best"].astype(bool)]
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"--confirmed: {path}: not nas.confirm's table "
                          f"({type(e).__name__})") from None
    if not len(best):
        raise ExportError(f"--confirmed: {path}: no candidate has finished its confirmation yet")
    return int(best.trial.iloc[0])


def row_architecture(row: pd.Series) -> Architecture:
    """The trial's architecture as searched (stored as a dict, or JSON in CSV rows)."""
    value = row["arch_dict"]
    return Architecture.from_dict(json.loads(value) if isinstance(value, str) else value)


def network_bytes(arch: Architecture, *, num_classes: int, input_size: int,
                  checkpoint: Path | None, onnx: bool, torchscript: bool) -> dict[str, bytes]:
    """The exported files in memory, so a failure midway leaves none of them on disk."""
    model = (checkpoint_model(arch, checkpoint, num_classes=num_classes, input_size=input_size)
             if checkpoint is not None else build_model(arch, num_classes=num_classes))
    model.eval()
    x = torch.zeros(1, 3, input_size, input_size)
    out = {}
    with warnings.catch_warnings():  # torch marks TorchScript and the legacy exporter deprecated
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        if torchscript:
            torch.jit.save(torch.jit.trace(model, x), buffer := io.BytesIO())
            out["torchscript"] = buffer.getvalue()
        if onnx:
            torch.onnx.export(model, (x,), buffer := io.BytesIO(), input_names=["image"],
                              output_names=["logits"], dynamo=False)
            out["onnx"] = buffer.getvalue()
    return out


def checkpoint_model(arch: Architecture, checkpoint: Path, *, num_classes: int,
                     input_size: int) -> torch.nn.Module:
    """The network nas.train trained (strides adapted to its input size; same weight shapes)."""
    try:
        ckpt = torch.load(checkpoint, weights_only=True, map_location="cpu")
        trained = Architecture.from_json(ckpt["arch"])
        cfg = TrainConfig(**json.loads(ckpt["config"]))
    except Exception as e:  # unpickler, zip and key errors all mean "not our checkpoint"
        raise ExportError(f"--checkpoint {checkpoint}: not a nas.train checkpoint "
                          f"({type(e).__name__})") from None
    if dataclasses.replace(trained, name=arch.name) != arch:  # the name is a label only
        raise ExportError(f"--checkpoint {checkpoint}: trained architecture differs from the "
                          f"exported one ({trained.to_str()})")
    model = build_model(trained_arch(arch, cfg, input_size), num_classes=num_classes)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise ExportError(f"--checkpoint {checkpoint}: its weights do not fit a {num_classes}-"
                          f"class network ({type(e).__name__})") from None
    return model


def runtime_network(arch: Architecture, path: Path, *, num_classes: int, input_size: int,
                    checkpoint: Path | None, precision: str,
                    data_source: str | None) -> tuple[bytes, str]:
    """The network file for `path`'s runtime, loaded back there and checked against PyTorch on
    one batch; returns its bytes and the check's one-line summary."""
    runtime = get_runtime(SUFFIX_RUNTIMES[path.suffix])
    model = (checkpoint_model(arch, checkpoint, num_classes=num_classes, input_size=input_size)
             if checkpoint is not None else build_model(arch, num_classes=num_classes))
    model.eval()
    x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    calibration = None
    if precision == "int8":
        calibration = calibration_images(data_source, input_size)
        x = calibration[:1]
    try:
        compiled = runtime.compile(model, x, precision=precision, calibration=calibration)
    except (RuntimeUnavailable, UnsupportedSetting, ConversionError) as e:
        raise ExportError(f"--network {path}: {e}") from None
    with torch.inference_mode():
        expected = model(x)
    diff = (compiled.predict(x) - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if precision == "fp32" and not diff <= FP32_TOLERANCE * scale:
        raise ExportError(f"--network {path}: {runtime.name}'s outputs differ from PyTorch's by "
                          f"up to {diff:.3g} (allowed {FP32_TOLERANCE * scale:.3g}); not written")
    return compiled.artifact, (f"{path} ({runtime.name} {precision}, input {input_size}x"
                               f"{input_size}; max abs difference to PyTorch {diff:.2g})")


def calibration_images(source: str | None, input_size: int) -> torch.Tensor:
    """Training images of --data (a seeded draw), normalised, resized to the network's input."""
    try:
        data = load_data(source, val_size=0)
    except DataError as e:
        raise ExportError(f"--data: {str(e).splitlines()[0]}") from None
    x = calibration_sample(data.train, CALIBRATION_IMAGES, mean=data.mean, std=data.std)
    if x.shape[-1] != input_size:
        x = torch.nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear",
                                            align_corners=False)
    return x.contiguous()


def write_all(files: list[tuple[str, Path, str | bytes]]) -> None:
    """Each file atomically; if one fails, remove those this call wrote: all or nothing."""
    written: list[Path] = []
    try:
        for flag, path, data in files:
            try:
                written.append(write_atomic(path, data))
            except OSError as e:
                raise ExportError(f"{flag} {path}: cannot be written ({e.strerror or e})"
                                  ) from None
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def check_paths(paths: dict[str, Path | None]) -> None:
    """Every file flag names a file in an existing folder, each its own: before any write."""
    given = {flag: path for flag, path in paths.items() if path is not None}
    for flag, path in given.items():
        if path.is_dir():
            raise ExportError(f"{flag} {path}: is a folder; pass a file name")
        if not path.parent.is_dir():
            raise ExportError(f"{flag} {path}: folder {path.parent} does not exist")
    seen: dict[Path, str] = {}
    for flag, path in given.items():
        other = seen.setdefault(path.resolve(), flag)
        if other != flag:
            raise ExportError(f"{flag} {path}: the same file as {other}; each needs its own")


def check_args(args: argparse.Namespace) -> None:
    """User errors found before the run is read or anything is written."""
    out = Path(args.output)
    if out.suffix not in (".yaml", ".yml", ".json"):
        raise ExportError(f"-o {out}: must end in .yaml, .yml or .json")
    check_paths({"-o": out, "--onnx": args.onnx, "--torchscript": args.torchscript,
                 "--network": args.network, "--checkpoint": args.checkpoint})
    networks = args.onnx or args.torchscript or args.network
    if args.network is not None and args.network.suffix not in SUFFIX_RUNTIMES:
        raise ExportError(f"--network {args.network}: the suffix picks the runtime; expected "
                          + ", ".join(f"{s} ({n})" for s, n in SUFFIX_RUNTIMES.items()))
    if args.checkpoint and not networks:
        raise ExportError("--checkpoint only applies with --network, --onnx or --torchscript")
    if args.precision == "int8" and args.network is None:
        raise ExportError("--precision int8 applies to --network (.onnx or .pte)")
    if args.precision == "int8" and args.data is None:
        raise ExportError("--precision int8 calibrates on training images: pass --data")
    if args.input_size is not None and args.input_size < MIN_INPUT_SIZE:
        raise ExportError(f"--input-size {args.input_size}: must be an integer >= "
                          f"{MIN_INPUT_SIZE} (the networks downsample {MIN_INPUT_SIZE}x)")
    if args.input_size is not None and not networks:
        raise ExportError("--input-size only applies with --network, --onnx or --torchscript")
    if args.onnx and importlib.util.find_spec("onnx") is None:
        raise ExportError("--onnx needs the onnx package: pip install -e . (nas depends on it)")
    if args.checkpoint and not args.checkpoint.is_file():
        raise ExportError(f"--checkpoint {args.checkpoint}: no such file")


def build_parser() -> argparse.ArgumentParser:
    """Flags, with their defaults shown in --help."""
    p = Parser(prog="nas.export", description=__doc__.split("\n\n")[0],
               formatter_class=HelpFormatter)
    p.add_argument("run", help="run folder, e.g. runs/search")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true", help="best reward (the default)")
    which.add_argument("--trial", type=int, default=None, help="trial number")
    which.add_argument("--pareto", type=int, default=None,
                       help="K-th point of the Pareto front, 0 = fastest")
    which.add_argument("--confirmed", action="store_true",
                       help="the candidate with the best confirmed reward (nas.confirm's "
                            "confirm.csv)")
    p.add_argument("-o", "--output", required=True, help="architecture file (.yaml or .json)")
    p.add_argument("--storage", default=None, help="Optuna storage URL if not the run's own")
    p.add_argument("--network", type=Path, default=None,
                   help="also write the network for its runtime, picked by the suffix: .onnx "
                        "(ONNX Runtime), .pte (ExecuTorch, XNNPACK), .pt2 (AOTInductor); "
                        "checked against PyTorch's outputs on one batch")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="int8: --network statically quantized by its runtime's quantizer, "
                        "calibrated on a seeded draw of --data's training images")
    p.add_argument("--data", default=None, help="training images for int8 calibration "
                   "(as nas.search --data)")
    p.add_argument("--onnx", type=Path, default=None,
                   help="also write the network as ONNX (legacy exporter; prefer --network)")
    p.add_argument("--torchscript", type=Path, default=None,
                   help="also write TorchScript (deprecated by PyTorch; prefer --network .pt2)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="nas.train checkpoint.pt whose weights go into the network")
    p.add_argument("--input-size", type=int, default=None,
                   help=f"input size (>= {MIN_INPUT_SIZE}) of the network if not the run's "
                        f"deployment size, or 32 with --checkpoint")
    return p


def export(args: argparse.Namespace) -> str:
    """Read the run, then write every output or none; returns what was exported."""
    study, meta = load_run_study(Path(args.run), args.storage)
    trial = confirmed_trial(Path(args.run)) if args.confirmed else args.trial
    df = trials_frame(study)
    row = select_row(df, trial=trial, pareto=args.pareto)
    # a config names where it came from: <run>-trial-<n>
    name = f"{meta.get('study_name', Path(args.run).name)}-trial-{int(row['number'])}"
    arch = dataclasses.replace(row_architecture(row), name=name)
    out = Path(args.output)
    # as save_architecture, but written together with the networks: all files or none
    files = [("-o", out, architecture_text(arch, out))]
    size = args.input_size
    if size is None:
        size = 32 if args.checkpoint else meta.get("settings", {}).get("input_size", 224)
    checked = ""
    if args.network:
        data, checked = runtime_network(
            arch, args.network, num_classes=meta.get("num_classes", 10), input_size=size,
            checkpoint=args.checkpoint, precision=args.precision, data_source=args.data)
        files.append(("--network", args.network, data))
        checked = f"; {checked}"
    if args.onnx or args.torchscript:
        networks = network_bytes(arch, num_classes=meta.get("num_classes", 10),
                                 input_size=size, checkpoint=args.checkpoint,
                                 onnx=args.onnx is not None,
                                 torchscript=args.torchscript is not None)
        files += [(f"--{kind}", path, networks[kind]) for kind, path in
                  (("torchscript", args.torchscript), ("onnx", args.onnx)) if path is not None]
    write_all(files)
    line = f"trial {int(row['number'])}: {arch.to_str()} -> {out}{checked}"
    best = trial is None and args.pareto is None
    notes = [drift_note(df, meta.get("settings", {})), baselines_note(Path(args.run), row)] \
        if best else []
    return "\n".join([line, *(n for n in notes if n)])


def baselines_note(run: Path, row: pd.Series) -> str | None:
    """The baselines that scored above the exported best trial in the search (the search's
    summary says so at its end too); a damaged baselines.csv does not stop an export."""
    try:
        base = load_baselines(run)
    except BaselinesError:
        return None
    above = baselines_above(base, float(row["reward"]))
    if not len(above):
        return None
    names = ", ".join(f"{b} ({r:.4f})" for b, r in zip(above["baseline"], above["reward"],
                                                       strict=True))
    return (f"note: in the search the baseline{'s' if len(above) > 1 else ''} {names} scored "
            f"above this trial's reward {float(row['reward']):.4f}; nas.confirm --match-latency "
            f"compares them by full training at equal latency.")


def drift_note(df: pd.DataFrame, settings: dict) -> str | None:
    """The search's note on a best trial well above T (nas.search prints it at the end of the
    search), with the export's own way to a network nearer T."""
    if settings.get("objective") != "reward" or not settings.get("target_ms") \
            or settings.get("beta") is None:
        return None
    note = target_drift_note(df, settings["target_ms"], settings["beta"])
    return note and (f"{note} Or export a faster member of the front: --pareto K "
                     f"(0 = fastest; pareto.csv lists them).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        print(export(args))
    except (ExportError, RunFolderError, ArchError, DataError) as e:
        print(f"nas.export: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_module("nas.export")
