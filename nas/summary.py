"""Per-stage table of a network (block string, output shape, parameters, multiply-adds).

    python -m nas.summary mnasnet_a1
    python -m nas.summary runs/demo/best.yaml --input-size 32 --num-classes 10
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nas.arch import ArchError, Architecture, load_architecture, reference_names
from nas.cli import HelpFormatter, Parser
from nas.cost import count_params
from nas.host import failed_allocation, is_out_of_memory
from nas.interrupts import run_module
from nas.model import TooLargeError, build_model


@dataclass(frozen=True)
class StageRow:
    """One summary row: the stem, one BlockSpec (all its repeats), the head or the classifier."""

    stage: str
    spec: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def _stages(arch: Architecture, model: nn.Module) -> list[tuple[str, str, list[nn.Module]]]:
    """Group the flat feature layers back into the architecture's stages."""
    feats = list(model.features)
    stages = [("stem", f"conv_k{arch.stem.kernel}_s{arch.stem.stride}_c{arch.stem.filters}",
               feats[:1])]
    i = 1
    for b, spec in enumerate(arch.blocks):
        stages.append((f"block{b}", spec.to_str(), feats[i:i + spec.repeats]))
        i += spec.repeats
    if arch.head.filters:
        stages.append(("head", f"conv_k1_c{arch.head.filters}_{arch.head.act}", feats[i:]))
    return stages


def summarize(arch: Architecture, *, input_size: int = 224,
              num_classes: int = 1000) -> pd.DataFrame:
    """Run one image through each stage, counting parameters and torch-counted multiply-adds."""
    model = build_model(arch, num_classes=num_classes).eval()
    x = torch.zeros(1, 3, input_size, input_size)
    rows = []
    with torch.no_grad():
        for stage, spec, layers in _stages(arch, model):
            rows.append(_run_stage(stage, spec, nn.Sequential(*layers), x))
            x = nn.Sequential(*layers)(x)
        pooled = model.pool(x).flatten(1)
        rows.append(_run_stage("classifier", f"pool_fc{num_classes}", model.classifier, pooled))
    return pd.DataFrame([r.__dict__ for r in rows])


def _run_stage(stage: str, spec: str, module: nn.Module, x: torch.Tensor) -> StageRow:
    with FlopCounterMode(display=False) as counter:
        y = module(x)
    return StageRow(stage, spec, tuple(y.shape[1:]), count_params(module),
                    counter.get_total_flops() // 2)


def format_table(df: pd.DataFrame) -> str:
    """torchinfo-like text table with totals."""
    shown = df.assign(
        output_shape=df.output_shape.map(lambda s: "x".join(map(str, s))),
        params=df.params.map("{:,}".format),
        macs=df.macs.map(lambda m: f"{m / 1e6:,.2f}M"),
    )
    total = (f"Total: {df.params.sum():,} parameters ({df.params.sum() / 1e6:.2f} M), "
             f"{df.macs.sum() / 1e6:,.1f} M multiply-adds")
    return shown.to_string(index=False) + "\n" + total


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="nas.summary", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
        epilog=f"Reference networks: {', '.join(reference_names())}")
    parser.add_argument("config", help="architecture .yaml/.json file, or a reference name")
    parser.add_argument("--input-size", type=int, default=224, help="square input resolution")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    args = parser.parse_args(argv)
    if args.input_size < 8:
        parser.error(f"--input-size {args.input_size}: must be >= 8")
    if args.num_classes < 1:
        parser.error(f"--num-classes {args.num_classes}: must be >= 1")
    try:
        arch = load_architecture(args.config)
    except ArchError as e:
        parser.exit(2, f"nas.summary: error: {e}\n")
    if args.input_size // arch.total_stride < 1:
        parser.error(f"--input-size {args.input_size}: too small for total stride "
                     f"{arch.total_stride} of {args.config}")
    try:
        table = format_table(summarize(arch, input_size=args.input_size,
                                       num_classes=args.num_classes))
    except TooLargeError as e:
        parser.exit(2, f"nas.summary: error: {args.config}: {e}\n")
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        parser.exit(2, f"nas.summary: error: {args.config}: out of memory at --input-size "
                       f"{args.input_size} ({failed_allocation(e)})\n")
    print(f"{arch.name or args.config} at {args.input_size}x{args.input_size}")
    print(table)
    return 0


if __name__ == "__main__":
    run_module("nas.summary")
