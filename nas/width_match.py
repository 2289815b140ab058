"""Latency-matched baselines: the width multiplier at which a network family runs nearest a
given latency on this target (MnasNet compares its models with width-scaled baselines at equal
measured latency)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nas.arch import MAX_WIDTH_MULT, MIN_WIDTH_MULT

STEP = 0.05  # multipliers searched: multiples of 0.05


@dataclass(frozen=True)
class WidthMatch:
    """The multiplier whose measured latency is nearest the target, and every one measured."""

    spec: str  # the family, e.g. mobilenet_v2
    target_ms: float
    mult: float
    latency_ms: float
    measured: dict[float, float] = field(default_factory=dict)  # multiplier -> median ms

    @property
    def gap(self) -> float:
        """Relative distance to the target: (latency - target) / target."""
        return (self.latency_ms - self.target_ms) / self.target_ms

    @property
    def spec_at(self) -> str:
        return f"{self.spec}@{self.mult:g}"


def match_width(spec: str, target_ms: float, measure: Callable[[str], float], *,
                lo: float = 0.1, hi: float = 2.0, step: float = STEP) -> WidthMatch:
    """Bisect the multiples of `step` in [lo, hi] for the latency `target_ms`, measuring
    `spec@m` with `measure` (median ms); latency grows with width, and the neighbours of the
    crossing are both measured, so a noisy reading cannot pick the wrong side. Outside the
    range, the nearest end is returned (its gap says how far off it is)."""
    if not (MIN_WIDTH_MULT <= lo < hi <= MAX_WIDTH_MULT):
        raise ValueError(f"lo={lo}, hi={hi}: need {MIN_WIDTH_MULT} <= lo < hi <= "
                         f"{MAX_WIDTH_MULT}")
    grid = [round(k * step, 10) for k in range(round(lo / step), round(hi / step) + 1)]
    measured: dict[float, float] = {}

    def at(i: int) -> float:
        m = grid[i]
        if m not in measured:
            measured[m] = measure(f"{spec}@{m:g}")
        return measured[m]

    a, b = 0, len(grid) - 1  # invariant: the crossing lies in [a, b]
    while b - a > 1:
        mid = (a + b) // 2
        if at(mid) < target_ms:
            a = mid
        else:
            b = mid
    for i in (a, b):
        at(i)
    best = min(measured, key=lambda m: (abs(measured[m] - target_ms), m))
    return WidthMatch(spec, target_ms, best, measured[best], dict(sorted(measured.items())))
