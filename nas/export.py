"""Export a searched architecture as a config (and optionally as an ONNX / TorchScript network).

    python -m nas.export runs/search --best -o arch.yaml
    python -m nas.export runs/search --pareto 0 -o fastest.yaml --onnx fastest.onnx

`build_model(load_architecture("arch.yaml"))` rebuilds exactly the searched network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import optuna
import pandas as pd
import torch

from nas.arch import ArchError, Architecture, save_architecture
from nas.model import build_model
from nas.pareto import best_trial_row, pareto_frame, trials_frame
from nas.train import TrainConfig, trained_arch


class ExportError(ValueError):
    """One line for the user: which run, trial or file, and what is available."""


def load_run_study(run_dir: Path, storage: str | None = None) -> tuple[optuna.Study, dict]:
    """The study behind a run folder, from the storage named in its run.json."""
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        raise ExportError(f"{run_dir}: not a run folder (no run.json); pass runs/<name>")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta_path}: unreadable ({e})") from None
    url = storage or meta.get("storage") or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    name = meta.get("study_name", run_dir.name)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise ExportError(f"{run_dir}: storage {url} holds no study {name!r}") from None
    return study, meta


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


def row_architecture(row: pd.Series) -> Architecture:
    value = row["arch_dict"]
    return Architecture.from_dict(json.loads(value) if isinstance(value, str) else value)


def export_network(arch: Architecture, *, num_classes: int, input_size: int,
                   checkpoint: Path | None, onnx: Path | None, torchscript: Path | None) -> None:
    """ONNX / TorchScript of the network, with trained weights from a nas.train checkpoint."""
    if checkpoint is not None:
        ckpt = torch.load(checkpoint, weights_only=True, map_location="cpu")
        trained = Architecture.from_json(ckpt["arch"])
        if trained != arch:
            raise ExportError(f"--checkpoint {checkpoint}: trained architecture differs from the "
                              f"exported one ({trained.to_str()})")
        # The network nas.train trained (strides adapted to its input size; same weight shapes).
        cfg = TrainConfig(**json.loads(ckpt["config"]))
        model = build_model(trained_arch(arch, cfg, input_size), num_classes=num_classes)
        model.load_state_dict(ckpt["model"])
    else:
        model = build_model(arch, num_classes=num_classes)
    model.eval()
    x = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():  # torch marks TorchScript and the legacy exporter deprecated
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        if torchscript is not None:
            torch.jit.trace(model, x).save(str(torchscript))
        if onnx is not None:
            torch.onnx.export(model, (x,), str(onnx), input_names=["image"],
                              output_names=["logits"], dynamo=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nas.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder, e.g. runs/search")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true", help="best reward (the default)")
    which.add_argument("--trial", type=int, default=None, help="trial number")
    which.add_argument("--pareto", type=int, default=None,
                       help="K-th point of the Pareto front, 0 = fastest")
    p.add_argument("-o", "--output", required=True, help="architecture file (.yaml or .json)")
    p.add_argument("--storage", default=None, help="Optuna storage URL if not the run's own")
    p.add_argument("--onnx", type=Path, default=None, help="also write the network as ONNX")
    p.add_argument("--torchscript", type=Path, default=None, help="also write TorchScript")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="nas.train checkpoint.pt whose weights go into --onnx/--torchscript")
    p.add_argument("--input-size", type=int, default=None,
                   help="input size of the exported network (default: the run's deployment size, "
                        "or 32 with --checkpoint)")
    args = p.parse_args(argv)
    out = Path(args.output)
    if out.suffix not in (".yaml", ".yml", ".json"):
        p.error(f"-o {out}: must end in .yaml, .yml or .json")
    for flag, path in (("-o", out), ("--onnx", args.onnx), ("--torchscript", args.torchscript)):
        if path is not None and not Path(path).parent.is_dir():
            p.exit(2, f"nas.export: error: {flag} {path}: folder {Path(path).parent} does not "
                      f"exist\n")
    if args.checkpoint and not (args.onnx or args.torchscript):
        p.exit(2, "nas.export: error: --checkpoint only applies with --onnx or --torchscript\n")
    if args.onnx and importlib.util.find_spec("onnx") is None:
        p.exit(2, "nas.export: error: --onnx needs the onnx package: pip install 'nas[onnx]'\n")
    if args.checkpoint and not args.checkpoint.is_file():
        p.exit(2, f"nas.export: error: --checkpoint {args.checkpoint}: no such file\n")
    try:
        study, meta = load_run_study(Path(args.run), args.storage)
        row = select_row(trials_frame(study), trial=args.trial, pareto=args.pareto)
        arch = row_architecture(row)
        settings = meta.get("settings", {})
        size = args.input_size or (32 if args.checkpoint else settings.get("input_size", 224))
        if args.onnx or args.torchscript:
            export_network(arch, num_classes=int(meta.get("num_classes", 10)), input_size=size,
                           checkpoint=args.checkpoint, onnx=args.onnx,
                           torchscript=args.torchscript)
        save_architecture(arch, out)
    except (ExportError, ArchError) as e:
        print(f"nas.export: error: {e}", file=sys.stderr)
        return 2
    print(f"trial {int(row['number'])}: {arch.to_str()} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
