"""The MnasNet reward against hand-computed values of eq. 2."""

import math

import numpy as np
import pytest

from nas.reward import MODES, exponents, reward

SOFT = dict(zip(("alpha", "beta"), MODES["soft"], strict=True))
HARD = dict(zip(("alpha", "beta"), MODES["hard"], strict=True))


def test_modes_are_the_papers():
    assert MODES == {"soft": (-0.07, -0.07), "hard": (0.0, -1.0)}
    assert exponents("soft") == (-0.07, -0.07)
    assert exponents("hard") == (0.0, -1.0)
    assert exponents("soft", -0.1) == (-0.1, -0.07)
    assert exponents("hard", beta=-0.5) == (0.0, -0.5)


def test_soft_reward_hand_computed():
    assert reward(0.75, 100, 80, **SOFT) == pytest.approx(0.75 * math.pow(1.25, -0.07), rel=1e-12)
    assert reward(0.75, 100, 80, **SOFT) == pytest.approx(0.7384, abs=1e-4)
    assert reward(0.75, 40, 80, **SOFT) == pytest.approx(0.75 * math.pow(0.5, -0.07), rel=1e-12)
    # The paper's reading of -0.07: twice as slow must be ~5% more accurate to score the same
    # (a misprinted -0.7 would demand 62% more).
    assert reward(1.0, 160, 80, **SOFT) == pytest.approx(0.9526, abs=1e-4)


def test_hard_reward_is_accuracy_below_and_scaled_above_the_target():
    assert reward(0.75, 40, 80, **HARD) == 0.75
    assert reward(0.75, 80, 80, **HARD) == 0.75
    assert reward(0.75, 100, 80, **HARD) == pytest.approx(0.75 * 80 / 100, rel=1e-12)
    assert reward(0.75, 160, 80, **HARD) == pytest.approx(0.375, rel=1e-12)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_target_is_where_the_exponent_switches(mode):
    alpha, beta = MODES[mode]
    acc, t, eps = 0.8, 80.0, 1e-6
    # At T both branches give ACC (ratio 1), so the reward is continuous; its slope is not.
    assert reward(acc, t, t, alpha=alpha, beta=beta) == acc
    above = reward(acc, t + eps, t, alpha=alpha, beta=beta)
    assert above == pytest.approx(acc * math.pow((t + eps) / t, beta), rel=1e-12)
    assert above < acc
    below = reward(acc, t - eps, t, alpha=alpha, beta=beta)
    assert below == pytest.approx(acc * math.pow((t - eps) / t, alpha), rel=1e-12)
    if mode == "hard":
        assert below == acc  # no credit for being faster than needed
        # Slope just above T is -ACC/T, against 0 just below: the kink of the hard constraint.
        assert (above - acc) / eps == pytest.approx(-acc / t, rel=1e-4)


def test_soft_reward_decreases_strictly_with_latency():
    lats = np.linspace(1, 400, 200)
    values = [reward(0.7, float(lat), 80, **SOFT) for lat in lats]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_hard_reward_is_flat_then_decreasing():
    values = [reward(0.7, float(lat), 80, **HARD) for lat in np.linspace(1, 400, 200)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_reward_accepts_numpy_scalars():
    assert reward(np.float32(0.5), np.float64(80), 80, **SOFT) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"acc": 1.2}, "acc=1.2 must be a finite fraction in [0, 1]"),
    ({"acc": -0.1}, "acc=-0.1"),
    ({"acc": math.nan}, "acc=nan"),
    ({"lat_ms": 0.0}, "lat_ms=0.0 must be a finite number > 0"),
    ({"lat_ms": math.inf}, "lat_ms=inf"),
    ({"target_ms": -5}, "target_ms=-5 must be a finite number > 0"),
    ({"alpha": math.nan}, "alpha=nan must be a finite number"),
])
def test_reward_rejects_bad_inputs(kwargs, fragment):
    args = {"acc": 0.7, "lat_ms": 50.0, "target_ms": 80.0, **SOFT} | kwargs
    with pytest.raises(ValueError) as err:
        reward(args.pop("acc"), args.pop("lat_ms"), args.pop("target_ms"), **args)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_exponents_reject_unknown_modes_and_positive_exponents():
    with pytest.raises(ValueError, match="mode='medium' is not known; expected one of"):
        exponents("medium")
    with pytest.raises(ValueError, match="beta=0.07 must be a finite number <= 0"):
        exponents("soft", beta=0.07)
    with pytest.raises(ValueError, match="alpha=inf"):
        exponents("soft", alpha=math.inf)
