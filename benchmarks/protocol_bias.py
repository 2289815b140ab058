"""Does the interleaved protocol report what the single one does? (issue #19: latency as
deployed). A deployed network runs request after request, warm, as the single protocol times it;
interleaving switches networks every few runs. Per network, in one process on a quiet machine:
the single protocol's ratio to the reference (each timed alone, before and after, reference
beside candidate) against the interleaved protocol's median ratio, with 0 (as shipped) and more
untimed warm runs at the start of each block (nas.interleaved.WARM_RUNS_PER_BLOCK).

    python benchmarks/protocol_bias.py [--warm 0,2,4,8] [--repeats 2] [--out T.txt]

Reported: interleaved ratio / single ratio - 1 per network and warm-run count (its bias), and
the seconds of measuring per network. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

NETWORKS = ["mobilenet_v3_small", "mobilenet_v3_large", "mnasnet_b1", "mnasnet_a1",
            "mobilenet_v2", "mobilenet_v1", "torchvision:resnet18"]


def single_ms(model, input_size: int, runtime: str) -> float:
    from nas.latency import measure_latency

    return measure_latency(model, input_size, runtime=runtime, min_time_s=1.5,
                           max_time_s=3.0).median_ms


def bias_row(spec: str, warm: list[int], input_size: int, runtime: str) -> dict:
    """The single ratio (cand/ref, each alone, before and after) and, per warm-run count, the
    interleaved median ratio and its seconds."""
    from nas.interleaved import REFERENCE, measure_interleaved
    from nas.latency import network_builder

    cand, ref = network_builder(spec)(), network_builder(REFERENCE)()
    before = single_ms(ref, input_size, runtime), single_ms(cand, input_size, runtime)
    inter = {k: measure_interleaved(cand, input_size, runtime=runtime, reference_ms=1.0,
                                    warm_runs_per_block=k) for k in warm}
    after = single_ms(cand, input_size, runtime), single_ms(ref, input_size, runtime)
    single = (before[1] + after[0]) / (before[0] + after[1])
    return {"single": single, "cand_ms": (before[1] + after[0]) / 2,
            **{k: (r.ratio / single - 1, r.seconds) for k, r in inter.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warm", default="0,2,4,8", help="comma-separated warm runs per block")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from nas.files import save_table
    from nas.host import available_cpus, cpu_name
    from nas.interleaved import REFERENCE, ROUNDS, RUNS_PER_BLOCK

    warm = [int(k) for k in args.warm.split(",")]
    lines = [f"# benchmarks/protocol_bias.py on {cpu_name()} ({available_cpus()} CPUs), "
             f"{time.strftime('%Y-%m-%d %H:%M')}",
             f"# command: python benchmarks/protocol_bias.py {' '.join(argv or sys.argv[1:])}",
             f"# {args.runtime}, {args.input_size}x{args.input_size}, 1 thread, quiet; "
             f"interleaved against {REFERENCE}, {ROUNDS} rounds of {RUNS_PER_BLOCK} timed runs "
             f"per block; bias = interleaved ratio / single ratio - 1", ""]
    header = (f"{'network':<22} {'rep':>3} {'alone ms':>8} {'single ratio':>12} "
              + " ".join(f"{f'warm {k}':>8}" for k in warm)
              + " " + " ".join(f"{f's@{k}':>6}" for k in warm))
    lines += [header, "-" * len(header)]
    biases: dict[int, list[float]] = {k: [] for k in warm}
    seconds: dict[int, list[float]] = {k: [] for k in warm}
    for rep in range(args.repeats):
        for spec in args.networks.split(","):
            row = bias_row(spec, warm, args.input_size, args.runtime)
            for k in warm:
                biases[k].append(row[k][0])
                seconds[k].append(row[k][1])
            lines.append(f"{spec:<22} {rep:>3} {row['cand_ms']:>8.2f} {row['single']:>12.3f} "
                         + " ".join(f"{row[k][0]:>+8.1%}" for k in warm) + " "
                         + " ".join(f"{row[k][1]:>6.1f}" for k in warm))
            print(lines[-1], flush=True)
    lines += ["", f"{'all':<22} largest |bias| "
              + ", ".join(f"warm {k}: {max(np.abs(biases[k])):.1%}" for k in warm),
              f"{'':<22} median |bias|  "
              + ", ".join(f"warm {k}: {np.median(np.abs(biases[k])):.1%}" for k in warm),
              f"{'':<22} s/measure      "
              + ", ".join(f"warm {k}: {np.mean(seconds[k]):.1f}" for k in warm)]
    save_table("\n".join(lines), args.out)  # prints it; writes it with --out
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
