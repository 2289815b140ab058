"""--workers N: N - 1 spawned processes running the same search on the same study (no
baselines, no results: the first process writes those)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from typing import Any

from nas.interrupts import (
    INTERRUPT_STATUSES,
    INTERRUPTED,
    STOP_SIGNALS,
    catch_stop_signals,
    exit_now_if_interrupted,
    was_interrupted,
)
from nas.search.config import SearchConfig


class Workers:
    """The other --workers processes, started by Workers.start.

    SIGINT and SIGTERM are held back (blocked, not ignored: a signal arriving then is not lost)
    while they are spawned, and the children start with them held back too, so an interrupt
    cannot land mid-import as a traceback; each child lets them through once its handlers are
    in place, and also exits if `stop` was set before that. The first process waits until all
    are ready, so they share the trials from the start.
    """

    def __init__(self, stop: Any, procs: list[Any]) -> None:
        self.stop, self.procs = stop, procs

    @classmethod
    def start(cls, config: SearchConfig) -> Workers:
        spawn = multiprocessing.get_context("spawn")  # no forked thread pools or SQLite handles
        workers, ready = cls(spawn.Event(), []), []
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for i in range(1, config.workers):
                ready.append(spawn.Event())
                workers.procs.append(spawn.Process(
                    target=worker_main, name=f"nas-worker-{i}",
                    args=(config.child(i), workers.stop, ready[-1])))
                workers.procs[-1].start()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            workers.interrupt()
            raise
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one held back arrives here
            while any(p.is_alive() and not r.is_set()
                      for p, r in zip(workers.procs, ready, strict=True)):
                time.sleep(0.05)
        except KeyboardInterrupt:
            workers.interrupt()
            raise
        return workers

    def join(self) -> None:
        for proc in self.procs:
            proc.join()

    def interrupt(self, grace_s: float = 2.0, kill_after_s: float = 20.0) -> None:
        """Pass an interrupt on to workers that did not get it themselves (a `kill -INT` or
        `kill -TERM` of this process), all at once; kill one still running after that (its
        trial is then failed as a dead worker's). Workers hold SIGTERM as an interrupt, so the
        last resort is SIGKILL. At most grace_s + kill_after_s seconds, whatever N."""
        self.stop.set()
        started = [p for p in self.procs if p.pid is not None]
        deadline = time.monotonic() + grace_s
        for proc in started:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in started:
            if proc.is_alive():
                os.kill(proc.pid, INTERRUPTED.signum)
        deadline = time.monotonic() + kill_after_s
        for proc in started:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in started:
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)

    def failed(self) -> int:
        return sum(p.exitcode not in (0, *INTERRUPT_STATUSES) for p in self.procs)


def worker_main(config: SearchConfig, stop: Any, ready: Any) -> None:
    """Entry point of a spawned worker: the search loop only; the first worker writes results."""
    from nas.search.runner import guarded_run  # the runner starts the workers

    try:
        catch_stop_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back since the spawn
        if stop.is_set():
            raise KeyboardInterrupt
        status = guarded_run(config, write=False, ready=ready, stop=stop)
    except BaseException as e:  # Ctrl-C reaches the whole process group; the first one reports
        if not was_interrupted(e):
            raise
        status = INTERRUPTED.status()
    exit_now_if_interrupted(status)
    sys.exit(status)
