"""The interleaved protocol's yardstick kept per machine: the reference network's latency as
the median of its recent sittings on this machine, not one process's sitting.

A sitting is the reference timed alone for a few seconds (nas.interleaved). Interleaving cancels
the speed swings of a shared core in the candidate/reference ratio, but the one sitting that
turns ratios into milliseconds does not: two studies on one machine calibrated mnasnet_a1 at
7.29 and 7.69 ms (+5.5%) while their ratios agreed within -0.9..+2.4%
(benchmarks/results/sampler_real_zen4.txt). Every process that calibrates adds its sitting to
`<cache>/reference_latency.json` ($NAS_CACHE, else ~/.cache/nas) and takes the median of the
last SITTINGS under the same context (device and its model, runtime and version, precision,
threads, input size, reference, classes), so studies, confirmations and servers on one machine
measure by one yardstick that steadies as sittings accumulate: between fresh processes the
largest drift of a network fell from 8.1% to 3.8% beside a training, the median from 4.8% to 1.8%
(benchmarks/results/latency_aa_calibrated_zen4.txt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from nas.files import cache_root, write_atomic
from nas.latency import LatencyContext

FILE = "reference_latency.json"
SITTINGS = 9  # the median of the last 9: one odd sitting (a neighbour's burst) moves it little


def store_path() -> Path:
    return cache_root() / FILE


def context_key(context: LatencyContext, reference: str, num_classes: int) -> str:
    """What the reference's latency depends on; the protocol and batch are always the same."""
    c = dataclasses.replace(context, protocol="single")
    return json.dumps({**dataclasses.asdict(c), "reference": reference,
                       "num_classes": num_classes}, sort_keys=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """flock(2) on a sibling file: concurrent processes add their sittings one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or a cache unreadable: started again
        return {}
    return data if isinstance(data, dict) else {}


def add_sitting(context: LatencyContext, reference: str, num_classes: int,
                measure: Callable[[], float]) -> float:
    """Time a new sitting with `measure` (ms), keep it, and return the median of this
    machine's last SITTINGS sittings in this context, the new one included."""
    ms = float(measure())
    path = store_path()
    key = context_key(context, reference, num_classes)
    with _locked(path):
        data = _read(path)
        sittings = [s for s in data.get(key, []) if isinstance(s, dict)
                    and isinstance(s.get("ms"), (int, float)) and s["ms"] > 0]
        sittings = (sittings + [{"ms": ms, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "pid": os.getpid()}])[-SITTINGS:]
        data[key] = sittings
        write_atomic(path, json.dumps(data, indent=1))
    return float(statistics.median(s["ms"] for s in sittings))


def sittings(context: LatencyContext, reference: str, num_classes: int) -> list[float]:
    """The kept sittings (ms, oldest first): for reports and tests."""
    return [s["ms"] for s in _read(store_path()).get(context_key(context, reference,
                                                                  num_classes), [])]
