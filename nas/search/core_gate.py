"""No latency measured beside a training on the same machine (issue #19, item 3).

The processes of a study on one machine (its --workers, or the same command started again)
share two lock files in the run folder. A training holds the `cores` lock shared while it runs
a step; a measurement takes it exclusively, so it waits for the trainings' current steps to end
and they wait, at their next step, until it is done. The `turnstile` lock keeps the trainings'
steps from starving a measurement that is waiting: once a measurement queues, no new step
starts. flock(2) locks die with their process, so a killed worker blocks nobody.
What it costs with --workers 2: trainings wait 1.9% of the workers' time at 12 interleaved
rounds (benchmarks/results/core_gate_cost_zen4.txt), 3.3% at 30 (core_gate_cost_xeon.txt), 4.7%
with 2 warm runs per block (core_gate_cost_warm2_xeon.txt).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TURNSTILE, CORES = ".turnstile.lock", ".cores.lock"


class CoreGate:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fds: dict[str, int] = {}
        self._stepping = False
        self.waited_s = 0.0  # what the gate cost this process's trainings: seconds held back

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = os.open(self.folder / name, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fds[name]

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Exclusive: no training step of this machine's processes runs inside."""
        turnstile, cores = self._fd(TURNSTILE), self._fd(CORES)
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(cores, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(cores, fcntl.LOCK_UN)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)

    def step(self) -> None:
        """Before a training step: let a queued measurement go first, then hold the cores
        (shared with other trainings) until the next step or done()."""
        cores, turnstile = self._fd(CORES), self._fd(TURNSTILE)
        if self._stepping:
            fcntl.flock(cores, fcntl.LOCK_UN)
            self._stepping = False
        start = time.perf_counter()
        fcntl.flock(turnstile, fcntl.LOCK_SH)  # waits while a measurement holds it
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(cores, fcntl.LOCK_SH)
        self.waited_s += time.perf_counter() - start
        self._stepping = True

    def done(self) -> None:
        """The training is over: its hold on the cores goes."""
        if self._stepping:
            fcntl.flock(self._fd(CORES), fcntl.LOCK_UN)
            self._stepping = False

    def gated(self, threads: Callable[[], int]) -> Callable[[], int]:
        """`threads` (asked before every training step) that also passes the gate."""
        def ask() -> int:
            self.step()
            return threads()

        return ask
