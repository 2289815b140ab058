"""Which worker runs what, and whether it is still alive: a trial is stamped "host:pid" when it
is created, so the trial of a worker killed on this host is failed at once (others by the
storage's heartbeat, after GRACE_S), and processes training this study can be counted to share
the cores (cpu_share)."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Iterator

import optuna

from nas.interrupts import INTERRUPTED
from nas.search.trial_end import DIED, END_ATTR, TrialEnd

HEARTBEAT_S, GRACE_S = 30, 120  # a worker silent for 2 minutes is presumed dead
BASELINES_ATTR = "training_baselines:"  # + worker_id(): a study attribute, True while it does


def worker_id() -> str:
    """Who runs a trial, "host:pid": how an interrupted or dead worker's trial is found."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StampedStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage, each new trial created with its worker_id in the same transaction.

    Optuna's ask creates a trial, then builds it (the sampler reads the study) and starts the
    heartbeat before the objective runs: an interrupt there left a RUNNING trial that no
    process knew as its own (fail_dead_local_trials). _create_new_trial is what both
    RDBStorage and Optuna's cache over it call."""

    def _create_new_trial(self, study_id: int,
                          template_trial: optuna.trial.FrozenTrial | None = None
                          ) -> optuna.trial.FrozenTrial:
        if template_trial is None:
            template_trial = optuna.trial.FrozenTrial(
                number=-1, state=optuna.trial.TrialState.RUNNING, value=None,
                datetime_start=datetime.datetime.now(), datetime_complete=None, params={},
                distributions={}, user_attrs={"worker": worker_id()}, system_attrs={},
                intermediate_values={}, trial_id=-1)
        return super()._create_new_trial(study_id, template_trial)


def local_running_trials(study: optuna.Study) -> Iterator[tuple[optuna.trial.FrozenTrial, int]]:
    """The RUNNING trials of workers on this host, with their worker's pid."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        wh, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if wh == host and pid.isdigit():
            yield t, int(pid)


def fail_dead_local_trials(study: optuna.Study, *, ours: bool = False) -> list[int]:
    """A RUNNING trial whose worker was on this host and is gone was killed: fail it now.

    With `ours`, this process's own RUNNING trials count as gone too (it has left its loop, e.g.
    an interrupt that landed in Optuna's own code rather than in the objective). Workers
    elsewhere are covered by the storage heartbeat (failed after GRACE_S seconds).
    """
    failed = []
    for t, pid in list(local_running_trials(study)):
        if (ours and pid == os.getpid()) or not _alive(pid):
            end, reason = ((TrialEnd.INTERRUPTED, INTERRUPTED.reason()) if pid == os.getpid()
                           else (TrialEnd.DIED, f"worker {t.user_attrs['worker']} {DIED}"))
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            study._storage.set_trial_user_attr(t._trial_id, END_ATTR, end.value)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            failed.append(t.number)
    return failed


def local_baselines_flags(study: optuna.Study) -> Iterator[tuple[str, int]]:
    """The raised baselines flags of processes on this host, with their pid."""
    host = socket.gethostname()
    for key, on in study._storage.get_study_system_attrs(study._study_id).items():
        wh, _, pid = key.removeprefix(BASELINES_ATTR).rpartition(":")
        if on is True and key.startswith(BASELINES_ATTR) and wh == host and pid.isdigit():
            yield key, int(pid)


def set_baselines_flag(study: optuna.Study, on: bool) -> None:
    """Tell other processes this one trains baselines: a missed flag costs cores, not a run."""
    try:
        study._storage.set_study_system_attr(study._study_id, f"{BASELINES_ATTR}{worker_id()}",
                                             on)
    except Exception:
        if INTERRUPTED.is_set():
            raise


def lower_dead_baselines_flags(study: optuna.Study) -> None:
    """A process killed while it trained baselines left its flag up: lowered, before its pid
    can be reused by a process that would then count as training."""
    for key, pid in list(local_baselines_flags(study)):
        if not _alive(pid):
            study._storage.set_study_system_attr(study._study_id, key, False)


def local_trainers(study: optuna.Study) -> int:
    """Live processes on this host with a trial of the study in flight or training its
    baselines, this one included."""
    pids = {pid for _, pid in local_running_trials(study)} | {os.getpid()}
    pids |= {pid for _, pid in local_baselines_flags(study)}
    return len({pid for pid in pids if _alive(pid)})


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
