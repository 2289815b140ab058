"""Where does the interleaved ratio's drift between processes come from? (issue #19, item 5)

    python benchmarks/latency_ratio_noise.py --out benchmarks/results/latency_ratio_noise_X.txt

Each of --processes fresh processes converts each network and the reference once (ONNX Runtime,
224x224, 1 thread), warms them up, then repeats the interleaved protocol's rounds
(nas.interleaved.interleaved_rounds: 12 rounds x 4 runs, as a search measures) --repeats times,
and for comparison 36 rounds. The table splits each network's spread of the median ratio into
within a process (sd of repeats, % of the mean) and between processes (range of the process
medians, %). If the between-process range is far above what the within-process sd predicts
for the mean of that many repeats, the drift is a state of the process or machine that more
rounds cannot average out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
NETWORKS = ["mobilenet_v3_small", "mobilenet_v2", "mnasnet_b1", "mobilenet_v3_large"]


def process_worker(networks: list[str], repeats: int, seed: int, reference: str) -> dict:
    import torch

    from nas.arch import load_architecture
    from nas.interleaved import interleaved_rounds
    from nas.latency import _warm_up, latency_context, prepared_runner
    from nas.model import build_model

    context = latency_context(224, runtime="onnxruntime")
    torch.manual_seed(0)  # the same weights in every process; `seed` orders the rounds
    out: dict = {}
    ref_model = build_model(load_architecture(reference), num_classes=1000)
    with prepared_runner(ref_model, context) as (ref, _):
        for name in networks:
            model = build_model(load_architecture(name), num_classes=1000)
            with prepared_runner(model, context) as (cand, _):
                for run in (cand, ref):
                    _warm_up(run, until=time.perf_counter() + 1.0, stop_above_ms=None)
                rows = {}
                for rounds in (12, 36):
                    medians, secs = [], []
                    for i in range(repeats):
                        start = time.perf_counter()
                        ratios, _ = interleaved_rounds(cand, ref, rounds=rounds,
                                                       runs_per_block=4, seed=seed * 100 + i)
                        medians.append(float(np.median(ratios)))
                        secs.append(time.perf_counter() - start)
                    rows[rounds] = {"medians": medians, "seconds": float(np.mean(secs))}
                out[name] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--reference", default="mnasnet_a1", help="a reference name, @width allowed")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.processes < 2 or args.repeats < 2:
        p.error("--processes and --repeats: at least 2 (a spread needs two)")
    networks = args.networks.split(",")
    if args.worker is not None:
        print(json.dumps(process_worker(networks, args.repeats, args.worker, args.reference)))
        return 0
    from nas.files import save_table
    from nas.host import available_cpus, cpu_name

    runs = []
    for seed in range(args.processes):
        done = subprocess.run([sys.executable, str(HERE), "--worker", str(seed), "--networks",
                               args.networks, "--repeats", str(args.repeats),
                               "--reference", args.reference],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = [f"# benchmarks/latency_ratio_noise.py on {cpu_name()} ({available_cpus()} CPUs), "
             f"{time.strftime('%Y-%m-%d %H:%M')}",
             f"# command: python benchmarks/latency_ratio_noise.py "
             f"{' '.join(argv or sys.argv[1:])}",
             f"# ratio to {args.reference}, ONNX Runtime 224x224, 1 thread; {args.processes} fresh "
             f"processes x {args.repeats} repeats of the protocol's rounds (4 runs per block)", "",
             f"{'network':<20} {'rounds':>6} {'within sd':>9} {'sd of mean':>10} "
             f"{'between range':>13}  {'process medians':<30} {'s/measure':>9}"]
    for name in networks:
        for rounds in ("12", "36"):
            per = [np.array(r[name][rounds]["medians"]) for r in runs]
            mean = float(np.mean(np.concatenate(per)))
            within = float(np.sqrt(np.mean([x.var(ddof=1) for x in per]))) / mean
            meds = [float(np.median(x)) for x in per]
            between = (max(meds) - min(meds)) / mean
            secs = float(np.mean([r[name][rounds]["seconds"] for r in runs]))
            lines.append(f"{name:<20} {rounds:>6} {within:>9.2%} "
                         f"{within / np.sqrt(args.repeats):>10.2%} {between:>13.2%}  "
                         f"{' '.join(f'{m:.4f}' for m in meds):<30} {secs:>9.2f}")
    text = "\n".join(lines)
    if args.out:
        save_table(text, args.out)  # prints it too
    else:
        print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
