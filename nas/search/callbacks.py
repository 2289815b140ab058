"""What runs after each trial: the progress line, the stop at --trials, the stop on an
interrupt that Python swallowed."""

from __future__ import annotations

import time
from typing import Any

import optuna

from nas.interrupts import INTERRUPTED
from nas.search.trial_end import finished_count


class Progress:
    """One line per finished trial: number, architecture, latency, accuracy, reward, time, ETA."""

    def __init__(self, total: int, already: int) -> None:
        self.total, self.already, self.start = total, already, time.time()

    def __call__(self, study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        done = finished_count(study)
        elapsed = time.time() - self.start
        per = elapsed / max(1, done - self.already)
        eta = per * max(0, self.total - done)
        ua = t.user_attrs
        lat = f"{ua['latency_ms']:7.2f} ms" if "latency_ms" in ua else "      - ms"
        acc = f"{ua['accuracy']:.4f}" if "accuracy" in ua else "     -"
        rew = f"{ua['reward']:.4f}" if "reward" in ua else "     -"
        state = "" if t.state == optuna.trial.TrialState.COMPLETE else f"  [{t.state.name}" + (
            f": {ua['fail_reason']}]" if "fail_reason" in ua else "]")
        print(f"[{done:>3}/{self.total}] trial {t.number:>3}  {ua.get('arch', '?')}  lat {lat}  "
              f"acc {acc}  reward {rew}  {t.duration.total_seconds() if t.duration else 0:5.0f}s"
              f"  elapsed {_hms(elapsed)}  eta {_hms(eta)}{state}", flush=True)


def _hms(s: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(s))


class StopAtTrials:
    """Optuna's MaxTrialsCallback, counting only trials that count toward --trials."""

    def __init__(self, trials: int) -> None:
        self.trials = trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if finished_count(study) >= self.trials:
            study.stop()


class StopOnInterrupt:
    """An interrupt that Python swallowed (raised in a GC callback) or a --workers child's
    `stop` event still stops the search after this trial."""

    def __init__(self, stop: Any = None) -> None:
        self.stop = stop

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if INTERRUPTED.is_set() or (self.stop is not None and self.stop.is_set()):
            study.stop()
