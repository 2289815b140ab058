"""Ctrl-C and SIGTERM, one way for every `python -m nas.<tool>`: the signal sets a flag and
raises KeyboardInterrupt; the tool ends what it was doing, keeps what finished, prints one line
and leaves with the shell's status (130 for Ctrl-C, 143 for SIGTERM), never a traceback.

SIGTERM is the polite stop of `kill`, `timeout`, batch schedulers (SLURM at a job's time
limit) and container runtimes, so it is handled as Ctrl-C is.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPT_STATUSES = tuple(128 + s for s in STOP_SIGNALS)  # the shell's 130 and 143


class _Flag:
    """Set once this process got SIGINT or SIGTERM: Optuna can turn the KeyboardInterrupt into
    another error (an UnboundLocalError from its tell, in optuna 5.0), which still means
    'interrupted'.

    Not a threading.Event: the signal handler sets it, and Event.set() takes a lock that the
    interrupted main thread may be holding at that moment; a plain attribute cannot deadlock."""

    def __init__(self) -> None:
        self.value = False
        self.signum = signal.SIGINT

    def set(self, signum: int = signal.SIGINT) -> None:
        self.signum = signum
        self.value = True

    def is_set(self) -> bool:
        return self.value

    def label(self) -> str:
        """What follows 'interrupted' in a tool's last line: nothing for Ctrl-C."""
        return " (SIGTERM)" if self.signum == signal.SIGTERM else ""

    def reason(self) -> str:
        """The fail_reason of a trial this interrupt stopped."""
        return "interrupted (SIGTERM)" if self.signum == signal.SIGTERM else "interrupted (Ctrl-C)"

    def status(self) -> int:
        """The exit status a shell gives a process this signal stopped: 130, or 143."""
        return 128 + self.signum


INTERRUPTED = _Flag()


def on_sigint(signum: int, frame: Any) -> None:
    """SIGINT's and SIGTERM's handler."""
    INTERRUPTED.set(signum)
    # SQLAlchemy logs, with a traceback, the cursor it could not close when interrupted mid-read
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)
    raise KeyboardInterrupt


def catch_stop_signals() -> None:
    """Install on_sigint for both signals, and keep an interrupt raised in a finalizer quiet."""
    for s in STOP_SIGNALS:
        signal.signal(s, on_sigint)
    if not getattr(sys.unraisablehook, "quiet_interrupts", False):
        sys.unraisablehook = quiet_interrupts(sys.unraisablehook)


def quiet_interrupts(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`hook`, minus the interrupt that on_sigint raised inside a finalizer (a weakref callback
    of SQLAlchemy's, say): Python can only print it there, as 'Exception ignored' with a
    traceback; the flag it set still stops the work."""
    def unraisable(u: Any) -> None:
        if not (isinstance(u.exc_value, KeyboardInterrupt) and INTERRUPTED.is_set()):
            hook(u)

    unraisable.quiet_interrupts = True  # type: ignore[attr-defined]
    return unraisable


def was_interrupted(e: BaseException) -> bool:
    """A KeyboardInterrupt, or any error once a stop signal came (what it surfaced as)."""
    return isinstance(e, KeyboardInterrupt) or (INTERRUPTED.is_set() and isinstance(e, Exception))


def interrupt_status() -> int:
    """The status to leave with after an interrupt (130 if none was caught by on_sigint)."""
    return INTERRUPTED.status() if INTERRUPTED.is_set() else 128 + signal.SIGINT


def exit_now_if_interrupted(code: int) -> None:
    """After an interrupt, leave at once: the results are written, and an interrupt inside
    Optuna's trial can leave its (non-daemon) heartbeat thread running, on which a normal
    interpreter exit would wait forever."""
    if code in INTERRUPT_STATUSES:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_tool(main: Callable[[], int], prog: str) -> NoReturn:
    """`python -m nas.<tool>`: Ctrl-C or SIGTERM ends it with one line and the shell's status,
    not a traceback (the tools write their files atomically: nothing is left half written)."""
    catch_stop_signals()
    try:
        status = main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{INTERRUPTED.label()}", file=sys.stderr)
        status = interrupt_status()
    sys.exit(status)


def run_module(name: str) -> NoReturn:
    """`if __name__ == "__main__": run_module("nas.<tool>")`: run_tool on the package module's
    `main`, not on the `__main__` copy python runs the file as. The modules a tool calls raise
    the package copy's exceptions (nas.latency_client raises nas.latency.LatencyError), which
    the `__main__` copy's `except LatencyError` does not catch: a traceback, not one line."""
    run_tool(importlib.import_module(name).main, name)
