"""Where does the interleaved ratio's drift between processes come from? (issue #19, item 5)

    python benchmarks/latency_ratio_noise.py --out benchmarks/results/latency_ratio_noise_X.txt

Each of --processes fresh processes converts each network and the reference once (ONNX Runtime,
224x224, 1 thread), warms them up, then repeats the interleaved protocol's rounds
(nas.interleaved.interleaved_rounds: 12 rounds x 4 runs, as a search measures) --repeats times,
and for comparison 36 rounds. The table splits each network's spread of the median ratio into
within a process (sd of repeats, % of the mean) and between processes (range of the process
medians, %). If the between-process range is far above what the within-process sd predicts
for the mean of that many repeats, the drift is a state of the process or machine that more
rounds cannot average out. With --fresh-sessions every repeat converts the candidate and the
reference anew inside the process: if the spread within a process then rises to the spread
between processes, the drift comes with the runtime's session, not the process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
NETWORKS = ["mobilenet_v3_small", "mobilenet_v2", "mnasnet_b1", "mobilenet_v3_large"]
ROUNDS = (12, 36)


def process_worker(networks: list[str], repeats: int, seed: int, reference: str,
                   fresh_sessions: bool = False) -> dict:
    """{network: {rounds: {"medians": [median ratio per repeat], "seconds": mean}}}, every
    repeat on the same pair of sessions, or with `fresh_sessions` on a pair converted anew."""
    import torch

    from nas.arch import load_architecture
    from nas.interleaved import interleaved_rounds
    from nas.latency import _warm_up, latency_context, prepared_runner
    from nas.model import build_model

    context = latency_context(224, runtime="onnxruntime")
    torch.manual_seed(0)  # the same weights in every process; `seed` orders the rounds
    ref_model = build_model(load_architecture(reference), num_classes=1000)

    @contextlib.contextmanager
    def warmed(model):
        with prepared_runner(model, context) as (run, _):
            _warm_up(run, until=time.perf_counter() + 1.0, stop_above_ms=None)
            yield run

    def timed(cand, ref, rows: dict, rounds: int, i: int) -> None:
        start = time.perf_counter()
        ratios, _ = interleaved_rounds(cand, ref, rounds=rounds, runs_per_block=4,
                                       seed=seed * 100 + i)
        rows[rounds]["medians"].append(float(np.median(ratios)))
        rows[rounds]["seconds"].append(time.perf_counter() - start)

    out: dict = {}
    with contextlib.ExitStack() as kept:
        ref = None if fresh_sessions else kept.enter_context(warmed(ref_model))
        for name in networks:
            model = build_model(load_architecture(name), num_classes=1000)
            rows = {r: {"medians": [], "seconds": []} for r in ROUNDS}
            if fresh_sessions:
                for i in range(repeats):
                    with warmed(model) as cand, warmed(ref_model) as fresh_ref:
                        for rounds in ROUNDS:
                            timed(cand, fresh_ref, rows, rounds, i)
            else:
                with warmed(model) as cand:
                    for rounds in ROUNDS:
                        for i in range(repeats):
                            timed(cand, ref, rows, rounds, i)
            out[name] = {r: {"medians": v["medians"], "seconds": float(np.mean(v["seconds"]))}
                         for r, v in rows.items()}
    return out


def spread(runs: list[dict], name: str, rounds: str, repeats: int) -> dict:
    """One row: within-process sd of the repeats' medians and its sd of the mean (fractions of
    the mean), the range of the process medians, those medians, seconds per measurement."""
    per = [np.array(r[name][rounds]["medians"]) for r in runs]
    mean = float(np.mean(np.concatenate(per)))
    within = float(np.sqrt(np.mean([x.var(ddof=1) for x in per]))) / mean
    meds = [float(np.median(x)) for x in per]
    return {"within": within, "sd_of_mean": within / np.sqrt(repeats),
            "between": (max(meds) - min(meds)) / mean, "medians": meds,
            "seconds": float(np.mean([r[name][rounds]["seconds"] for r in runs]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--reference", default="mnasnet_a1", help="a reference name, @width allowed")
    p.add_argument("--fresh-sessions", action="store_true",
                   help="every repeat on a candidate and reference converted anew (does the "
                        "drift come with the runtime's session rather than the process?)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.processes < 2 or args.repeats < 2:
        p.error("--processes and --repeats: at least 2 (a spread needs two)")
    networks = args.networks.split(",")
    if args.worker is not None:
        print(json.dumps(process_worker(networks, args.repeats, args.worker, args.reference,
                                        args.fresh_sessions)))
        return 0
    from nas.files import save_table
    from nas.host import available_cpus, cpu_name

    runs = []
    for seed in range(args.processes):
        done = subprocess.run([sys.executable, str(HERE), "--worker", str(seed), "--networks",
                               args.networks, "--repeats", str(args.repeats),
                               "--reference", args.reference,
                               *(["--fresh-sessions"] if args.fresh_sessions else [])],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = [f"# benchmarks/latency_ratio_noise.py on {cpu_name()} ({available_cpus()} CPUs), "
             f"{time.strftime('%Y-%m-%d %H:%M')}",
             f"# command: python benchmarks/latency_ratio_noise.py "
             f"{' '.join(argv or sys.argv[1:])}",
             f"# ratio to {args.reference}, ONNX Runtime 224x224, 1 thread; {args.processes} fresh "
             f"processes x {args.repeats} repeats of the protocol's rounds (4 runs per block), "
             + ("each repeat on sessions converted anew" if args.fresh_sessions
                else "every repeat on the same sessions"), "",
             f"{'network':<20} {'rounds':>6} {'within sd':>9} {'sd of mean':>10} "
             f"{'between range':>13}  {'process medians':<30} {'s/measure':>9}"]
    for name in networks:
        for rounds in map(str, ROUNDS):
            row = spread(runs, name, rounds, args.repeats)
            lines.append(f"{name:<20} {rounds:>6} {row['within']:>9.2%} "
                         f"{row['sd_of_mean']:>10.2%} {row['between']:>13.2%}  "
                         f"{' '.join(f'{m:.4f}' for m in row['medians']):<30} "
                         f"{row['seconds']:>9.2f}")
    text = "\n".join(lines)
    save_table(text, args.out)  # prints it; writes it with --out
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
