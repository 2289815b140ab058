"""How a trial ended, stored on it as a structured user attribute, and whether it counts toward
--trials: a candidate cut short by an interrupt, a dead worker or a failing study database was
never scored, so the same command evaluates another in its place."""

from __future__ import annotations

import enum

import optuna

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.FAIL)
END_ATTR = "end"
DIED = "died (killed?)"  # the end of a dead worker's trial's fail_reason


class TrialEnd(str, enum.Enum):
    """How a trial that was not scored ended, stored as its user attribute END_ATTR."""

    PRUNED = "pruned"  # could not beat the best reward (or the pruner stopped it)
    FAILED = "failed"  # the candidate failed on its own: NaN loss, out of memory, conversion
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM cut it short
    DIED = "died"  # its worker process was killed
    STORAGE = "storage"  # the study's database failed under it (a restart, a lost connection)


NOT_COUNTED = {TrialEnd.INTERRUPTED.value, TrialEnd.DIED.value, TrialEnd.STORAGE.value}


def set_end(trial: optuna.Trial, end: TrialEnd, reason: str) -> None:
    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr(END_ATTR, end.value)


def counts_toward_trials(t: optuna.trial.FrozenTrial) -> bool:
    """Finished, and not cut short by an interrupt or a dead worker. A failure without a
    fail_reason came from outside the objective, which gives every failure one: the storage
    heartbeat failing a dead worker's trial (Optuna writes no reason)."""
    if t.state != optuna.trial.TrialState.FAIL:
        return t.state in FINISHED
    if END_ATTR in t.user_attrs:
        return t.user_attrs[END_ATTR] not in NOT_COUNTED
    # trials of studies from before 2026-12-05 have only the reason
    reason = t.user_attrs.get("fail_reason", "")
    return bool(reason) and not (reason.startswith("interrupted") or reason.endswith(DIED))


def finished_count(study: optuna.Study) -> int:
    """The trials that count toward --trials."""
    return sum(map(counts_toward_trials, study.get_trials(deepcopy=False, states=FINISHED)))
