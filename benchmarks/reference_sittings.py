"""How the interleaved protocol's yardstick varies: back-to-back sittings of the reference in
fresh processes, on a quiet machine and beside a training on the other core (issue #19).

    python benchmarks/reference_sittings.py [--processes 5] [--sittings 7] [--out T.txt]

A sitting is what nas.interleaved.calibrated_reference_ms times: the reference alone by the
standard protocol (40 runs, 1.5-3 s). Per condition the table gives each process's sittings,
their spread within the process, and across processes the drift ((max - min) / median) of the
first sitting, of the median of the first 3, and of the median of the first
nas.machine_calibration.YOUNG (what a young store is filled to). If sittings varied only from
minute to minute, back-to-back ones would agree and their median would drift as much as one;
if a sitting's own noise dominates, the median drifts less. Run it on an otherwise idle machine.
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
AA = HERE.with_name("latency_aa.py")  # its load worker: the same training as the A/A's


def sittings_worker(n: int, runtime: str, input_size: int) -> list[float]:
    """n back-to-back sittings of the reference in this process, ms."""
    from nas.arch import load_architecture
    from nas.interleaved import REFERENCE
    from nas.latency import _protocol, latency_context, prepared_runner
    from nas.model import build_model

    context = latency_context(input_size, runtime=runtime)
    model = build_model(load_architecture(REFERENCE), num_classes=1000)
    with prepared_runner(model, context) as (run, _):
        return [_protocol(run, context, min_runs=40, min_time_s=1.5, max_time_s=3.0,
                          stop_above_ms=None).median_ms for _ in range(n)]


def drift(values: list[float]) -> float:
    return float((max(values) - min(values)) / np.median(values))


def main(argv: list[str] | None = None) -> int:
    from nas.machine_calibration import YOUNG

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--sittings", type=int, default=7)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--conditions", default="quiet,loaded")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(sittings_worker(args.sittings, args.runtime, args.input_size)))
        return 0
    from nas.files import save_table
    from nas.host import available_cpus, cpu_name

    lines = [f"# benchmarks/reference_sittings.py on {cpu_name()} ({available_cpus()} CPUs), "
             f"{time.strftime('%Y-%m-%d %H:%M')}",
             f"# command: python benchmarks/reference_sittings.py {' '.join(argv or sys.argv[1:])}",
             f"# {args.runtime}, {args.input_size}x{args.input_size}, 1 thread, mnasnet_a1; "
             f"load: a training on the other core (latency_aa.py's)", ""]
    for condition in args.conditions.split(","):
        load = (subprocess.Popen([sys.executable, str(AA), "--load-worker"])
                if condition == "loaded" else None)
        rows = []
        try:
            time.sleep(2 if load else 0)
            for i in range(args.processes):
                out = subprocess.run(
                    [sys.executable, str(HERE), "--worker", "--sittings", str(args.sittings),
                     "--runtime", args.runtime, "--input-size", str(args.input_size)],
                    capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.splitlines()[-1]))
                lines.append(f"{condition:<7} process {i}: "
                             + " ".join(f"{v:5.2f}" for v in rows[-1])
                             + f"   within {drift(rows[-1]):5.1%}")
                print(lines[-1], flush=True)
        finally:
            if load:
                load.kill()
                load.wait()
        firsts = [r[0] for r in rows]
        lines += [f"{condition:<7} between processes: first sitting {drift(firsts):.1%}, median "
                  f"of 3 {drift([float(np.median(r[:3])) for r in rows]):.1%}, median of "
                  f"{YOUNG} {drift([float(np.median(r[:YOUNG])) for r in rows]):.1%}; within a "
                  f"process (median) {np.median([drift(r) for r in rows]):.1%}", ""]
        print(lines[-2], flush=True)
    save_table("\n".join(lines), args.out)  # prints it; writes it with --out
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
