"""How many CPU threads a proxy training takes: --train-threads if given, else an equal share of
the usable CPUs among this command's --workers and the other processes on this machine that
train the same study, asked again every 2 s while it trains."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import optuna

from nas.host import available_cpus
from nas.interrupts import INTERRUPTED
from nas.search.config import SearchConfig
from nas.search.liveness import local_trainers

SHARED_NOTE = " (an equal share while other processes on this machine train this study)"


def train_threads(config: SearchConfig, workers: int | None = None) -> int:
    """--train-threads, else an equal share of the usable CPUs per --workers process."""
    workers = workers or max(config.workers, config.local_workers)  # a child: its parent's N
    return config.train_threads or max(1, available_cpus() // workers)


class ThreadShare:
    """A proxy training's CPU threads, asked before each step: at most train_threads, and an
    equal share among the processes on this machine training this study (local_trainers), so
    the same command started twice trains on half the cores each (with every core each, two
    trainings ran 12x slower together than one alone, benchmarks/results/oversubscription_
    cascadelake.txt, and two commands took 8.4x as long: two_commands_cascadelake.txt).

    The study is read at most every `every_s` seconds; a failed read (a busy database) keeps
    the last share instead of failing a candidate that trains well."""

    def __init__(self, most: int, study: optuna.Study, every_s: float = 2.0) -> None:
        self.most, self.study, self.every_s = most, study, every_s
        self.share, self.asked = most, -math.inf

    def __call__(self) -> int:
        if time.monotonic() - self.asked >= self.every_s:
            self.asked = time.monotonic()
            try:
                trainers = local_trainers(self.study)
            except Exception:
                if INTERRUPTED.is_set():  # the interrupt, surfacing as a database error
                    raise
            else:
                self.share = max(1, min(self.most, available_cpus() // trainers))
        return self.share


def stop_if_interrupted(threads: Callable[[], int]) -> Callable[[], int]:
    """`threads`, asked before each training step, raising the interrupt once one came: a
    Ctrl-C that landed in a finalizer (quiet_interrupts) still stops the candidate in a step."""
    def ask() -> int:
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt
        return threads()

    return ask


def training_threads(config: SearchConfig, study: optuna.Study | None,
                     workers: int | None = None) -> Callable[[], int]:
    """--train-threads as given; else a ThreadShare of the study (the fixed share without)."""
    most = train_threads(config, workers)
    if config.train_threads or study is None:
        return lambda: most
    return ThreadShare(most, study)
