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
(benchmarks/results/latency_aa_calibrated_zen4.txt). While a machine's store is young, a process
fills it to YOUNG sittings, so that the next processes' single sittings move its median little:
with a store of 1-3 sittings the yardstick of 3 fresh processes beside a training spanned
5.30-5.76 ms (latency_aa_rounds3_loaded_xeon.txt, x12), with YOUNG within 1% in three runs
(latency_aa_young{,2,3}_loaded_xeon.txt). That buys agreement between studies, not accuracy:
back-to-back sittings vary as much as sittings minutes apart (reference_sittings_xeon.txt).
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
YOUNG = 5  # sittings a young store is filled to by the process that finds it so


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


def _kept(data: dict, key: str) -> list[dict]:
    return [s for s in data.get(key, []) if isinstance(s, dict)
            and isinstance(s.get("ms"), (int, float)) and s["ms"] > 0]


def add_sittings(context: LatencyContext, reference: str, num_classes: int,
                 measure: Callable[[int], list[float]]) -> float:
    """Time new sittings with `measure(n)` (n of them, ms each), keep them, and return the
    median of this machine's last SITTINGS sittings in this context, the new ones included.
    n is 1, or what fills a young store to YOUNG."""
    key = context_key(context, reference, num_classes)
    path = store_path()
    new = [float(ms) for ms in measure(max(1, YOUNG - len(_kept(_read(path), key))))]
    with _locked(path):  # not while measuring: two young processes may both add several
        data = _read(path)
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        kept = (_kept(data, key) + [{"ms": ms, "when": when, "pid": os.getpid()}
                                    for ms in new])[-SITTINGS:]
        data[key] = kept
        write_atomic(path, json.dumps(data, indent=1))
    return float(statistics.median(s["ms"] for s in kept))


def add_sitting(context: LatencyContext, reference: str, num_classes: int,
                measure: Callable[[], float]) -> float:
    """add_sittings with one sitting at a time from `measure` (ms)."""
    return add_sittings(context, reference, num_classes, lambda n: [measure() for _ in range(n)])


def sittings(context: LatencyContext, reference: str, num_classes: int) -> list[float]:
    """The kept sittings (ms, oldest first): for reports and tests."""
    return [s["ms"] for s in _kept(_read(store_path()),
                                   context_key(context, reference, num_classes))]
