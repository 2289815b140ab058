"""A/A latency benchmark (issue #19, item 5): the same 12 networks measured in 3 fresh processes,
on a quiet machine and beside a training on the other core, by the current protocol and by the
interleaved one (nas.interleaved); plus local against a latency server on the loopback address.

    python benchmarks/latency_aa.py [--passes 3] [--runtime onnxruntime] [--out T.txt]

Reported per condition and protocol: Spearman between every two passes (the smallest and the
mean), the largest per-network drift of the median ((max - min) / median over the passes),
the seconds of measuring per network (conversion excluded), and "swaps within": the widest
latency gap between two networks that some two passes ordered differently (networks further
apart never swapped). Targets: Spearman >= 0.98 and
drift <= 3% under load, <= 4 s per measurement. Run it on an otherwise idle machine: the load
is the benchmark's own.

The interleaved rows come three ways from the same passes: as the protocol stands (the ratio
times the median of the machine's reference sittings so far, nas.machine_calibration, from a
store that starts empty with the benchmark), with each process's own sitting alone (the
protocol before the store), and the ratio alone (where the store tends as sittings accumulate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

HERE = Path(__file__).resolve()
REFERENCES = ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
              "mnasnet_a1", "mnasnet_b1", "torchvision:resnet18"]
SAMPLED = 5
PROTOCOLS = ("current", "interleaved", "ladder")


def sampled_specs(folder: Path, n: int = SAMPLED, seed: int = 0) -> list[str]:
    """n architectures of the default space (Optuna's RandomSampler), saved as files."""
    import optuna

    from nas.arch import save_architecture
    from nas.space import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("mnasnet")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [str(save_architecture(space.sample(study.ask()), folder / f"sampled{i}.yaml"))
            for i in range(n)]


def pass_worker(specs: list[str], protocol: str, runtime: str, input_size: int,
                seed: int, rounds: int | None = None, warm: int | None = None,
                sittings: int = 1) -> dict[str, dict]:
    """One fresh process's measurements of every network, in a shuffled order; `rounds`: the
    interleaved protocols' rounds (default: nas.interleaved.ROUNDS); `warm`: their untimed runs
    per block (default: nas.interleaved.WARM_RUNS_PER_BLOCK). `sittings` > 1: every network
    measured that many times, each sitting of all networks in its own shuffled order (so one
    network's sittings lie the others' measuring apart); each network's first sitting is its
    result, with every sitting's ms and seconds kept beside it ("sittings_ms", "sittings_s")."""
    rng = random.Random(seed)
    out: dict[str, dict] = {}
    for _ in range(sittings):
        order = list(specs)
        rng.shuffle(order)
        for spec, got in one_sitting(order, protocol, runtime, input_size, rounds,
                                     warm).items():
            first = out.setdefault(spec, {**got, "sittings_ms": [], "sittings_s": []})
            first["sittings_ms"].append(got["ms"])
            first["sittings_s"].append(got["seconds"])
    for got in out.values():
        got["cpus"] = sorted(os.sched_getaffinity(0))  # where it ran (--pin)
    return out


def one_sitting(order: list[str], protocol: str, runtime: str, input_size: int,
                rounds: int | None, warm: int | None) -> dict[str, dict]:
    """Every network of `order` measured once, in that order."""
    from nas.interleaved import ROUNDS, WARM_RUNS_PER_BLOCK, measure_interleaved
    from nas.latency import measure_latency, network_builder

    rounds = rounds or ROUNDS
    warm = WARM_RUNS_PER_BLOCK if warm is None else warm
    out = {}
    for spec in order:
        model = network_builder(spec)()
        if protocol == "current":
            r = measure_latency(model, input_size, runtime=runtime, min_time_s=1.0,
                                max_time_s=2.0)
            out[spec] = {"ms": r.median_ms, "seconds": r.seconds}
        elif protocol == "ladder":
            r = measure_interleaved(model, input_size, runtime=runtime, ladder=True,
                                    rounds=rounds, warm_runs_per_block=warm)
            out[spec] = {"ms": r.latency_ms, "raw_ms": r.raw_ms, "seconds": r.seconds,
                         "ratio": r.ratio, "reference_ms": r.reference_ms, "rounds": r.rounds,
                         "reference": r.reference}
        else:
            r = measure_interleaved(model, input_size, runtime=runtime, rounds=rounds,
                                    warm_runs_per_block=warm)
            out[spec] = {"ms": r.latency_ms, "raw_ms": r.raw_ms, "seconds": r.seconds,
                         "ratio": r.ratio, "reference_ms": r.reference_ms, "rounds": r.rounds,
                         "own_sitting_ms": own_sitting(r.context)}
    return out


def own_sitting(context) -> float:
    """This process's own sitting of the reference (the machine's store keeps it last)."""
    import dataclasses

    from nas.interleaved import REFERENCE
    from nas.machine_calibration import sittings

    return sittings(dataclasses.replace(context, protocol="single"), REFERENCE, 1000)[-1]


def pin(cpu: int | None) -> None:
    """This process (and the threads it starts) on one CPU only (--pin)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def load_worker() -> None:
    """A training on one core until killed: MnasNet-A1 on 32x32 batches of 64, SGD."""
    import torch

    from nas.arch import load_architecture
    from nas.model import build_model

    torch.set_num_threads(1)
    model = build_model(load_architecture("mnasnet_a1"), num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    while True:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def run_pass(specs_file: Path, protocol: str, runtime: str, input_size: int, seed: int,
             rounds: int | None = None, warm: int | None = None, sittings: int = 1,
             cpu: int | None = None) -> dict:
    """A fresh process (on CPU `cpu` alone if given); its reference sittings go to a store
    beside specs_file that starts empty with the benchmark (the quiet passes' sittings are
    there for the loaded ones)."""
    out = subprocess.run(
        [sys.executable, str(HERE), "--pass-worker", str(specs_file), "--protocol", protocol,
         "--runtime", runtime, "--input-size", str(input_size), "--seed", str(seed),
         *(["--rounds", str(rounds)] if rounds else []),
         *(["--warm", str(warm)] if warm is not None else []),
         "--sittings", str(sittings), *(["--cpu", str(cpu)] if cpu is not None else [])],
        capture_output=True, text=True, check=True,
        env={**os.environ, "NAS_CACHE": str(specs_file.parent / "cache")})
    return json.loads(out.stdout.splitlines()[-1])


def variants(passes: list[dict], protocol: str) -> dict[str, list[dict]]:
    """The interleaved passes three ways: the protocol as it stands (the ratio times the median
    of the machine's sittings so far), the ratio times the process's own sitting alone (before
    the machine's store), and the ratio alone (where the store tends as sittings accumulate)."""
    if protocol == "ladder":  # and each rung at one calibration: the ratios' own drift
        rung_ms: dict[str, list[float]] = {}
        for p in passes:
            for m in p.values():
                rung_ms.setdefault(m["reference"], []).append(m["reference_ms"])
        fixed = {rung: float(np.median(v)) for rung, v in rung_ms.items()}
        return {"ladder": passes, "  rungs fixed": [
            {s: {**m, "ms": m["ratio"] * fixed[m["reference"]]} for s, m in p.items()}
            for p in passes]}
    sittings = len(next(iter(passes[0].values())).get("sittings_ms", ()))
    if sittings > 1:  # the first sitting, against each network's mean over its sittings
        mean = [{s: {**m, "ms": float(np.mean(m["sittings_ms"])),
                     "seconds": float(np.sum(m["sittings_s"]))} for s, m in p.items()}
                for p in passes]
        rows = {f"{protocol} 1st": passes, f"  mean of {sittings}": mean}
        if protocol == "interleaved":  # and both without the yardstick (one per process)
            def ratio(ps):
                return [{s: {**m, "ms": m["ms"] / m["reference_ms"]} for s, m in p.items()}
                        for p in ps]
            rows |= {"  1st, ratio only": ratio(passes),
                     f"  mean of {sittings}, ratio": ratio(mean)}
        return rows
    if protocol != "interleaved":
        return {protocol: passes}
    def scaled(key):
        return [{s: {**m, "ms": m["ratio"] * (m[key] if key else 1.0)} for s, m in p.items()}
                for p in passes]
    return {"interleaved": passes, "  own sitting": scaled("own_sitting_ms"),
            "  ratio only": scaled(None)}


def rungs_used(passes: list[dict]) -> str:
    """Which of the ladder's widths each network was timed against, over the passes."""
    def width(rung: str) -> str:
        return rung.rsplit("@", 1)[1] if "@" in rung else "1"

    used = {spec: sorted({width(p[spec]["reference"]) for p in passes}) for spec in passes[0]}
    return ", ".join(f"{Path(spec).stem} {'/'.join(used[spec])}" for spec in sorted(used))


def summarize(passes: list[dict]) -> dict:
    specs = sorted(passes[0])
    ms = np.array([[p[s]["ms"] for s in specs] for p in passes])
    rhos = [spearmanr(ms[a], ms[b]).statistic
            for a, b in itertools.combinations(range(len(passes)), 2)]
    median = np.median(ms, 0)
    drift = (ms.max(0) - ms.min(0)) / median
    worst = specs[int(drift.argmax())]
    seconds = np.mean([[p[s]["seconds"] for s in specs] for p in passes])
    return {"spearman_min": min(rhos), "spearman_mean": float(np.mean(rhos)),
            "drift_max": float(drift.max()), "drift_worst": worst,
            "drift_median": float(np.median(drift)), "seconds": float(seconds),
            "swap_gap_max": swap_gap(ms, median)}


def swap_gap(ms: np.ndarray, median: np.ndarray) -> float:
    """The widest gap between two networks' median latencies (relative to the faster) that
    some two passes still ordered differently: the Spearman shortfall comes from networks
    closer than this, and any two networks further apart kept their order in every pass."""
    gaps = [abs(median[i] - median[j]) / min(median[i], median[j])
            for i, j in itertools.combinations(range(ms.shape[1]), 2)
            if len({bool(row[i] < row[j]) for row in ms}) > 1]
    return float(max(gaps, default=0.0))


def server_agreement(specs: list[str], runtime: str, input_size: int) -> list[str]:
    """The architectures measured here and by a latency server on the loopback address, back
    to back per network, on a quiet machine: by the single protocol, and by the interleaved
    one (a search's default) at the same reference_ms, so only the ratio can differ."""
    import secrets

    from nas.arch import load_architecture
    from nas.interleaved import measure_interleaved
    from nas.latency import measure_latency, network_builder
    from nas.latency_client import LatencyClient

    archs = [s for s in specs if not s.startswith("torchvision:")]
    rows: dict[str, list[tuple[str, float, float]]] = {"single": [], "interleaved": []}
    with tempfile.TemporaryDirectory() as tmp:
        token = secrets.token_hex(16)
        (Path(tmp) / "t").write_text(token)
        proc = subprocess.Popen([sys.executable, "-m", "nas.latency", "serve", "--port", "0",
                                 "--token-file", str(Path(tmp) / "t")],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
            client = LatencyClient(url, token)
            for spec in archs:
                here = measure_latency(network_builder(spec)(), input_size, runtime=runtime,
                                       min_time_s=1.0, max_time_s=2.0).median_ms
                there = client.measure(load_architecture(spec), num_classes=1000,
                                       input_size=input_size, runtime=runtime, min_time_s=1.0,
                                       max_time_s=2.0).median_ms
                rows["single"].append((Path(spec).stem, here, there))
                local = measure_interleaved(network_builder(spec)(), input_size,
                                            runtime=runtime)
                remote = client.measure(load_architecture(spec), num_classes=1000,
                                        input_size=input_size, runtime=runtime,
                                        protocol="interleaved",
                                        reference_ms=local.reference_ms).median_ms
                rows["interleaved"].append((Path(spec).stem, local.latency_ms, remote))
        finally:
            proc.terminate()
            proc.wait(10)
    lines = []
    for protocol, got in rows.items():
        ratios = np.array([there / here for _, here, there in got])
        worst = got[int(np.abs(ratios - 1).argmax())][0]
        lines += [f"server on loopback vs here, back to back per network ({protocol} protocol, "
                  f"quiet), {len(got)} architectures: median ratio {np.median(ratios):.3f}, "
                  f"largest deviation {np.abs(ratios - 1).max():.1%} ({worst}), median "
                  f"deviation {np.median(np.abs(ratios - 1)):.1%}, Spearman "
                  f"{spearmanr([r[1] for r in got], [r[2] for r in got]).statistic:.3f}",
                  *(f"  {name:<22} here {here:7.2f} ms  server {there:7.2f} ms"
                    for name, here, there in got)]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--out", default=None)
    p.add_argument("--pass-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--protocol", choices=PROTOCOLS, default="current", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--networks", default=None, help="comma-separated specs (default: 12)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help=f"comma-separated, of {', '.join(PROTOCOLS)} (ladder: interleaved "
                        f"against the nearest of the reference's widths)")
    p.add_argument("--rounds", default=None,
                   help="comma-separated rounds of the interleaved protocols, each a row "
                        "(default: nas.interleaved.ROUNDS)")
    p.add_argument("--warm", type=int, default=None,
                   help="untimed runs at the start of each interleaved block (default: "
                        "nas.interleaved.WARM_RUNS_PER_BLOCK)")
    p.add_argument("--sittings", type=int, default=1,
                   help="each network measured this many times per process, each time in a "
                        "new shuffled order of all of them; rows for the first sitting and "
                        "for the mean of all (its seconds the sum)")
    p.add_argument("--pin", action="store_true",
                   help="measure on the last CPU alone and train (loaded) on the first alone "
                        "(os.sched_setaffinity); default: wherever the scheduler puts them")
    p.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--conditions", default="quiet,loaded",
                   help="comma-separated, of quiet, loaded (a training on the other core)")
    p.add_argument("--parts", default="aa,server",
                   help="aa: the A/A table; server: loopback server against local")
    args = p.parse_args(argv)
    pin(args.cpu)
    if args.load_worker:
        load_worker()
        return 0
    if args.pass_worker:
        specs = json.loads(Path(args.pass_worker).read_text())
        print(json.dumps(pass_worker(specs, args.protocol, args.runtime, args.input_size,
                                     args.seed, int(args.rounds) if args.rounds else None,
                                     args.warm, args.sittings)))
        return 0
    from nas.files import save_table
    from nas.host import available_cpus, cpu_name

    cpus = sorted(os.sched_getaffinity(0))
    load_cpu, measure_cpu = (cpus[0], cpus[-1]) if args.pin else (None, None)

    lines = [f"# benchmarks/latency_aa.py on {cpu_name()} ({available_cpus()} CPUs), "
             f"{time.strftime('%Y-%m-%d %H:%M')}",
             f"# command: python benchmarks/latency_aa.py {' '.join(argv or sys.argv[1:])}",
             f"# {args.runtime}, {args.input_size}x{args.input_size}, 1 thread; each pass a "
             f"fresh process, networks in a shuffled order; load: a training (mnasnet_a1, "
             f"batch 64, 32x32, 1 thread) on the other core"
             + (f"; pinned: measuring on CPU {measure_cpu}, the load on CPU {load_cpu}"
                if args.pin else ""), ""]
    with tempfile.TemporaryDirectory() as tmp:
        specs = (args.networks.split(",") if args.networks
                 else REFERENCES + sampled_specs(Path(tmp)))
        specs_file = Path(tmp) / "specs.json"
        specs_file.write_text(json.dumps(specs))
        parts = args.parts.split(",")
        header = (f"{'condition':<8} {'protocol':<18} {'Spearman min':>12} {'mean':>6} "
                  f"{'drift max':>9} {'(network)':<22} {'drift median':>12} {'s/measure':>9} "
                  f"{'swaps within':>12}")
        if "aa" in parts:
            lines += [header, "-" * len(header)]
        rounds = [int(r) for r in args.rounds.split(",")] if args.rounds else [None]
        runs = [(protocol, r) for protocol in args.protocols.split(",")
                for r in (rounds if protocol != "current" else [None])]
        for condition in args.conditions.split(",") if "aa" in parts else ():
            load = (subprocess.Popen([sys.executable, str(HERE), "--load-worker",
                                      *(["--cpu", str(load_cpu)] if args.pin else [])])
                    if condition == "loaded" else None)
            try:
                time.sleep(2 if load else 0)
                for protocol, r in runs:
                    passes = [run_pass(specs_file, protocol, args.runtime, args.input_size,
                                       seed, r, args.warm, args.sittings, measure_cpu)
                              for seed in range(args.passes)]
                    for name, variant in variants(passes, protocol).items():
                        name += f" x{r}" if len(rounds) > 1 and r else ""
                        s = summarize(variant)
                        lines.append(
                            f"{condition:<8} {name:<18} {s['spearman_min']:>12.3f} "
                            f"{s['spearman_mean']:>6.3f} {s['drift_max']:>9.1%} "
                            f"{Path(s['drift_worst']).stem[:22]:<22} "
                            f"{s['drift_median']:>12.1%} {s['seconds']:>9.2f} "
                            f"{s['swap_gap_max']:>12.1%}")
                        print(lines[-1], flush=True)
                    if protocol == "ladder":
                        lines.append(f"{'':<9}rungs (widths) per network over the passes: "
                                     + rungs_used(passes))
                    if protocol == "interleaved":
                        lines.append(f"{'':<9}reference sittings, ms: " + ", ".join(
                            f"{next(iter(p.values()))['own_sitting_ms']:.2f}" for p in passes)
                            + "; machine median used: " + ", ".join(
                            f"{next(iter(p.values()))['reference_ms']:.2f}" for p in passes))
            finally:
                if load:
                    load.kill()
                    load.wait()
        if "server" in parts:
            lines += ["", *server_agreement(specs, args.runtime, args.input_size)]
    text = "\n".join(lines)
    save_table(text, args.out)  # prints it; writes it with --out
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
