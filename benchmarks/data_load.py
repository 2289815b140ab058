"""Time nas.data: a cold load (empty cache), a cached load, and batch building on the CPU.

    python benchmarks/data_load.py --data ../shared/datasets/cifar10-jpg.tar.gz
    python benchmarks/data_load.py --data ... --out benchmarks/results/data_load.json

Prints one JSON record with the numbers and the context they were measured in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from nas.data import batches, load_data


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _batch_rate(splits, *, batch_size: int, augment: bool, epochs_of: int) -> float:
    """Images per second for building batches only (no model), over `epochs_of` examples."""
    gen = torch.Generator().manual_seed(0)
    it = batches(splits.train, batch_size=batch_size, shuffle=True, augment=augment, generator=gen,
                 mean=splits.mean, std=splits.std, limit=epochs_of)
    _, seconds = _timed(lambda: sum(len(y) for _, y in it))
    return min(epochs_of, len(splits.train)) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/cifar10-jpg.tar.gz")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--examples", type=int, default=20000, help="examples for batch timing")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write the JSON record here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:  # a true cold start, whatever ~/.cache holds
        splits, cold = _timed(lambda: load_data(args.data, cache_dir=cache))
        _, warm = _timed(lambda: load_data(args.data, cache_dir=cache))
    record = {
        "source": splits.source, "sizes": [len(splits.train), len(splits.val), len(splits.test)],
        "cold_load_s": round(cold, 3), "cached_load_s": round(warm, 3),
        "batch_size": args.batch_size,
        "batches_img_per_s_augment": round(_batch_rate(splits, batch_size=args.batch_size,
                                                       augment=True, epochs_of=args.examples)),
        "batches_img_per_s_plain": round(_batch_rate(splits, batch_size=args.batch_size,
                                                     augment=False, epochs_of=args.examples)),
        "memory_format": "channels_last", "device": "cpu", "torch": torch.__version__,
        "torchvision": torchvision.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(record, indent=1))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
