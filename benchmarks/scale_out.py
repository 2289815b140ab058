"""Scale-out on one machine: trials per minute with 1, 2 and 4 nas.search processes sharing one
study, in PostgreSQL and in the SQLite default, and the storage's share of each trial's time
(issue #20, item 3).

    python benchmarks/scale_out.py --data ../shared/datasets/cifar10-jpg.tar.gz \\
        --postgres postgresql://postgres@127.0.0.1:5432/postgres [--trials 12] [--out T.txt]

Part 1 starts N processes of the same command at once on a new study (a small proxy, eager
latency at 64x64, so trials are short and any storage cost shows) and reports trials per
minute from the first start to the last exit. Part 2 replays one trial's storage traffic as
nas.search makes it (ask, the user attributes a trial writes, the best value read by the
pruning bound, tell) with no training, from 1, 2 and 4 processes at once: milliseconds per
trial and trials per second for the storage alone. A server can feed about
(storage trials/s) / (one machine's trials/s) machines before the storage limits throughput.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import optuna

HERE = Path(__file__).resolve()
ATTRS_PER_TRIAL = 24  # user attributes one trial writes (nas.search's record, worker, end)
# one trial of the default proxy with ONNX Runtime latency on 2 Zen 4 cores, 2 processes:
# benchmarks/results/search_runtime_zen4.txt
DEFAULT_TRIAL_S = 21.6
FAST = ["--space", "tiny", "--val-size", "500", "--proxy-images", "512", "--proxy-batch", "64",
        "--proxy-epochs", "1", "--input-size", "64", "--latency-time", "0.2", "--target-ms", "2",
        "--runtime", "eager", "--sampler", "random"]


def search_rate(data: str, storage: str | None, processes: int, trials: int, runs: Path
                ) -> tuple[float, float, float]:
    """(trials per minute from the first trial's start to the last one's end, the same from
    the first command's start to the last one's exit, seconds) of `processes` commands
    started at once on a new study."""
    name = f"scale-{processes}-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, "-m", "nas.search", *FAST, "--data", data, "--runs-dir", str(runs),
           "--name", name, "--trials", str(trials),
           *(["--storage", storage] if storage else [])]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(processes)]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise SystemExit(f"a search failed: {[e.strip()[-300:] for e in errors]}")

    url = storage or f"sqlite:///{runs / name / 'study.db'}"
    done = [t for t in optuna.load_study(study_name=name, storage=url).trials
            if t.state.is_finished()]
    span = (max(t.datetime_complete for t in done)
            - min(t.datetime_start for t in done)).total_seconds()
    return 60 * len(done) / span, 60 * len(done) / seconds, seconds


def storage_worker(url: str, name: str, trials: int) -> list[float]:
    """One process's storage traffic for `trials` trials, no training: ms per trial."""

    from nas.search.liveness import StampedStorage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")  # heartbeat outside optimize, experimental arguments
    storage = StampedStorage(url, heartbeat_interval=30, grace_period=120)
    study = optuna.load_study(study_name=name, storage=storage)
    times = []
    for i in range(trials):
        t0 = time.perf_counter()
        trial = study.ask()
        for k in range(3):  # the space's choices
            trial.suggest_categorical(f"b{k}", [1, 2, 3])
        for k in range(ATTRS_PER_TRIAL):
            trial.set_user_attr(f"attr{k}", float(i + k))
        try:
            study.best_value  # noqa: B018 - the pruning bound reads it
        except ValueError:
            pass
        study.tell(trial, 0.5 + i * 1e-4)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def storage_rate(url: str, processes: int, trials: int) -> tuple[float, float]:
    """(median ms per trial, storage-only trials per second) with `processes` at once."""

    name = f"storage-{processes}-{uuid.uuid4().hex[:6]}"
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    start = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        results = list(pool.map(storage_worker, [url] * processes, [name] * processes,
                                [trials] * processes))
    seconds = time.perf_counter() - start
    return statistics.median(t for r in results for t in r), processes * trials / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--postgres", required=True, help="a PostgreSQL URL to create studies in")
    p.add_argument("--trials", type=int, default=12, help="per search")
    p.add_argument("--storage-trials", type=int, default=100, help="per storage process")
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from nas.files import save_table
    from nas.host import available_cpus, cpu_name

    counts = [int(n) for n in args.processes.split(",")]
    lines = [f"# benchmarks/scale_out.py on {cpu_name()} ({available_cpus()} CPUs), "
             f"{time.strftime('%Y-%m-%d %H:%M')}; PostgreSQL on the same machine",
             f"# command: python benchmarks/scale_out.py {' '.join(argv or sys.argv[1:])}",
             f"# searches: {' '.join(FAST)}, {args.trials} trials each", "",
             f"{'storage':<10} {'processes':>9} {'trials/min':>10} {'with start-up':>13} "
             f"{'seconds':>8}"]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for storage, url in (("sqlite", None), ("postgres", args.postgres)):
            for n in counts:
                rate, overall, seconds = search_rate(args.data, url, n, args.trials, Path(tmp))
                rates[(storage, n)] = rate
                lines.append(f"{storage:<10} {n:>9} {rate:>10.1f} {overall:>13.1f} "
                             f"{seconds:>8.1f}")
                print(lines[-1], flush=True)
        lines += ["", f"storage alone ({ATTRS_PER_TRIAL} attributes, ask, tell, best value "
                      f"per trial, {args.storage_trials} trials per process):",
                  f"{'storage':<10} {'processes':>9} {'ms/trial':>9} {'trials/s':>9} "
                  f"{'share: this proxy':>17} {'default proxy':>13}"]
        for storage, url in (("sqlite", f"sqlite:///{tmp}/storage.db"),
                             ("postgres", args.postgres)):
            for n in counts:
                ms, per_s = storage_rate(url, n, args.storage_trials)
                trial_ms = 60_000 / max(rates[(storage, 1)], 1e-9)
                lines.append(f"{storage:<10} {n:>9} {ms:>9.1f} {per_s:>9.1f} "
                             f"{ms / trial_ms:>17.2%} {ms / (1000 * DEFAULT_TRIAL_S):>13.2%}")
                print(lines[-1], flush=True)
                rates[(f"{storage}-storage", n)] = per_s
    best = max(v for (k, _), v in rates.items() if k == "postgres-storage")
    machine = rates[("postgres", 1)] / 60
    default = 2 / DEFAULT_TRIAL_S  # two 1-core processes per 2-core machine
    lines += ["", f"on paper: the PostgreSQL server (on this same 2-core machine) took {best:.0f} "
                  f"storage-only trials/s at most; a machine runs {machine:.2f} trials/s of this "
                  f"small proxy, or {default:.3f} of the default one, so one server feeds about "
                  f"{best / machine:.0f} machines of the small proxy, or {best / default:.0f} "
                  f"of the default one, before the storage limits throughput"]
    text = "\n".join(lines)
    save_table(text, args.out)  # prints it; writes it with --out
    return 0


if __name__ == "__main__":
    sys.exit(main())
