"""Trials as a frame, the Pareto front and the best trial: the numbers the plots and exports use."""

import io
import json
import math

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from nas.arch import Architecture, load_architecture
from nas.pareto import (
    TRIAL_ATTRS,
    baselines_summary,
    best_trial_row,
    front_exponent,
    history_frame,
    pareto_frame,
    pareto_mask,
    points_frame,
    target_drift_note,
    trials_frame,
)
from nas.reward import reward

optuna.logging.set_verbosity(optuna.logging.WARNING)

OP = CategoricalDistribution(["sepconv", "mbconv"])


def _attrs(acc: float, lat: float, reward: float, **extra) -> dict:
    arch = load_architecture("mnasnet_b1")
    return {"accuracy": acc, "latency_ms": lat, "latency_p10_ms": lat * 0.9,
            "latency_p90_ms": lat * 1.2, "reward": reward, "params": 1_000_000, "macs": 5e7,
            "arch": f"arch_{acc}_{lat}", "arch_dict": arch.to_dict(), "train_s": 1.5,
            "latency_s": 0.2, **extra}


def _study(multi: bool = False) -> optuna.Study:
    """A hand-made study: five searched trials, one failed, one baseline, one pruned."""
    study = optuna.create_study(directions=["maximize", "minimize"] if multi else ["maximize"])
    rows = [  # (acc, lat, reward)
        (0.70, 10.0, 0.71),  # 0: front (fastest)
        (0.80, 20.0, 0.80),  # 1: front
        (0.75, 25.0, 0.74),  # 2: dominated by 1
        (0.90, 40.0, 0.85),  # 3: front, best reward
        (0.85, 45.0, 0.85),  # 4: dominated by 3; ties 3 on reward (3 is earlier)
    ]
    for acc, lat, rew in rows:
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, values=[acc, lat] if multi else None,
            value=None if multi else rew, params={"b0_op": "mbconv"}, distributions={"b0_op": OP},
            user_attrs=_attrs(acc, lat, rew)))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"b0_op": "sepconv"},
                                 distributions={"b0_op": OP},
                                 user_attrs={"fail_reason": "CandidateFailed: NaN loss"}))
    # A baseline that dominates everything and has the highest reward: plotted, never exported.
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, values=[0.99, 5.0] if multi else None,
        value=None if multi else 0.99, user_attrs=_attrs(0.99, 5.0, 0.99, baseline="mnasnet_b1")))
    # Optuna keeps a pruned trial's last intermediate report (an accuracy) as its value
    study.add_trial(create_trial(state=TrialState.PRUNED, value=None if multi else 0.13,
                                 intermediate_values={1: 0.13}, user_attrs={"latency_ms": 500.0}))
    return study


def _brute_force_mask(acc: np.ndarray, lat: np.ndarray) -> np.ndarray:
    ok = np.isfinite(acc) & np.isfinite(lat)
    keep = []
    for i in range(len(acc)):
        dominated = any(ok[j] and acc[j] >= acc[i] and lat[j] <= lat[i]
                        and (acc[j] > acc[i] or lat[j] < lat[i]) for j in range(len(acc)))
        keep.append(bool(ok[i] and not dominated))
    return np.array(keep)


def test_pareto_mask_hand_example():
    points = {  # name: (acc, lat)
        "A": (0.9, 10), "B": (0.8, 5), "C": (0.85, 12), "D": (0.9, 10), "E": (0.7, 5),
        "F": (0.95, 20), "G": (math.nan, 1), "H": (0.9, 11), "I": (0.99, math.inf),
    }
    acc, lat = zip(*points.values(), strict=True)
    mask = pareto_mask(list(acc), list(lat))
    on = {name for name, m in zip(points, mask, strict=True) if m}
    # C is beaten by A; E by B (same latency, less accurate); H by A (same accuracy, slower);
    # G and I have a non-finite coordinate; A and D are the same point and both stay.
    assert on == {"A", "B", "D", "F"}


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    acc = rng.integers(0, 6, 60) / 10  # coarse grids force ties and duplicates
    lat = rng.integers(1, 8, 60).astype(float)
    acc[rng.integers(0, 60, 3)] = np.nan
    assert np.array_equal(pareto_mask(acc, lat), _brute_force_mask(acc, lat))


def test_pareto_mask_edge_cases():
    assert pareto_mask([], []).tolist() == []
    assert pareto_mask([0.5], [3.0]).tolist() == [True]
    with pytest.raises(ValueError, match=r"equal length; got shapes \(2,\) and \(3,\)"):
        pareto_mask([0.1, 0.2], [1, 2, 3])


def test_trials_frame_has_clean_columns():
    df = trials_frame(_study())
    assert len(df) == 8
    assert list(df.columns[:6]) == ["number", "state", "value", "datetime_start",
                                    "datetime_complete", "duration_s"]
    assert set(TRIAL_ATTRS) <= set(df.columns)
    assert not [c for c in df.columns if c.startswith(("user_attrs", "params_"))]
    assert df.state.tolist() == ["COMPLETE"] * 5 + ["FAIL", "COMPLETE", "PRUNED"]
    assert df.choice_b0_op.tolist()[:6] == ["mbconv"] * 5 + ["sepconv"]
    assert df.value.tolist()[:5] == [0.71, 0.80, 0.74, 0.85, 0.85]
    assert df.value[5:].isna().tolist() == [True, False, True]  # failed, baseline, pruned
    assert df.fail_reason[5] == "CandidateFailed: NaN loss"
    assert df.baseline[6] == "mnasnet_b1" and df.baseline[:6].isna().all()
    assert df.params[0] == 1_000_000 and df.latency_p90_ms[0] == pytest.approx(12.0)
    # arch_dict is JSON text, so trials.csv holds it losslessly.
    assert Architecture.from_dict(json.loads(df.arch_dict[0])) == load_architecture("mnasnet_b1")


def test_trials_frame_survives_csv():
    df = trials_frame(_study())
    back = pd.read_csv(io.StringIO(df.to_csv(index=False)))
    assert Architecture.from_dict(json.loads(back.arch_dict[3])).name == "mnasnet_b1"
    assert pareto_frame(back).number.tolist() == pareto_frame(df).number.tolist()


def test_trials_frame_of_multi_objective_and_empty_studies():
    df = trials_frame(_study(multi=True))
    assert df.value.isna().all()
    assert df.value_0.tolist()[:2] == [0.70, 0.80] and df.value_1.tolist()[:2] == [10.0, 20.0]
    empty = trials_frame(optuna.create_study())
    assert len(empty) == 0 and {"number", "accuracy", "latency_ms", "reward"} <= set(empty)
    assert len(pareto_frame(empty)) == 0 and best_trial_row(empty) is None


def test_pareto_frame_is_the_searched_front_fastest_first():
    df = trials_frame(_study())
    front = pareto_frame(df)
    assert front.number.tolist() == [0, 1, 3]
    assert front.latency_ms.tolist() == [10.0, 20.0, 40.0]
    assert front.accuracy.is_monotonic_increasing
    pts = points_frame(df)
    assert pts.number.tolist() == [0, 1, 2, 3, 4, 6]  # completed with accuracy and latency
    assert pts.is_baseline.tolist() == [False] * 5 + [True]
    assert not pts.on_front[pts.is_baseline].any()


def test_best_trial_row_is_the_searched_trial_with_highest_reward():
    df = trials_frame(_study())
    best = best_trial_row(df)
    assert best["number"] == 3  # 4 ties on reward; the baseline's 0.99 does not count
    # With baseline rows appended as results.py does (no trial number), nothing changes.
    baselines = pd.DataFrame([{"baseline": "mobilenet_v2", "state": "COMPLETE", "reward": 1.0,
                               "accuracy": 0.95, "latency_ms": 1.0}])
    both = pd.concat([df, baselines], ignore_index=True)
    assert best_trial_row(both)["number"] == 3
    assert pareto_frame(both).number.tolist() == [0, 1, 3]


def test_history_frame_running_best():
    h = history_frame(trials_frame(_study()))
    assert h.number.tolist() == [0, 1, 2, 3, 4]
    assert h.value.tolist() == [0.71, 0.80, 0.74, 0.85, 0.85]
    assert h.best_value.tolist() == [0.71, 0.80, 0.80, 0.85, 0.85]
    assert h.arch[0] == "arch_0.7_10.0"


def test_history_frame_of_two_objectives():
    h = history_frame(trials_frame(_study(multi=True)))
    assert list(h.columns) == ["number", "arch", "accuracy", "latency_ms", "best_accuracy",
                               "best_latency_ms"]
    assert h.best_accuracy.tolist() == [0.70, 0.80, 0.80, 0.90, 0.90]
    assert h.best_latency_ms.tolist() == [10.0] * 5


def _trade_off_frame(slope: float, target_ms: float, beta: float, alpha: float | None = None
                     ) -> pd.DataFrame:
    """A front on which accuracy grows exactly as latency ** slope, dominated trials below it,
    a baseline above it, rewards as the search computes them."""
    lat = np.array([2.0, 4.0, 8.0, 16.0])
    acc = 0.2 * (lat / 2.0) ** slope
    rows = [dict(number=i, state="COMPLETE", accuracy=a, latency_ms=x, baseline=None)
            for i, (a, x) in enumerate(zip(acc, lat, strict=True))]
    rows += [dict(number=4, state="COMPLETE", accuracy=0.1, latency_ms=5.0, baseline=None),
             dict(number=5, state="COMPLETE", accuracy=0.9, latency_ms=3.0,
                  baseline="mobilenet_v2"),
             dict(number=6, state="FAIL", accuracy=math.nan, latency_ms=math.nan, baseline=None)]
    df = pd.DataFrame(rows)
    df["reward"] = [reward(a, x, target_ms, alpha=beta if alpha is None else alpha,
                           beta=beta) if s == "COMPLETE"
                    else math.nan for a, x, s in zip(df.accuracy, df.latency_ms, df.state,
                                                      strict=True)]
    return df


def test_front_exponent_is_the_fronts_log_log_slope():
    df = _trade_off_frame(0.3, target_ms=4.0, beta=-0.07)
    # dominated trial 4 and the (more accurate) baseline must not bend the fit
    assert front_exponent(df) == pytest.approx(0.3, abs=1e-9)
    assert front_exponent(df.iloc[[0, 1, 4]]) is None  # a front of two
    assert front_exponent(df.iloc[0:0]) is None


def test_drift_note_names_the_exponent_only_when_it_moves_the_best_past_t():
    soft = _trade_off_frame(0.3, target_ms=4.0, beta=-0.07)
    note = target_drift_note(soft, 4.0, -0.07)
    # reward ~ lat ** (0.3 - 0.07): the slowest front member (16 ms) wins, 4 x T
    assert note is not None and "4.00 x T" in note and "latency^0.30" in note
    assert "--mode hard" in note and "below -0.30" in note
    # a beta that outweighs the front is not the cause, even with the best above T
    assert target_drift_note(soft, 4.0, -0.5) is None
    hard = _trade_off_frame(0.3, target_ms=4.0, beta=-1.0, alpha=0.0)
    assert target_drift_note(hard, 4.0, -1.0) is None  # beta outweighs the front: best at T
    # a T at the slowest member: the best is at T, nothing to explain
    assert target_drift_note(_trade_off_frame(0.3, 16.0, -0.07), 16.0, -0.07) is None


def test_export_gives_the_drift_note_with_its_own_way_to_a_network_nearer_t():
    from nas.export import drift_note
    soft = _trade_off_frame(0.3, target_ms=4.0, beta=-0.07)
    settings = {"objective": "reward", "target_ms": 4.0, "alpha": -0.07, "beta": -0.07}
    note = drift_note(soft, settings)
    assert note.startswith("note: the best trial's latency is 4.00 x T") and "--pareto K" in note
    assert drift_note(soft, {**settings, "objective": "pareto"}) is None
    assert drift_note(soft, {"objective": "reward", "target_ms": 4.0}) is None  # beta unknown


def test_baselines_summary_says_which_baseline_beats_the_search_and_how():
    df = _trade_off_frame(0.3, target_ms=4.0, beta=-0.07)
    searched, base = df[df.baseline.isna()], df[df.baseline.notna()]
    slow = dict(number=7, state="COMPLETE", accuracy=0.15, latency_ms=10.0, reward=0.1,
                baseline="resnet18")
    failed = dict(number=8, state="FAIL", accuracy=math.nan, latency_ms=math.nan,
                  reward=math.nan, baseline="mnasnet_a1")
    base = pd.concat([base, pd.DataFrame([slow, failed])], ignore_index=True)
    text = baselines_summary(searched, base)
    lines = text.splitlines()
    best = best_trial_row(searched)
    assert f"best trial {best.number}: reward {best.reward:.4f}" in lines[0]
    # mobilenet_v2 (0.9 at 3 ms) beats the best reward and the front's 4, 8 and 16 ms members
    v2 = next(line for line in lines if "mobilenet_v2" in line)
    assert "3.00 ms" in v2 and "acc 0.9000" in v2 and "above the best trial" in v2
    assert "faster and more accurate than 3 of the 4 front trials" in v2
    r18 = next(line for line in lines if "resnet18" in line)
    assert "10.00 ms" in r18 and "(" not in r18  # slower and less accurate: no claim
    assert "mnasnet_a1" not in text  # a failed baseline has nothing to compare
    assert lines[-1].startswith("note: mobilenet_v2 scores above every trial so far")
    # a baseline the search beats is listed without the note
    assert "note:" not in baselines_summary(searched, pd.DataFrame([slow]))
    assert baselines_summary(searched, pd.DataFrame()) is None
    # a hand-made frame without trial numbers still has a heading
    assert "(best trial: reward" in baselines_summary(searched.drop(columns="number"), base)
    assert baselines_summary(searched, pd.DataFrame([failed])) is None
