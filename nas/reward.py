"""The MnasNet reward: accuracy traded against measured latency around a target T.

Tan et al., CVPR 2019, eq. 2:  ACC(m) * (LAT(m) / T) ** w,  w = alpha if LAT(m) <= T else beta.
"""

from __future__ import annotations

import math
import numbers

# Section 3 of the paper: alpha = beta = -0.07 ("soft": a model twice as slow must be ~5% more
# accurate to score the same, 2 ** -0.07 = 0.953) and alpha = 0, beta = -1 ("hard": the
# constraint case, where being faster than T earns nothing). Some blog posts print -0.7 for the
# soft exponent; that is a misprint: 2 ** -0.7 = 0.62 would punish a 2x slower model by 38%.
MODES: dict[str, tuple[float, float]] = {"soft": (-0.07, -0.07), "hard": (0.0, -1.0)}


def exponents(mode: str, alpha: float | None = None, beta: float | None = None
              ) -> tuple[float, float]:
    """The (alpha, beta) of a named mode, either one overridden by the caller."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not known; expected one of {sorted(MODES)}")
    a, b = MODES[mode]
    a = a if alpha is None else alpha
    b = b if beta is None else beta
    for name, value in (("alpha", a), ("beta", b)):
        # A positive exponent would reward slower models: almost surely a dropped minus sign.
        if not _finite(value) or value > 0:
            raise ValueError(f"{name}={value!r} must be a finite number <= 0 (MnasNet: soft "
                             f"{MODES['soft'][0]}, hard beta {MODES['hard'][1]})")
    return float(a), float(b)


def reward(acc: float, lat_ms: float, target_ms: float, *, alpha: float, beta: float) -> float:
    """ACC * (LAT/T)^w with w = alpha at or under the target, beta above it (MnasNet eq. 2)."""
    if not _finite(acc) or not 0 <= acc <= 1:
        raise ValueError(f"acc={acc!r} must be a finite fraction in [0, 1]")
    if not _finite(lat_ms) or lat_ms <= 0:
        raise ValueError(f"lat_ms={lat_ms!r} must be a finite number > 0")
    if not _finite(target_ms) or target_ms <= 0:
        raise ValueError(f"target_ms={target_ms!r} must be a finite number > 0")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not _finite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
    w = alpha if lat_ms <= target_ms else beta
    return float(acc * (lat_ms / target_ms) ** w)


def _finite(x: object) -> bool:
    # numbers.Real admits numpy scalars (np.float32 is no float subclass); bools are excluded.
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
