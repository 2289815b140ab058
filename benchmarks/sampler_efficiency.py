"""Which sampler finds good architectures soonest in nas's default space, measured on the
surrogate of `surrogate.py` (issue #21, item 2).

    python benchmarks/sampler_efficiency.py [--seeds 30] [--trials 200] [--jobs 2]
        [--samplers random,tpe,...] [--objectives soft@low,...] [--state FILE]

Every sampler searches the default space exactly as `nas.search` asks it (`SearchSpace.sample`),
scored by the surrogate's predicted proxy accuracy and latency, for `--seeds` seeds of
`--trials` trials: the MnasNet soft and hard rewards at two targets (the 25th and 50th
percentiles of the measured latencies, rounded to 0.1 ms) and the Pareto objective (accuracy
up, latency down). Each finished run is one JSON line appended to `--state`, a folder holding
one gzip file per sampler (`gp.jsonl.gz`, ...), so an interrupted benchmark resumes. The
default folder is committed (`benchmarks/results/sampler_efficiency_runs/`): the runs are the
data behind the committed table, the surrogate makes them machine-independent, and a
benchmark of several hours (Optuna's GP sampler takes 2-3 minutes a run) goes on in the next
session on whatever machine it gets. The table reports, per objective and sampler:

- trials to reach random search's median best reward at 100 trials (median over seeds, and
  the quartiles; a seed that never reaches it within --trials counts as more than --trials);
- regret at 50, 100 and 200 trials: the best reward any run of any sampler found for that
  objective minus the run's best so far (median [quartiles] over seeds);
- for the Pareto objective, the hypervolume at 50, 100 and 200 trials of (accuracy, latency)
  against the reference point (accuracy 0.10, chance on CIFAR-10; latency the slowest
  measured architecture's), in accuracy x ms.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import multiprocessing as mp
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # Optuna's own WFG, used by its plots

sys.path.insert(0, str(Path(__file__).parent))
import surrogate as surrogate_module  # noqa: E402

from nas.reward import exponents, reward  # noqa: E402
from nas.samplers import RegularizedEvolutionSampler  # noqa: E402
from nas.search.config import SearchConfig  # noqa: E402
from nas.search.study import make_sampler  # noqa: E402
from nas.space import load_space  # noqa: E402

STATE = Path(__file__).parent / "results" / "sampler_efficiency_runs"
CHANCE = 0.10
MILESTONES = (50, 100, 200)


def _as_today(name: str, population: int | None = None
              ) -> Callable[[int], optuna.samplers.BaseSampler]:
    """The sampler `nas.search --sampler name` makes, from the search's own factory."""
    def make(seed: int) -> optuna.samplers.BaseSampler:
        extra = {"population": population} if population else {}
        return make_sampler(SearchConfig(target_ms=1, sampler=name, **extra), seed)
    return make


SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "random": _as_today("random"),
    "tpe": _as_today("tpe"),  # multivariate, grouped, 10 start-up trials
    "tpe_startup5": lambda s: optuna.samplers.TPESampler(
        seed=s, multivariate=True, group=True, n_startup_trials=5),
    "tpe_startup20": lambda s: optuna.samplers.TPESampler(
        seed=s, multivariate=True, group=True, n_startup_trials=20),
    "tpe_independent": lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=10),
    "nsga2_p10": _as_today("nsga2", 10),
    "nsga2_p20": _as_today("nsga2", 20),
    "evolution": lambda s: RegularizedEvolutionSampler(population_size=20, tournament_size=5,
                                                       seed=s),
    "gp": lambda s: optuna.samplers.GPSampler(seed=s, warn_independent_sampling=False),
}
SINGLE_ONLY = {"evolution"}

_SURROGATE = None
_SPACE = None


class _TorchWithoutDeviceMode:
    """`torch` as GPSampler's module sees it, with `torch.device(...)` as a no-op context.

    Optuna 5.1's GPSampler enters `with torch.device("cpu")` around every sampling step (for
    users with a CUDA default device, optuna#6113). That context is a TorchFunctionMode which
    interposes every torch call in Python (pytorch#92701): 12 of 45 s of a 100-trial run in
    cProfile on 2026-12-07. This process never sets a default device, so skipping it changes
    no number: a seed's 60 trials came out identical, in 11.2 s against 15.6 s (and
    tests/test_benchmarks.py::test_gp_runs_skip_optuna_s_device_mode_and_sample_the_same_trials).
    """

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    @staticmethod
    def device(*args, **kwargs):
        return contextlib.nullcontext()


def _skip_gp_device_mode() -> None:
    import torch
    from optuna.samplers._gp import sampler as gp_sampler
    if torch.get_default_device().type == "cpu" and hasattr(gp_sampler, "torch"):
        gp_sampler.torch = _TorchWithoutDeviceMode(torch)


def _init() -> None:
    global _SURROGATE, _SPACE
    # One thread per process: GPSampler computes in torch, and two GP runs of 2 threads each
    # on 2 cores took 273-278 s per 100 trials against 48 s for one alone
    import torch
    torch.set_num_threads(1)
    _skip_gp_device_mode()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    _SURROGATE = surrogate_module.fit()
    _SPACE = load_space("mnasnet")


def targets(csv: Path = surrogate_module.CSV) -> dict[str, float]:
    import pandas as pd
    lat = pd.read_csv(csv)["latency_ms"]
    return {"low": round(float(lat.quantile(0.25)), 1), "mid": round(float(lat.quantile(0.5)), 1)}


def objectives(csv: Path = surrogate_module.CSV) -> list[str]:
    t = targets(csv)
    return [f"{mode}@{name}" for name in t for mode in ("soft", "hard")] + ["pareto"]


def one_run(task: tuple[str, str, int, int, dict]) -> dict:
    """One sampler, objective and seed: every trial's predicted accuracy and latency."""
    sampler_name, objective, seed, trials, _ = task
    if _SURROGATE is None:
        _init()
    sampler = SAMPLERS[sampler_name](seed)
    pareto = objective == "pareto"
    if pareto:
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    else:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        mode, where = objective.split("@")
        target = task[4][where]
        alpha, beta = exponents(mode)
    accs, lats = [], []

    def score(trial: optuna.Trial):
        acc, lat = _SURROGATE.predict(_SPACE.sample(trial))
        acc = min(max(acc, 0.0), 1.0)
        accs.append(acc)
        lats.append(lat)
        return (acc, lat) if pareto else reward(acc, lat, target, alpha=alpha, beta=beta)

    t0 = time.perf_counter()
    study.optimize(score, n_trials=trials)
    return {"sampler": sampler_name, "objective": objective, "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2),
            "acc": [round(a, 5) for a in accs], "lat": [round(v, 4) for v in lats]}


def load_state(path: Path) -> list[dict]:
    """Every finished run in the folder `path` (its *.jsonl.gz, one per sampler)."""
    runs = []
    for f in sorted(path.glob("*.jsonl.gz")) if path.is_dir() else []:
        try:
            with gzip.open(f, "rt") as lines:
                for line in lines:
                    try:
                        runs.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut short by an interruption: that run is redone
        except (EOFError, gzip.BadGzipFile, zlib.error):
            pass  # the last gzip member cut short: the runs read before it stand
    return runs


def append_run(path: Path, run: dict) -> None:
    """One finished run, appended to its sampler's file as a gzip member of its own."""
    with gzip.open(path / f"{run['sampler']}.jsonl.gz", "at") as f:
        f.write(json.dumps(run) + "\n")


# --------------------------------------------------------------------------- summary


def rewards(run: dict, tgt: dict[str, float]) -> np.ndarray:
    mode, where = run["objective"].split("@")
    alpha, beta = exponents(mode)
    return np.array([reward(a, v, tgt[where], alpha=alpha, beta=beta)
                     for a, v in zip(run["acc"], run["lat"], strict=True)])


def hypervolume(acc: list[float], lat: list[float], ref_lat: float) -> float:
    pts = np.array([[-a, v] for a, v in zip(acc, lat, strict=True)
                    if a > CHANCE and v < ref_lat])
    if len(pts) == 0:
        return 0.0
    return float(compute_hypervolume(pts, np.array([-CHANCE, ref_lat])))


def _q(values: np.ndarray, fmt: str) -> str:
    lo, med, hi = np.percentile(values, [25, 50, 75])
    return f"{med:{fmt}} [{lo:{fmt}}-{hi:{fmt}}]"


def summarise(runs: list[dict], tgt: dict[str, float], ref_lat: float, trials: int) -> str:
    out = []
    marks = [m for m in MILESTONES if m <= trials]
    by = {}
    for r in runs:
        by.setdefault((r["objective"], r["sampler"]), []).append(r)
    for objective in sorted({r["objective"] for r in runs}, key=lambda o: (o == "pareto", o)):
        names = [s for s in SAMPLERS if (objective, s) in by]
        if objective == "pareto":
            out.append(f"\n### pareto (accuracy up, latency down): hypervolume against "
                       f"(accuracy {CHANCE}, {ref_lat:.2f} ms), accuracy x ms; median "
                       f"[quartiles] over seeds\n")
            out.append("| sampler | seeds | " + " | ".join(f"HV @{m}" for m in marks)
                       + " | s per run |")
            out.append("|---" * (len(marks) + 3) + "|")
            for s in names:
                rs = by[(objective, s)]
                hv = {m: np.array([hypervolume(r["acc"][:m], r["lat"][:m], ref_lat)
                                   for r in rs]) for m in marks}
                secs = np.median([r["seconds"] for r in rs])
                out.append(f"| {s} | {len(rs)} | " + " | ".join(_q(hv[m], ".4f") for m in hv)
                           + f" | {secs:.1f} |")
            continue
        curves = {s: np.array([np.maximum.accumulate(rewards(r, tgt)) for r in by[(objective, s)]])
                  for s in names}
        best = max(c.max() for c in curves.values())
        bar = float(np.median(curves["random"][:, 99])) if "random" in curves else float("nan")
        mode, where = objective.split("@")
        out.append(f"\n### {mode} reward at T = {tgt[where]} ms: random's median best at 100 "
                   f"trials {bar:.4f}; best reward any run found {best:.4f}\n")
        out.append("| sampler | seeds | trials to random's 100-trial median | "
                   + " | ".join(f"regret @{m}" for m in marks) + " | s per run |")
        out.append("|---" * (len(marks) + 4) + "|")
        for s in names:
            c = curves[s]
            reach = np.array([int(np.argmax(row >= bar)) + 1 if (row >= bar).any() else trials + 1
                              for row in c])
            lo, med, hi = np.percentile(reach, [25, 50, 75])
            show = lambda v: f">{trials}" if v > trials else f"{v:.0f}"  # noqa: E731
            regrets = " | ".join(_q(best - c[:, m - 1], ".4f") for m in marks)
            secs = np.median([r["seconds"] for r in by[(objective, s)]])
            out.append(f"| {s} | {len(c)} | {show(med)} [{show(lo)}-{show(hi)}] | {regrets} | "
                       f"{secs:.1f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--objectives", default=None, help="default: all of " + ", ".join(
        ["soft@low", "hard@low", "soft@mid", "hard@mid", "pareto"]))
    p.add_argument("--state", type=Path, default=STATE,
                   help="folder of finished runs, one <sampler>.jsonl.gz each "
                        "(default: %(default)s)")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args()
    tgt = targets()
    wanted_obj = args.objectives.split(",") if args.objectives else objectives()
    wanted = args.samplers.split(",")
    unknown = [s for s in wanted if s not in SAMPLERS]
    if unknown:
        p.error(f"--samplers: {unknown} unknown; allowed: {list(SAMPLERS)}")
    if args.state.exists() and not args.state.is_dir():
        p.error(f"--state {args.state}: a folder of <sampler>.jsonl.gz files, not a file")
    runs = [r for r in load_state(args.state) if len(r["acc"]) == args.trials]
    done = {(r["sampler"], r["objective"], r["seed"]) for r in runs}
    tasks = [(s, o, seed, args.trials, tgt) for seed in range(args.seeds) for o in wanted_obj
             for s in wanted if (s, o, seed) not in done
             and not (o == "pareto" and s in SINGLE_ONLY)]
    if tasks and not args.summary_only:
        print(f"{len(tasks)} runs to do ({len(done)} done) with {args.jobs} processes",
              flush=True)
        args.state.mkdir(parents=True, exist_ok=True)
        with mp.get_context("spawn").Pool(args.jobs, initializer=_init) as pool:
            for k, run in enumerate(pool.imap_unordered(one_run, tasks), 1):
                append_run(args.state, run)
                runs.append(run)
                print(f"[{k}/{len(tasks)}] {run['sampler']} {run['objective']} seed "
                      f"{run['seed']}: {run['seconds']:.1f} s", flush=True)
    import pandas as pd
    ref_lat = float(pd.read_csv(surrogate_module.CSV)["latency_ms"].max())
    runs = [r for r in runs if r["sampler"] in wanted and r["objective"] in wanted_obj
            and r["seed"] < args.seeds]
    print(f"surrogate: {surrogate_module.CSV.name}; targets {tgt} ms; {args.seeds} seeds x "
          f"{args.trials} trials")
    print(summarise(runs, tgt, ref_lat, args.trials))


if __name__ == "__main__":
    main()
