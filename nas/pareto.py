"""Trials as a flat DataFrame, and the accuracy-latency Pareto front computed from it.

Compute only: `nas.figures` draws what these functions return, and the tests check these numbers.
Reference networks ("baselines") are drawn for comparison but never enter the exported front or
the best trial: those are about what the search found.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import optuna
import pandas as pd

# User attributes the search records on each trial; always present as columns (NaN if unset), so
# readers of trials.csv need no existence checks.
TRIAL_ATTRS = ("arch", "accuracy", "latency_ms", "latency_p10_ms", "latency_p90_ms", "reward",
               "params", "macs", "train_s", "latency_s", "baseline", "fail_reason", "arch_dict")
_CORE = ("number", "state", "value", "datetime_start", "datetime_complete", "duration_s")
CHOICE_PREFIX = "choice_"  # Optuna params (b0_op ...); `params` is the attribute: weight count


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial; user attributes as plain columns, dicts and lists as JSON strings."""
    multi = len(study.directions) > 1
    rows = []
    for t in study.get_trials(deepcopy=False):
        # A pruned trial's value is its last intermediate report (a validation accuracy), not
        # the objective: left out, so the column means one thing.
        done = t.state == optuna.trial.TrialState.COMPLETE
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if done and not multi and t.values is not None else math.nan,
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
            "duration_s": t.duration.total_seconds() if t.duration is not None else math.nan,
        }
        if multi:
            for i in range(len(study.directions)):
                row[f"value_{i}"] = t.values[i] if done and t.values is not None else math.nan
        row.update({f"{CHOICE_PREFIX}{k}": v for k, v in t.params.items()})
        for key, value in t.user_attrs.items():
            # JSON keeps trials.csv loadable (a dict's repr is not); core names are not shadowed.
            name = f"attr_{key}" if key in _CORE or key.startswith(("value_", CHOICE_PREFIX)) \
                else key
            row[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in (*_CORE, *TRIAL_ATTRS):
        if col not in df:
            df[col] = pd.Series([math.nan] * len(df), dtype=object if col in (
                "state", "arch", "baseline", "fail_reason", "arch_dict") else float)
    first = [*_CORE, *(c for c in df if c.startswith("value_")), *TRIAL_ATTRS]
    rest = sorted(c for c in df if c not in first)
    return df[first + rest]


def pareto_mask(acc: Any, lat: Any) -> np.ndarray:
    """Non-dominated points, maximising accuracy and minimising latency, in O(n log n).

    A point is dominated if another is at least as good in both and better in one; so exact
    duplicates do not dominate each other and are all kept (as Optuna's `best_trials` does).
    Points with a NaN or infinite coordinate are never on the front.
    """
    acc, lat = np.asarray(acc, dtype=float), np.asarray(lat, dtype=float)
    if acc.ndim != 1 or acc.shape != lat.shape:
        raise ValueError(f"acc and lat must be 1-D of equal length; got shapes {acc.shape} and "
                         f"{lat.shape}")
    mask = np.zeros(len(acc), dtype=bool)
    ok = np.flatnonzero(np.isfinite(acc) & np.isfinite(lat))
    if not len(ok):
        return mask
    points, inverse = np.unique(np.column_stack([lat[ok], -acc[ok]]), axis=0,
                                return_inverse=True)
    # Unique points sorted by latency, then by accuracy descending: a point is on the front iff
    # it is more accurate than every faster (or equally fast and more accurate) point before it.
    best_before = np.concatenate([[-np.inf], np.maximum.accumulate(-points[:-1, 1])])
    front = -points[:, 1] > best_before
    mask[ok] = front[inverse.reshape(-1)]
    return mask


def is_baseline(df: pd.DataFrame) -> pd.Series:
    """Rows that measure a reference network rather than a searched one."""
    if "baseline" not in df:
        return pd.Series(False, index=df.index)
    names = df["baseline"]
    return names.notna() & (names.astype(str).str.strip() != "")


def completed(df: pd.DataFrame) -> pd.DataFrame:
    """COMPLETE rows (rows without a state column, like hand-made frames, count as complete)."""
    return df[df["state"] == "COMPLETE"] if "state" in df else df


def points_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Every plottable point (completed, finite accuracy and latency), flagged for plotting.

    `is_baseline` marks reference networks; `on_front` marks the Pareto front of the searched
    trials (baselines are compared with the front, not part of it).
    """
    if not {"accuracy", "latency_ms"} <= set(df.columns):
        return df.iloc[0:0].assign(is_baseline=False, on_front=False)
    done = completed(df)
    acc = pd.to_numeric(done["accuracy"], errors="coerce")
    lat = pd.to_numeric(done["latency_ms"], errors="coerce")
    pts = done[np.isfinite(acc) & np.isfinite(lat)].copy()
    pts["is_baseline"] = is_baseline(pts)
    pts["on_front"] = False
    searched = ~pts["is_baseline"]
    pts.loc[searched, "on_front"] = pareto_mask(pts.loc[searched, "accuracy"].astype(float),
                                                pts.loc[searched, "latency_ms"].astype(float))
    return pts


def pareto_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The front of the searched trials, fastest first (row 0 = fastest, last = most accurate)."""
    pts = points_frame(df)
    front = pts[pts["on_front"]].drop(columns=["is_baseline", "on_front"])
    return front.sort_values(["latency_ms", "accuracy"], ascending=[True, False],
                             kind="stable").reset_index(drop=True)


def front_exponent(df: pd.DataFrame) -> float | None:
    """How steeply the searched front buys accuracy with latency: the least-squares slope of
    log accuracy on log latency over the front's members, so that along the front accuracy
    grows roughly as latency ** slope. None with fewer than 3 members.

    The reward along the front then goes as latency ** (slope + w): when the slope exceeds
    -beta, slower members score higher above T and the best trial drifts past the target.
    """
    front = pareto_frame(df)
    if len(front) < 3:
        return None
    acc, lat = (front[c].to_numpy(dtype=float) for c in ("accuracy", "latency_ms"))
    keep = acc > 0  # a front's latencies are > 0; an accuracy of 0 has no logarithm
    if keep.sum() < 3 or np.ptp(np.log(lat[keep])) == 0:
        return None
    return float(np.polyfit(np.log(lat[keep]), np.log(acc[keep]), 1)[0])


def best_trial_row(df: pd.DataFrame) -> pd.Series | None:
    """The searched trial with the highest reward (lowest number on ties), None if there is none."""
    if "reward" not in df:
        return None
    done = completed(df)
    done = done[~is_baseline(done)]
    if "number" in done:
        done = done.sort_values("number", kind="stable")
    reward = pd.to_numeric(done["reward"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(reward).any():
        return None
    return done.iloc[int(np.nanargmax(reward))]  # first maximum: the earliest trial wins ties


# How far past T the best trial may sit before the summary explains why: the re-measured
# front moves by a few percent between sittings (latency_aa_zen4.txt).
DRIFT_TOLERANCE = 1.1


def target_drift_note(df: pd.DataFrame, target_ms: float, beta: float) -> str | None:
    """Why the best trial sits well above T, when the reward's exponent is the cause.

    Along the front, proxy accuracy grows about as latency ** s (front_exponent),
    so the reward above T goes as latency ** (s + beta): with s > -beta, slower members score
    higher. MnasNet's soft beta of -0.07 assumes +5% accuracy per latency doubling; a short
    proxy's front rose as latency ** 0.19..0.53 in the committed searches
    (docs/search.md, search_outcome_*_zen3.txt), and the best trial went to 1.2-1.8x T.
    """
    best = best_trial_row(df)
    s = front_exponent(df)
    if best is None or s is None or s <= -beta:
        return None
    ratio = float(best["latency_ms"]) / target_ms
    if not ratio > DRIFT_TOLERANCE:
        return None
    return (f"note: the best trial's latency is {ratio:.2f} x T. On this run's Pareto front "
            f"proxy accuracy grows as latency^{s:.2f} (+{2 ** s - 1:.0%} per doubling), which "
            f"outweighs --beta {beta:g} (MnasNet's soft reward assumes +5%), so slower networks "
            f"score higher above T. To hold T, search with --mode hard or --beta below {-s:.2f}.")


def baselines_above(baselines: pd.DataFrame, reward: float) -> pd.DataFrame:
    """The completed baselines whose reward is above `reward` (a best trial's; NaN: none), in
    their order, with `reward` as numbers."""
    if not len(baselines) or "reward" not in baselines:
        return pd.DataFrame(columns=["baseline", "reward"])
    done = completed(baselines[is_baseline(baselines)])
    rewards = pd.to_numeric(done["reward"], errors="coerce")
    return done[rewards > reward].assign(reward=rewards[rewards > reward])


def baselines_summary(df: pd.DataFrame, baselines: pd.DataFrame) -> str | None:
    """The baselines beside what the search found, for the end of a search: each one's latency,
    proxy accuracy and reward, whether it scores above the best trial, and how many of the
    searched front's trials it is both faster and more accurate than. None without baselines.

    Both sides went through the same latency protocol and proxy, so a baseline above the best
    trial means the search has not yet found a better network, not that it cannot.
    """
    pts = points_frame(baselines) if len(baselines) else baselines
    base = pts[pts["is_baseline"]] if len(pts) else pts
    if not len(base):
        return None
    front = pareto_frame(df[~is_baseline(df)]) if len(df) else df
    best = best_trial_row(df)
    best_reward = float(best["reward"]) if best is not None else math.nan
    width = max(len(str(n)) for n in base["baseline"])
    above = list(baselines_above(base, best_reward)["baseline"].astype(str))
    lines = []
    for _, b in base.iterrows():
        lat, acc = float(b["latency_ms"]), float(b["accuracy"])
        rew = pd.to_numeric(pd.Series([b.get("reward")]), errors="coerce").iloc[0]
        notes = ["above the best trial"] if str(b["baseline"]) in above else []
        if len(front):
            flat = front["latency_ms"].astype(float).to_numpy()
            facc = front["accuracy"].astype(float).to_numpy()
            beaten = int(np.sum((lat <= flat) & (acc >= facc) & ((lat < flat) | (acc > facc))))
            if beaten:
                notes.append(f"faster and more accurate than {beaten} of the {len(front)} "
                             f"front trials")
        reward_text = f"  reward {rew:.4f}" if math.isfinite(rew) else ""
        lines.append(f"  {b['baseline']:<{width}}  {lat:7.2f} ms  acc {acc:.4f}{reward_text}"
                     + (f"  ({'; '.join(notes)})" if notes else ""))
    head = "Baselines, through the same latency protocol and proxy"
    if best is not None and math.isfinite(best_reward):
        number = best.get("number")
        which = f"best trial {number:.0f}" if pd.notna(number) else "best trial"
        head += f" ({which}: reward {best_reward:.4f})"
    text = "\n".join([head + ":", *lines])
    if above:
        text += (f"\nnote: {', '.join(above)} {'scores' if len(above) == 1 else 'score'} above "
                 f"every trial so far: the search has not yet found a better network. More "
                 f"trials (--trials N, the same command resumes) may; nas.confirm "
                 f"--match-latency checks the answer by full training.")
    return text


def history_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Completed searched trials in trial order with the running best of each objective.

    Single-objective studies (a scalar `value`): columns number, arch, value, best_value.
    Multi-objective ones: number, arch, accuracy, latency_ms, best_accuracy, best_latency_ms.
    """
    done = completed(df)
    done = done[~is_baseline(done) & done.get("number", pd.Series(dtype=float)).notna()]
    done = done.sort_values("number", kind="stable")
    number = done["number"].astype(int).to_numpy() if len(done) else np.array([], dtype=int)
    arch = done.get("arch", pd.Series("", index=done.index)).fillna("").astype(str).to_numpy()
    value = pd.to_numeric(done.get("value", pd.Series(np.nan, index=done.index)),
                          errors="coerce")
    if np.isfinite(value).any():
        v = value.to_numpy(dtype=float)
        return pd.DataFrame({"number": number, "arch": arch, "value": v,
                             "best_value": _running(v, np.fmax)})
    acc = pd.to_numeric(done.get("accuracy", pd.Series(np.nan, index=done.index)),
                        errors="coerce").to_numpy(dtype=float)
    lat = pd.to_numeric(done.get("latency_ms", pd.Series(np.nan, index=done.index)),
                        errors="coerce").to_numpy(dtype=float)
    return pd.DataFrame({"number": number, "arch": arch, "accuracy": acc, "latency_ms": lat,
                         "best_accuracy": _running(acc, np.fmax),
                         "best_latency_ms": _running(lat, np.fmin)})


def _running(x: np.ndarray, op: np.ufunc) -> np.ndarray:
    """Running best that skips NaNs (fmax/fmin ignore them), NaN until the first number."""
    return op.accumulate(x) if len(x) else x
