"""Hardware-aware architecture search, MnasNet style.

    python -m nas.search --target-ms 80 --mode soft

Each trial: sample an architecture from the search space (Optuna) -> build it -> measure its
latency on the target device, in the runtime that will ship it -> proxy-train it on CIFAR-10
and score it on a validation split held out of the training set -> reward
ACC * (LAT / T)^w with w = alpha if LAT <= T else beta. Everything lands in an Optuna storage
under runs/<name>/ (resumable; several workers may share it), then trials.csv, pareto.csv,
best.yaml and interactive plots are written beside it.

One module per concept:

    config      the flags -> a frozen SearchConfig (nothing after it sees argparse)
    objective   one candidate: latency, proxy accuracy, reward; the Optuna objective
    study       storage, sampler and seed, the settings a resume must match
    trial_end   how a trial ended, and whether it counts toward --trials
    liveness    which worker runs what, and whether it is alive
    cpu_share   how many CPU threads a proxy training takes
    baselines   reference networks through the same latency and proxy
    callbacks   progress line, stop at --trials, stop on an interrupt
    workers     the --workers processes
    runner      one search, start to end, and `main`
"""

from nas.search.config import SearchConfig, UsageError, config_from_argv
from nas.search.runner import main, run

__all__ = ["SearchConfig", "UsageError", "config_from_argv", "main", "run"]
