"""Hardware-aware architecture search, MnasNet style.

    python -m nas.search --target-ms 80 --mode soft

Each trial: sample an architecture from the search space (Optuna) -> build it -> measure its
latency on the target device at the deployment input size -> proxy-train it on CIFAR-10 and
score it on a validation split held out of the training set -> reward
ACC * (LAT / T)^w with w = alpha if LAT <= T else beta. Everything lands in an Optuna storage
under runs/<name>/ (resumable; several workers may share it), then trials.csv, pareto.csv,
best.yaml and interactive plots are written beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import enum
import functools
import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import sqlalchemy.exc
import torch

from nas.arch import ArchError, Architecture, load_architecture
from nas.cli import (
    MAX_NAME_BYTES,
    MAX_SEED,
    HelpFormatter,
    Parser,
    file_in_the_way,
    is_plain_folder_name,
    oserror_line,
)
from nas.cost import count_macs, count_params
from nas.data import SPLIT_SEED, DataError, DataSplits, load_data, split_train_val
from nas.files import make_folders, remove_if_empty
from nas.latency import (
    DEFAULT_THREADS,
    LatencyCache,
    LatencyError,
    architecture_key,
    available_cpus,
    latency_context,
)
from nas.model import build_model
from nas.proxy import CandidateFailed, ProxyBudget, proxy_train
from nas.results import BaselinesError, load_baselines, save_baselines, write_results
from nas.reward import MODES, exponents, reward
from nas.run_folder import LATENCY_CACHE, STUDY_DB, study_url, write_run_meta
from nas.runtimes import DEFAULT_RUNTIME, PRECISIONS, RUNTIME_NAMES
from nas.runtimes.base import calibration_sample
from nas.space import DEFAULT_SPACE, SearchSpace, SpaceError, load_space

SAMPLERS = ("tpe", "nsga2", "random")
OBJECTIVES = ("reward", "pareto")
HEARTBEAT_S, GRACE_S = 30, 120  # a worker silent for 2 minutes is presumed dead
SETTINGS_THAT_MUST_MATCH = ("target_ms", "alpha", "beta", "objective", "space", "device",
                            "input_size", "threads", "budget", "val_size", "data_fingerprint",
                            "latency_device", "runtime", "precision")
# the flag that sets each ProxyBudget field, for the refusal to resume with another budget
BUDGET_FLAGS = {"train_images": "--proxy-images", "epochs": "--proxy-epochs",
                "batch_size": "--proxy-batch", "ghost_batches": "--proxy-ghost-batches",
                "lr": "--proxy-lr", "final_map": "--proxy-final-map", "val_images": "--val-size"}
# budget fields newer than some studies, with the value those studies were trained with
BUDGET_ADDED_LATER = {"ghost_batches": 1}
# latencies from another CPU or GPU model would mix two hardware targets in one reward;
# studies saved before a setting existed are not refused for lacking it
SETTINGS_ADDED_LATER = ("latency_device",)
# settings newer than some studies, with the value every such study was measured with: a study
# from before 2026-12-05 timed eager PyTorch in float32, and resumes only with those flags
SETTINGS_OF_OLDER_STUDIES = {"runtime": "eager", "precision": "fp32"}
SETTING_FLAGS = {"runtime": "--runtime", "precision": "--precision"}
CALIBRATION_IMAGES = 8  # training images that calibrate an int8 network's quantization

class UsageError(ValueError):
    """A bad flag or file: one line, exit 2, nothing written."""


@dataclasses.dataclass
class Context:
    """What every trial shares."""

    args: argparse.Namespace
    space: SearchSpace
    data: DataSplits
    budget: ProxyBudget
    cache: LatencyCache
    alpha: float
    beta: float


# --------------------------------------------------------------------------- one candidate


def evaluate_architecture(arch: Architecture, ctx: Context, trial: Any = None,
                          record: dict[str, Any] | None = None,
                          threads: Callable[[], int] | None = None) -> dict[str, Any]:
    """Latency on the target, then proxy accuracy, then reward: the record of one candidate.

    Filled into `record` when given, so a caller keeps what was measured before a failure.
    `threads`: the training's CPU threads, asked before each step (default: the trial's
    ThreadShare, or train_threads without a trial)."""
    a = ctx.args
    record = {} if record is None else record
    record.update(arch=arch.to_str(), arch_dict=arch.to_dict())
    deployed = build_model(arch, num_classes=ctx.data.num_classes)
    record["params"] = count_params(deployed)
    record["macs"] = count_macs(deployed, a.input_size)
    best = best_reward(trial, ctx)
    bound = latency_bound_ms(best, a.target_ms, ctx.alpha, ctx.beta) if best else None
    lat = ctx.cache.get_or_measure(
        f"{architecture_key(arch)}-{ctx.data.num_classes}", lambda: deployed,
        input_size=a.input_size, device=a.device, threads=a.threads,
        min_time_s=a.latency_time / 2, max_time_s=a.latency_time, stop_above_ms=bound,
        runtime=a.runtime, precision=a.precision,
        calibration=calibration_images(ctx.data) if a.precision != "fp32" else None)
    record.update(latency_ms=lat.median_ms, latency_p10_ms=lat.p10_ms, latency_p90_ms=lat.p90_ms,
                  latency_cv=lat.cv, latency_s=lat.seconds, latency_stopped_early=lat.stopped_early,
                  convert_s=lat.convert_s)
    _set_attrs(trial, record)
    if bound is not None and (lat.stopped_early or lat.median_ms > bound):
        raise optuna.TrialPruned(
            f"latency {'above ' if lat.stopped_early else ''}{lat.median_ms:.1f} ms > "
            f"{bound:.4g} ms: even at accuracy 1 its reward would be below the best so far "
            f"({best:.4f})")
    # Intermediate scores cost a validation pass each: only when a pruner will read them.
    use_trial = trial if (a.objective == "reward" and a.pruner != "none") else None
    result = proxy_train(arch, ctx.data, ctx.budget, device=a.train_device, seed=a.seed,
                         trial=use_trial, threads=stop_if_interrupted(threads or training_threads(
                             a, trial.study if trial is not None else None)))
    record.update(accuracy=result.accuracy, train_s=result.train_seconds,
                  train_threads=list(result.threads),
                  eval_s=result.eval_seconds, images_per_s=result.images_per_second,
                  trained_arch=result.trained_arch, val_curve=list(result.val_curve),
                  reward=reward(result.accuracy, lat.median_ms, a.target_ms, alpha=ctx.alpha,
                                beta=ctx.beta))
    _set_attrs(trial, record)
    return record


@functools.lru_cache(maxsize=1)  # the same images for every candidate of a run: draw them once
def calibration_images(data: DataSplits) -> torch.Tensor:
    """Proxy-training images (a seeded draw), normalised: what quantizes an int8 candidate."""
    return calibration_sample(data.train, CALIBRATION_IMAGES, mean=data.mean, std=data.std)


def best_reward(trial: Any, ctx: Context) -> float | None:
    """The best reward in the study so far; None where no bound applies (baselines, pareto)."""
    if trial is None or ctx.args.objective != "reward":
        return None
    try:
        return trial.study.best_value
    except ValueError:  # no completed trial yet
        return None


def latency_bound_ms(best: float, target_ms: float, alpha: float, beta: float) -> float | None:
    """The latency above which no accuracy (<= 1) can beat reward `best`, or None if none does.

    The reward at latency L is at most (L/T)^w. Above T that is (L/T)^beta, below `best` from
    L = T * best^(1/beta) on; a best above 1 (possible below T with alpha < 0) is out of reach
    from L = T * best^(1/alpha). In soft mode (beta = -0.07) a best of 0.5 bounds at ~20,000 T:
    a slow but accurate candidate can still win there, so it is trained.
    """
    if not (math.isfinite(best) and best > 0):
        return None
    if best > 1:
        return target_ms * best ** (1 / alpha) if alpha < 0 else None
    return target_ms * best ** (1 / beta) if beta < 0 else None


def _set_attrs(trial: Any, record: dict[str, Any]) -> None:
    if trial is None:
        return
    for key, value in record.items():
        if key not in trial.user_attrs:
            trial.set_user_attr(key, value)


def make_objective(ctx: Context):
    """The Optuna objective: a failing candidate fails its trial with the reason recorded."""

    def evaluate(trial: optuna.Trial):
        trial.set_user_attr("worker", worker_id())  # stamped at creation by StampedStorage
        try:
            arch = ctx.space.sample(trial)
            rec = evaluate_architecture(arch, ctx, trial)
        except optuna.TrialPruned as e:
            set_end(trial, TrialEnd.PRUNED,
                    str(e) if str(e).startswith("pruned") else f"pruned: {e}")
            raise
        except CandidateFailed as e:
            set_end(trial, TrialEnd.FAILED, str(e))
            raise
        except Exception as e:
            if INTERRUPTED.is_set():  # the interrupt, surfacing as another error
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            set_end(trial, TrialEnd.FAILED, reason)  # invalid combination, conversion, shape
            raise CandidateFailed(reason) from e
        if ctx.args.objective == "pareto":
            return rec["accuracy"], rec["latency_ms"]
        return rec["reward"]

    def objective(trial: optuna.Trial):
        try:
            return evaluate(trial)
        except (optuna.TrialPruned, CandidateFailed):
            raise
        except BaseException as e:
            if not was_interrupted(e):
                raise
        # Interrupted. Only here, out of the except clause, are the interrupted frames gone: one
        # that was reading the study (any write of a trial attribute reads first) held an open
        # SQLite statement, whose read lock made every write (this note, the heartbeat, the
        # tell, the other workers') wait out the 60 s busy timeout. A fresh KeyboardInterrupt,
        # too, for Optuna's tell must not keep those frames either.
        gc.collect()
        with contextlib.suppress(Exception):  # the interrupt matters more than its note
            set_end(trial, TrialEnd.INTERRUPTED, INTERRUPTED.reason())
        raise KeyboardInterrupt

    return objective


# --------------------------------------------------------------------------- study and storage


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


def storage_for(args: argparse.Namespace, run_dir: Path) -> optuna.storages.BaseStorage:
    """SQLite in runs/<name>/ by default (optuna-dashboard opens it); else any database URL
    SQLAlchemy takes, as Optuna does (which also refuses redis:// with its own message)."""
    url = args.storage or storage_url(run_dir)
    if url.startswith("redis"):
        return optuna.storages.get_storage(url)
    return StampedStorage(
        url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)


def storage_name(args: argparse.Namespace, run_dir: Path) -> str:
    return f"--storage {args.storage}" if args.storage else f"{run_dir / STUDY_DB}"


def open_storage(args: argparse.Namespace, run_dir: Path, attempts: int = 5
                 ) -> optuna.storages.BaseStorage:
    """The storage; a schema another process is creating at the same moment is waited for."""
    for attempt in range(attempts):
        try:
            return storage_for(args, run_dir)
        except Exception as e:  # SQLAlchemy/driver errors: a bad URL is the user's, not a bug
            if attempt + 1 < attempts and created_concurrently(e):
                time.sleep(0.2 * (attempt + 1))
                continue
            if isinstance(e, ImportError):
                raise UsageError(f"{storage_name(args, run_dir)}: {driver_hint(args.storage)}"
                                 ) from None
            raise UsageError(f"{storage_name(args, run_dir)}: cannot be opened "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    raise AssertionError("unreachable")


# the install extra with the driver SQLAlchemy picks for each database's plain URL scheme
DRIVER_EXTRAS = {"postgresql": ("postgres", "psycopg 3"), "mysql": ("mysql", "PyMySQL"),
                 "mariadb": ("mysql", "PyMySQL")}


def driver_hint(url: str | None) -> str:
    """What to install when the database's driver is missing (Optuna says only 'install
    appropriate one')."""
    scheme = (url or "").split(":", 1)[0]
    dialect, _, driver = scheme.partition("+")
    if dialect in DRIVER_EXTRAS and driver in ("", "psycopg", "pymysql"):
        extra, name = DRIVER_EXTRAS[dialect]
        use = "" if dialect == "postgresql" else f" and write the URL as {dialect}+pymysql://..."
        return (f"the {dialect} driver ({name}) is not installed; pip install -e \".[{extra}]\""
                f"{use}")
    return (f"the database driver for {scheme}:// is not installed (see SQLAlchemy's dialects "
            f"for the package it needs)")


def created_concurrently(e: Exception) -> bool:
    """Optuna creates its tables and version row unguarded: two workers starting on a new study
    collide ('table ... already exists', a duplicate alembic_version; optuna#1092), and the
    loser only has to open what the winner made."""
    return isinstance(e, sqlalchemy.exc.IntegrityError) or (
        isinstance(e, sqlalchemy.exc.DatabaseError) and "already exists" in str(e))


def storage_url(run_dir: Path) -> str:
    return study_url(run_dir)


def make_sampler(args: argparse.Namespace, seed: int) -> optuna.samplers.BaseSampler:
    if args.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=args.startup_trials)
    if args.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=args.population)
    return optuna.samplers.RandomSampler(seed=seed)


def sampler_seed(seed: int, existing_trials: int, worker: int = 0, created: bool = True) -> int:
    """--seed itself for a study this run created (reproducible); else one that differs per
    resume/worker.

    Optuna never reseeds a sampler, so a resumed run or a second worker seeded like the first
    would propose the first run's architectures again: so would a second command started at
    the same moment, finding the study just created and still empty (not `created`). The
    --workers of one fresh run get seeds derived from --seed and their index, so the run stays
    reproducible in what it tries.
    """
    if existing_trials == 0 and (created or worker > 0):
        return seed if worker == 0 else int(
            np.random.SeedSequence([seed, worker]).generate_state(1)[0])
    ss = np.random.SeedSequence([seed, existing_trials, os.getpid(), time.time_ns() % 2**32])
    return int(ss.generate_state(1)[0])


def open_study(args: argparse.Namespace, storage: optuna.storages.BaseStorage,
               settings: dict[str, Any], space: SearchSpace) -> optuna.Study:
    """Create or resume; refuse, before writing to it, a study made with other settings or
    whose trials asked the space's parameters from other choices."""
    directions = ["maximize", "minimize"] if args.objective == "pareto" else ["maximize"]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
              if args.pruner == "median" else optuna.pruners.NopPruner())
    try:
        study, created = optuna.create_study(
            study_name=args.name, storage=storage, sampler=make_sampler(args, args.seed),
            pruner=pruner, directions=directions), True
    except optuna.exceptions.DuplicatedStudyError:  # resumed, or made by another worker
        study, created = optuna.load_study(study_name=args.name, storage=storage,
                                           pruner=pruner), False
    study.sampler = make_sampler(args, sampler_seed(args.seed, len(study.trials),
                                                    getattr(args, "worker_index", 0), created))
    saved = study.user_attrs.get("settings")
    if saved is not None and isinstance(saved.get("budget"), dict):
        saved = {**saved, "budget": with_later_fields(saved["budget"])}
    if saved is not None:
        saved = {**SETTINGS_OF_OLDER_STUDIES, **saved}
    if saved is None:
        study.set_user_attr("settings", settings)
    else:
        diff = [k for k in SETTINGS_THAT_MUST_MATCH if saved.get(k) != settings.get(k)
                and (k in saved or k not in SETTINGS_ADDED_LATER)]
        if diff:
            raise UsageError(refusal(args.name, diff[0], saved.get(diff[0]),
                                     settings.get(diff[0])))
    check_stored_params(study, space, args.name)
    names = ["accuracy", "latency_ms"] if args.objective == "pareto" else ["reward"]
    if study.metric_names is None and len(study.directions) == len(names):
        with warnings.catch_warnings():  # optuna-dashboard and Optuna's plots label them so
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    fail_dead_local_trials(study)
    lower_dead_baselines_flags(study)
    return study


def with_later_fields(budget: dict[str, Any]) -> dict[str, Any]:
    """A stored budget with the fields added since, at the values it was trained with."""
    return {**budget, **{k: v for k, v in BUDGET_ADDED_LATER.items() if k not in budget}}


def check_stored_params(study: optuna.Study, space: SearchSpace, name: str) -> None:
    """Refuse a study whose trials asked a parameter with other choices than this space asks.

    Optuna keeps one value space per parameter name: every sampler but random raises on the
    first suggest ("CategoricalDistribution does not support dynamic value space"), so each new
    trial would fail. The settings check catches an edited space file; this catches a nas
    version that asks a factor another way.
    """
    now = space.param_choices()
    for t in study.get_trials(deepcopy=False):
        for key, dist in t.distributions.items():
            was = getattr(dist, "choices", None)
            if key in now and was is not None and tuple(was) != now[key]:
                raise UsageError(f"study {name!r}: trial {t.number} asked {key} from {list(was)}, "
                                 f"this nas version asks it from {list(now[key])}; pick a new "
                                 "--name, or resume with the version that made the study")


def refusal(name: str, key: str, was: Any, now: Any) -> str:
    """Why a resume is refused, naming the proxy flag that restores the study's budget."""
    if key == "budget" and isinstance(was, dict) and isinstance(now, dict):
        fields = [f for f in dict.fromkeys([*now, *was]) if was.get(f) != now.get(f)]
        differ = ", ".join(f"{f}={was.get(f)!r}, not {now.get(f)!r}" for f in fields)
        if all(f in BUDGET_FLAGS and f in was for f in fields):
            flags = " ".join(f"{BUDGET_FLAGS[f]} {was[f]}" for f in fields)
            return (f"study {name!r} was created with the proxy's {differ}; resume with "
                    f"{flags} or pick a new --name")
        return (f"study {name!r} was created with the proxy's {differ} (not every one has a "
                f"flag: a default of another nas version); pick a new --name")
    if key in SETTING_FLAGS:
        return (f"study {name!r} measured latency with {key} {was!r}, not {now!r}; resume with "
                f"{SETTING_FLAGS[key]} {was} or pick a new --name")
    detail = f"{key}={was!r}, not {now!r}" if len(repr(was)) < 80 else f"another {key}"
    return (f"study {name!r} was created with {detail}; resume with the same settings or pick "
            f"a new --name")


def release_connections(storage: optuna.storages.BaseStorage) -> None:
    """Close this process's database connections before it waits for the other workers.

    An interrupt that lands while a SQLite query is being read leaves that statement open, and
    with it a read lock: every other worker's commit then waits out the 60 s busy timeout, deaf
    to its own interrupt, while this process waits for it to stop. Later use reconnects.
    """
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()


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


BASELINES_ATTR = "training_baselines:"  # + worker_id(): a study attribute, True while it does


def local_baselines_flags(study: optuna.Study) -> Iterator[tuple[str, int]]:
    """The raised baselines flags of processes on this host, with their pid."""
    host = socket.gethostname()
    for key, on in study._storage.get_study_system_attrs(study._study_id).items():
        wh, _, pid = key.removeprefix(BASELINES_ATTR).rpartition(":")
        if on is True and key.startswith(BASELINES_ATTR) and wh == host and pid.isdigit():
            yield key, int(pid)


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


# --------------------------------------------------------------------------- progress


class Progress:
    """One line per finished trial: number, architecture, latency, accuracy, reward, time, ETA."""

    def __init__(self, total: int, already: int) -> None:
        self.total, self.already, self.start = total, already, time.time()

    def __call__(self, study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        done = _finished(study)
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


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.FAIL)


DIED = "died (killed?)"  # the end of a dead worker's trial's fail_reason


class TrialEnd(str, enum.Enum):
    """How a trial that was not scored ended, stored as its user attribute END_ATTR."""

    PRUNED = "pruned"  # could not beat the best reward (or the pruner stopped it)
    FAILED = "failed"  # the candidate failed on its own: NaN loss, out of memory, conversion
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM cut it short
    DIED = "died"  # its worker process was killed


END_ATTR = "end"
NOT_COUNTED = {TrialEnd.INTERRUPTED.value, TrialEnd.DIED.value}


def set_end(trial: optuna.Trial, end: TrialEnd, reason: str) -> None:
    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr(END_ATTR, end.value)


def counts_toward_trials(t: optuna.trial.FrozenTrial) -> bool:
    """Finished, and not cut short by an interrupt or a dead worker: a candidate never scored
    does not use up --trials (the same command evaluates another in its place). A failure
    without a fail_reason came from outside the objective, which gives every failure one: the
    storage heartbeat failing a dead worker's trial (Optuna writes no reason)."""
    if t.state != optuna.trial.TrialState.FAIL:
        return t.state in FINISHED
    if END_ATTR in t.user_attrs:
        return t.user_attrs[END_ATTR] not in NOT_COUNTED
    # trials of studies from before 2026-12-05 have only the reason
    reason = t.user_attrs.get("fail_reason", "")
    return bool(reason) and not (reason.startswith("interrupted") or reason.endswith(DIED))


def _finished(study: optuna.Study) -> int:
    return sum(map(counts_toward_trials, study.get_trials(deepcopy=False, states=FINISHED)))


class StopAtTrials:
    """Optuna's MaxTrialsCallback, counting only trials that count toward --trials."""

    def __init__(self, trials: int) -> None:
        self.trials = trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if _finished(study) >= self.trials:
            study.stop()


# --------------------------------------------------------------------------- baselines


def run_baselines(names: list[str], ctx: Context, run_dir: Path,
                  study: optuna.Study | None = None) -> pd.DataFrame:
    """Reference networks through the same latency and proxy; measured once per run folder.

    A baseline that failed (interrupted, out of memory) is measured again on the next resume.
    With the study, they train on a ThreadShare of it, and other processes count this one
    while it trains them.
    """
    if study is None:
        return _run_baselines(names, ctx, run_dir, None)
    _set_baselines_flag(study, True)
    try:
        # every core at most: the --workers children start once the baselines are done
        return _run_baselines(names, ctx, run_dir, training_threads(ctx.args, study, workers=1))
    finally:
        if not INTERRUPTED.is_set():  # else it is left to the dead pid, which nobody counts:
            _set_baselines_flag(study, False)  # a write now could wait on the interrupted read


def _set_baselines_flag(study: optuna.Study, on: bool) -> None:
    """Tell other processes this one trains baselines: a missed flag costs cores, not a run."""
    try:
        study._storage.set_study_system_attr(study._study_id, f"{BASELINES_ATTR}{worker_id()}",
                                             on)
    except Exception:
        if INTERRUPTED.is_set():
            raise


def _run_baselines(names: list[str], ctx: Context, run_dir: Path,
                   threads: Callable[[], int] | None) -> pd.DataFrame:
    done = load_baselines(run_dir)
    rows = [r for r in (done.to_dict("records") if len(done) else [])
            if r.get("state") == "COMPLETE"]
    have = {r["baseline"] for r in rows}
    for name in names:
        if name in have:
            continue
        print(f"baseline {name} ...", flush=True)
        rec: dict[str, Any] = {}  # what was measured stays, latency above all, if training fails
        try:
            evaluate_architecture(load_architecture(name), ctx, record=rec, threads=threads)
        except (CandidateFailed, optuna.TrialPruned) as e:
            rec["fail_reason"] = str(e)
        except Exception as e:  # a reference network that fails here fails as a baseline only
            reason = str(e).splitlines()[0] if str(e) else ""
            rec["fail_reason"] = f"{type(e).__name__}: {reason}"
        rec.update(baseline=name, state="COMPLETE" if "accuracy" in rec else "FAIL",
                   arch_dict=json.dumps(rec.get("arch_dict")), val_curve=None)
        rows.append(rec)
        print(f"baseline {name}: lat {rec.get('latency_ms', float('nan')):.2f} ms  acc "
              f"{rec.get('accuracy', float('nan')):.4f}  reward "
              f"{rec.get('reward', float('nan')):.4f}", flush=True)
        rows.sort(key=lambda r: names.index(r["baseline"]) if r["baseline"] in names
                  else len(names))
        save_baselines(pd.DataFrame(rows), run_dir)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="nas.search", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter)
    g = p.add_argument_group("objective")
    g.add_argument("--target-ms", type=float, required=True, help="latency target T in ms")
    g.add_argument("--mode", choices=sorted(MODES), default="soft",
                   help="soft: alpha = beta = -0.07; hard: alpha = 0, beta = -1 (MnasNet paper)")
    g.add_argument("--alpha", type=float, default=None,
                   help="override the exponent for LAT <= T (default: the --mode's)")
    g.add_argument("--beta", type=float, default=None,
                   help="override the exponent for LAT > T (default: the --mode's)")
    g.add_argument("--objective", choices=OBJECTIVES, default="reward",
                   help="reward: maximise the scalar MnasNet reward; pareto: maximise accuracy and "
                        "minimise latency jointly (use --sampler nsga2). Optuna refuses "
                        "intermediate reports in multi-objective studies, so --pruner applies to "
                        "the reward objective only")
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=int, default=20,
                   help="total finished trials the study should hold (a resumed study counts the "
                        "ones it already has; not those cut short by Ctrl-C, SIGTERM or a "
                        "killed worker)")
    g.add_argument("--timeout", type=float, default=None, help="stop starting trials after this "
                   "many seconds (default: no limit)")
    g.add_argument("--space", default=DEFAULT_SPACE,
                   help="search-space YAML file, or the name of one in search_spaces/")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: tpe for --objective reward, nsga2 for --objective pareto")
    g.add_argument("--startup-trials", type=int, default=10, help="TPE: random trials first")
    g.add_argument("--population", type=int, default=20, help="NSGA-II population size")
    g.add_argument("--pruner", choices=("none", "median"), default="none",
                   help="stop candidates whose intermediate validation accuracy is below the "
                        "median of earlier trials (reward objective only)")
    g.add_argument("--seed", type=int, default=0, help="sampler and training seed")
    g.add_argument("--baselines", default="",
                   help="comma-separated reference networks to run through the same latency "
                        "and proxy, e.g. mobilenet_v2,mnasnet_b1")
    g = p.add_argument_group("target device")
    g.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIME_NAMES,
                   help="what runs the network when latency is measured: the runtime you will "
                        "deploy with (docs/latency.md; eager is PyTorch itself, for "
                        "comparison)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="int8: each candidate statically quantized by the runtime's own "
                        "quantizer, calibrated on training images (onnxruntime, executorch)")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where latency is measured (the deployment target)")
    g.add_argument("--input-size", type=int, default=224, help="deployment input resolution")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for latency (default 1: one core, as MnasNet timed one "
                        "phone core)")
    g.add_argument("--latency-time", type=float, default=2.0,
                   help="seconds of measuring per architecture (warm-up included; each "
                        "architecture is measured once per study)")
    g = p.add_argument_group("proxy training")
    g.add_argument("--data", default=None,
                   help="CIFAR-10 source: 'cifar10' (torchvision download), an ImageFolder "
                        "directory, or a .tar/.tar.gz of one; default $NAS_DATA or 'cifar10'")
    g.add_argument("--train-device", default=None, help="device for proxy training "
                   "(default: --device)")
    g.add_argument("--train-threads", type=int, default=None,
                   help="CPU threads for proxy training (default: the usable CPUs divided "
                        "by --workers, and by the processes on this machine training this "
                        "study, asked every 2 s while training)")
    g.add_argument("--workers", type=int, default=1,
                   help="processes on this machine that evaluate candidates at once, sharing "
                        "the study and its cores (latency is then measured beside training; "
                        "docs/search.md)")
    d = ProxyBudget()
    g.add_argument("--proxy-images", type=int, default=d.train_images,
                   help="training images per epoch (seeded subset of the proxy-train split)")
    g.add_argument("--proxy-epochs", type=int, default=d.epochs, help="proxy epochs")
    g.add_argument("--proxy-batch", type=int, default=d.batch_size, help="proxy batch size")
    g.add_argument("--proxy-ghost-batches", type=int, default=d.ghost_batches,
                   help="parts each batch trains as, each with its own batch-norm statistics, "
                        "at once on their own CPU threads when this process's share has the "
                        "cores (weights do not depend on how many ran at once while the share "
                        "is below 2 x parts)")
    g.add_argument("--proxy-lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--proxy-final-map", type=int, default=d.final_map,
                   help="the trained network's earliest strides are reduced until its last "
                        "feature map is at least this wide (1: train the deployed strides)")
    g.add_argument("--val-size", type=int, default=5000,
                   help="images held out of the training set to score candidates")
    g = p.add_argument_group("results")
    g.add_argument("--name", default="search", help="run name: results go to runs/<name>/")
    g.add_argument("--runs-dir", default="runs", help="parent folder of run folders")
    g.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by several workers (default: SQLite in "
                        "runs/<name>/study.db)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """User errors found before anything is written."""
    for flag in ("target_ms", "latency_time", "proxy_lr", "timeout"):
        value = getattr(args, flag)  # NaN fails every comparison, so it must be asked for
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{flag.replace('_', '-')} {value:g}: must be a finite number "
                             f"> 0")
    for flag in ("trials", "proxy_images", "proxy_epochs", "proxy_batch", "proxy_ghost_batches",
                 "proxy_final_map", "val_size", "startup_trials"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.population < 2:
        raise UsageError(f"--population {args.population}: NSGA-II needs at least 2")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed {args.seed}: must be from 0 to {MAX_SEED} (numpy's seeds)")
    if args.input_size < 32:
        raise UsageError(f"--input-size {args.input_size}: must be >= 32")
    for flag in ("threads", "train_threads", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    if args.threads is not None and args.threads > available_cpus():
        raise UsageError(f"--threads {args.threads}: this process may use only "
                         f"{available_cpus()} CPU(s)")
    if args.proxy_batch > args.proxy_images:
        raise UsageError(f"--proxy-batch {args.proxy_batch}: must be <= --proxy-images "
                         f"{args.proxy_images} (else no training step is taken)")
    if not ProxyBudget.parts_fit(args.proxy_batch, args.proxy_ghost_batches):
        raise UsageError(f"--proxy-ghost-batches {args.proxy_ghost_batches}: must divide "
                         f"--proxy-batch {args.proxy_batch} into parts of at least 2 images "
                         "(batch norm needs 2)")
    if args.objective == "pareto" and args.pruner != "none":
        raise UsageError("--pruner applies to --objective reward only (Optuna does not prune "
                         "multi-objective studies)")
    for flag in ("device", "train_device"):
        value = getattr(args, flag) or ""
        if "cuda" in value and not torch.cuda.is_available():
            raise UsageError(f"--{flag.replace('_', '-')} {value}: no CUDA GPU is available "
                             f"on this machine; use cpu")
    if not is_plain_folder_name(args.name):
        raise UsageError(f"--name {args.name!r}: must be a plain folder name (no '/', not "
                         f"starting with '.', at most {MAX_NAME_BYTES} bytes)")
    blocked = file_in_the_way(Path(args.runs_dir))
    if blocked:
        raise UsageError(f"--runs-dir {args.runs_dir}: {blocked} is a file, so no run folder "
                         f"can be made under it")
    for name in filter(None, args.baselines.split(",")):
        try:
            load_architecture(name.strip())
        except ArchError as e:
            raise UsageError(f"--baselines: {e}") from None


def environment() -> dict[str, Any]:
    """Recorded beside the results so a run can be reproduced and its numbers trusted."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "optuna": optuna.__version__, "platform": platform.platform(),
            "host": socket.gethostname(), "cpus": os.cpu_count(), "git": rev,
            "argv": sys.argv}


def prepare(args: argparse.Namespace) -> tuple[Context, Path, dict[str, Any]]:
    """Everything that can fail on user input, before the run folder is touched."""
    check_args(args)
    args.sampler = args.sampler or ("nsga2" if args.objective == "pareto" else "tpe")
    args.train_device = args.train_device or args.device
    try:
        alpha, beta = exponents(args.mode, args.alpha, args.beta)
    except ValueError as e:
        raise UsageError(f"--alpha/--beta: {e}") from None
    lat_ctx = latency_context(args.input_size, device=args.device, threads=args.threads,
                              runtime=args.runtime, precision=args.precision)
    try:
        torch.device(args.train_device)
    except RuntimeError:
        raise UsageError(f"--train-device {args.train_device!r}: expected cpu or cuda") from None
    if torch.device(args.train_device).type not in ("cpu", "cuda"):
        raise UsageError(f"--train-device {args.train_device!r}: expected cpu or cuda")
    space = load_space(args.space)
    budget = ProxyBudget(train_images=args.proxy_images, epochs=args.proxy_epochs,
                         batch_size=args.proxy_batch, ghost_batches=args.proxy_ghost_batches,
                         lr=args.proxy_lr, val_images=args.val_size,
                         final_map=args.proxy_final_map)
    data = load_data(args.data, val_size=0)
    if args.val_size >= len(data.train):
        raise UsageError(f"--val-size {args.val_size}: must be from 1 to {len(data.train) - 1} "
                         f"(the data has {len(data.train)} training images)")
    fit, val = split_train_val(data.train, val_size=args.val_size, seed=SPLIT_SEED)
    data = dataclasses.replace(data, train=fit, val=val)
    if args.proxy_batch > len(data.train):
        raise UsageError(f"--proxy-batch {args.proxy_batch}: must be <= the {len(data.train)} "
                         f"training images left after --val-size {args.val_size}")
    run_dir = Path(args.runs_dir) / args.name
    if args.storage:
        open_storage(args, run_dir)  # a bad URL fails before the run folder is made
    settings = {"target_ms": args.target_ms, "alpha": alpha, "beta": beta,
                "objective": args.objective, "space": space.to_dict(), "device": args.device,
                "input_size": args.input_size,
                "threads": DEFAULT_THREADS if args.threads is None else args.threads,
                "val_size": args.val_size, "data_fingerprint": data.fingerprint,
                "budget": dataclasses.asdict(budget), "data": data.source, "seed": args.seed,
                "sampler": args.sampler, "pruner": args.pruner,
                "latency_device": lat_ctx.device_name, "runtime": args.runtime,
                "precision": args.precision}
    ctx = Context(args, space, data, budget, LatencyCache(run_dir / LATENCY_CACHE),
                  alpha, beta)
    return ctx, run_dir, settings


def train_threads(args: argparse.Namespace, workers: int | None = None) -> int:
    """--train-threads, else an equal share of the usable CPUs per --workers process."""
    workers = workers or max(args.workers, getattr(args, "local_workers", 1))  # a child: N
    return args.train_threads or max(1, available_cpus() // workers)


SHARED_NOTE = " (an equal share while other processes on this machine train this study)"


class ThreadShare:
    """A proxy training's CPU threads, asked before each step: at most train_threads, and an
    equal share among the processes on this machine training this study (local_trainers), so
    the same command started twice trains on half the cores each (with every core each, two
    trainings ran 12x slower together than one alone, benchmarks/results/oversubscription_
    cascadelake.txt, and two commands took 8.4x as long: two_commands_cascadelake.txt).

    The study is read at most every `every_s` seconds; a failed read (a busy database) keeps
    the last share instead of failing a candidate that trains well."""

    def __init__(self, most: int, study: optuna.Study, every_s: float = 2.0) -> None:
        self.most, self.study, self.every_s = most, study, every_s
        self.share, self.asked = most, -math.inf

    def __call__(self) -> int:
        if time.monotonic() - self.asked >= self.every_s:
            self.asked = time.monotonic()
            try:
                trainers = local_trainers(self.study)
            except Exception:
                if INTERRUPTED.is_set():  # the interrupt, surfacing as a database error
                    raise
            else:
                self.share = max(1, min(self.most, available_cpus() // trainers))
        return self.share


def stop_if_interrupted(threads: Callable[[], int]) -> Callable[[], int]:
    """`threads`, asked before each training step, raising the interrupt once one came: a
    Ctrl-C that landed in a finalizer (quiet_interrupts) still stops the candidate in a step."""
    def ask() -> int:
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt
        return threads()

    return ask


def training_threads(args: argparse.Namespace, study: optuna.Study | None,
                     workers: int | None = None) -> Callable[[], int]:
    """--train-threads as given; else a ThreadShare of the study (the fixed share without)."""
    most = train_threads(args, workers)
    if args.train_threads or study is None:
        return lambda: most
    return ThreadShare(most, study)


class Workers:
    """The other --workers: spawned processes running this search (no baselines, no results).

    SIGINT and SIGTERM are held back (blocked, not ignored: a signal arriving then is not lost)
    while they are spawned, and the children start with them held back too, so an interrupt
    cannot land mid-import as a traceback; each child lets them through once its handlers are
    in place, and also exits if `stop` was set before that. The first process waits until all
    are ready, so they share the trials from the start.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        spawn = multiprocessing.get_context("spawn")  # no forked thread pools or SQLite handles
        self.stop, self.procs, ready = spawn.Event(), [], []
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for i in range(1, args.workers):
                child = argparse.Namespace(**{**vars(args), "workers": 1, "baselines": "",
                                              "worker_index": i,
                                              "local_workers": args.workers})
                ready.append(spawn.Event())
                self.procs.append(spawn.Process(target=worker_main, name=f"nas-worker-{i}",
                                                args=(child, self.stop, ready[-1])))
                self.procs[-1].start()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            self.interrupt()
            raise
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one held back arrives here
            while any(p.is_alive() and not r.is_set()
                      for p, r in zip(self.procs, ready, strict=True)):
                time.sleep(0.05)
        except KeyboardInterrupt:
            self.interrupt()
            raise

    def join(self) -> None:
        for proc in self.procs:
            proc.join()

    def interrupt(self, grace_s: float = 2.0, kill_after_s: float = 20.0) -> None:
        """Pass an interrupt on to workers that did not get it themselves (a `kill -INT` or
        `kill -TERM` of this process), all at once; kill one still running after that (its
        trial is then failed as a dead worker's). Workers hold SIGTERM as an interrupt, so the
        last resort is SIGKILL. At most grace_s + kill_after_s seconds, whatever N."""
        self.stop.set()
        started = [p for p in self.procs if p.pid is not None]
        deadline = time.monotonic() + grace_s
        for proc in started:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in started:
            if proc.is_alive():
                os.kill(proc.pid, INTERRUPTED.signum)
        deadline = time.monotonic() + kill_after_s
        for proc in started:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in started:
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)

    def failed(self) -> int:
        return sum(p.exitcode not in (0, *INTERRUPT_STATUSES) for p in self.procs)


def worker_main(args: argparse.Namespace, stop, ready) -> None:
    """Entry point of a spawned worker: the search loop only; the first worker writes results."""
    try:
        catch_stop_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back since the spawn
        if stop.is_set():
            raise KeyboardInterrupt
        status = guarded_run(args, write=False, ready=ready, stop=stop)
    except BaseException as e:  # Ctrl-C reaches the whole process group; the first one reports
        if not was_interrupted(e):
            raise
        status = INTERRUPTED.status()
    exit_now_if_interrupted(status)
    sys.exit(status)


# Ctrl-C, and the polite stop of `kill`, `timeout`, batch schedulers (SLURM at a job's time
# limit) and container runtimes: both end the trial in flight and write the results
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPT_STATUSES = tuple(128 + s for s in STOP_SIGNALS)  # the shell's 130 and 143


class _Flag:
    """Set once this process got SIGINT or SIGTERM: Optuna can turn the KeyboardInterrupt into
    another error (an UnboundLocalError from its tell, in optuna 5.0), which still means
    'interrupted'.

    Not a threading.Event: the signal handler sets it, and Event.set() takes a lock that the
    interrupted main thread may be holding at that moment; a plain attribute cannot deadlock."""

    def __init__(self) -> None:
        self.value = False
        self.signum = signal.SIGINT

    def set(self, signum: int = signal.SIGINT) -> None:
        self.signum = signum
        self.value = True

    def is_set(self) -> bool:
        return self.value

    def reason(self) -> str:
        """The fail_reason of a trial this interrupt stopped."""
        return "interrupted (SIGTERM)" if self.signum == signal.SIGTERM else "interrupted (Ctrl-C)"

    def status(self) -> int:
        """The exit status a shell gives a process this signal stopped: 130, or 143."""
        return 128 + self.signum


INTERRUPTED = _Flag()


def catch_stop_signals() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, on_sigint)
    if not getattr(sys.unraisablehook, "quiet_interrupts", False):
        sys.unraisablehook = quiet_interrupts(sys.unraisablehook)


def quiet_interrupts(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`hook`, minus the interrupt that on_sigint raised inside a finalizer (a weakref callback
    of SQLAlchemy's, say): Python can only print it there, as 'Exception ignored' with a
    traceback; the flag it set still stops the search."""
    def unraisable(u: Any) -> None:
        if not (isinstance(u.exc_value, KeyboardInterrupt) and INTERRUPTED.is_set()):
            hook(u)

    unraisable.quiet_interrupts = True  # type: ignore[attr-defined]
    return unraisable


def on_sigint(signum: int, frame: Any) -> None:
    """SIGINT's and SIGTERM's handler."""
    INTERRUPTED.set(signum)
    # SQLAlchemy logs, with a traceback, the cursor it could not close when interrupted mid-read
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)
    raise KeyboardInterrupt


def was_interrupted(e: BaseException) -> bool:
    return isinstance(e, KeyboardInterrupt) or (INTERRUPTED.is_set() and isinstance(e, Exception))


def run(args: argparse.Namespace, write: bool = True, ready=None, stop=None) -> int:
    ctx, run_dir, settings = prepare(args)
    load_baselines(run_dir)  # a damaged baselines.csv is refused before anything is written
    torch.set_num_threads(train_threads(args))
    try:
        created = make_folders(run_dir)
    except OSError as e:
        raise UsageError(f"--runs-dir {args.runs_dir}: cannot make the run folder {run_dir} "
                         f"({e.strerror or e})") from None
    try:
        storage = open_storage(args, run_dir)
        study = open_study(args, storage, settings, ctx.space)
    except BaseException as e:  # refused (another study's settings, a bad --storage): no trace
        remove_if_empty(created)
        if isinstance(e, optuna.exceptions.StorageInternalError):  # e.g. a read-only study.db
            cause = e.__cause__ or e
            raise UsageError(f"{storage_name(args, run_dir)}: cannot be written "
                             f"({str(cause).splitlines()[0]})") from None
        raise
    baselines = [n.strip() for n in args.baselines.split(",") if n.strip()]
    already = _finished(study)
    if write:
        write_run_meta(run_dir, {
            "study_name": args.name, "storage": args.storage,
            "num_classes": ctx.data.num_classes, "classes": list(ctx.data.classes),
            "settings": settings, "environment": environment()})
        print(f"study {args.name!r} in {run_dir}: {already} finished trials, target "
              f"{args.trials}; space {args.space} ({ctx.space.size():,} architectures); "
              f"T = {args.target_ms:g} ms, alpha = {ctx.alpha:g}, beta = {ctx.beta:g}; "
              f"data {ctx.data.source}: {len(ctx.data.train)} train / {len(ctx.data.val)} "
              f"val; {args.workers} worker(s) x {train_threads(args)} training thread(s)"
              f"{'' if args.train_threads else SHARED_NOTE}", flush=True)
    interrupted, workers = False, None
    try:
        if baselines:
            run_baselines(baselines, ctx, run_dir, study)
        if ready is not None:
            ready.set()
        if already < args.trials:
            workers = Workers(args)
            study.optimize(
                make_objective(ctx), timeout=args.timeout, catch=(CandidateFailed,),
                callbacks=[StopAtTrials(args.trials),
                           Progress(args.trials, already),
                           # an interrupt that Python swallowed (raised in a GC callback) or
                           # a worker's lost one still stops the search after this trial
                           lambda study, _: study.stop() if INTERRUPTED.is_set()
                           or (stop and stop.is_set()) else None])
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt
        if workers:  # their trials in flight finish before the results are written
            workers.join()
    except BaseException as e:
        if not was_interrupted(e):
            raise
        interrupted = True
    if interrupted:
        # out of the except clause, the interrupted frames are gone, and with them a database
        # session that an interrupt inside Optuna's commit left holding SQLite's write lock
        gc.collect()
        release_connections(storage)
        if workers:
            workers.interrupt()
        # an interrupt inside Optuna's ask/tell (not the objective) leaves a trial RUNNING
        fail_dead_local_trials(study, ours=True)
        if write:  # the first process; the other workers write nothing
            print("interrupted: writing results of the finished trials", file=sys.stderr)
    if not write:
        return INTERRUPTED.status() if interrupted else 0
    if workers and workers.failed():
        print(f"nas.search: {workers.failed()} worker(s) failed; their unfinished trials are "
              f"marked failed on the next run", file=sys.stderr)
    files = write_results(study, run_dir, target_ms=args.target_ms)
    print_summary(study, files)
    return INTERRUPTED.status() if interrupted else 0


def print_summary(study: optuna.Study, files: dict[str, Path]) -> None:
    df = pd.read_csv(files["trials"]) if "trials" in files else pd.DataFrame()
    done = df[df.state == "COMPLETE"] if len(df) else df
    if len(done):
        key = "reward" if "reward" in done and done.reward.notna().any() else "accuracy"
        cols = [c for c in ("number", "arch", "latency_ms", "accuracy", "reward", "params",
                            "macs") if c in done]
        top = done.sort_values(key, ascending=False)[cols].head(10)
        print("\nBest trials:\n" + top.to_string(index=False))
    print("\nResults: " + ", ".join(str(p) for p in files.values()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return guarded_run(parser.parse_args(argv))


def guarded_run(args: argparse.Namespace, write: bool = True, ready=None, stop=None) -> int:
    """run() with user errors as one line and exit status 2, and an interrupt outside the
    search loop (loading data, opening the study, writing results) as one line too."""
    # Our progress line reports each trial, failures with their reason; Optuna's own per-trial
    # warnings would repeat them with tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return run(args, write, ready, stop)
    except BaseException as e:
        if was_interrupted(e):  # whatever error it surfaced as
            pass
        elif isinstance(e, (UsageError, ArchError, SpaceError, DataError, LatencyError,
                            BaselinesError)):
            print(f"nas.search: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        elif isinstance(e, OSError):  # a read-only run folder, a full disk (not a trial's)
            print(f"nas.search: error: {oserror_line(e)}", file=sys.stderr)
            return 2
        elif (lost := database_failure(e)) is not None:  # e.g. the server restarted
            where = f"--storage {args.storage}" if args.storage else "the study's database"
            print(f"nas.search: error: {where}: {lost}; every finished trial is kept in the "
                  f"study, and the same command resumes it", file=sys.stderr)
            return 2
        else:
            raise
    if write:  # a worker's interrupt is reported by the first process
        print("nas.search: interrupted; the study keeps every finished trial, and the same "
              "command resumes it", file=sys.stderr)
    return INTERRUPTED.status()


def database_failure(e: BaseException) -> str | None:
    """The database's own words, in a line, when the study's storage failed under the search
    (a PostgreSQL server restarted or went away: tests/test_postgres.py); else None."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if not any(isinstance(x, (optuna.exceptions.StorageInternalError,
                              sqlalchemy.exc.OperationalError)) for x in chain):
        return None
    db = next((x for x in reversed(chain) if isinstance(x, sqlalchemy.exc.DBAPIError)), None)
    words = str(db.orig if db is not None and db.orig is not None else chain[-1]).strip()
    return f"the database failed ({words.splitlines()[0] if words else type(chain[-1]).__name__})"


def exit_now_if_interrupted(code: int) -> None:
    """After an interrupt, leave at once: the results are written, and an interrupt inside
    Optuna's trial can leave its (non-daemon) heartbeat thread running, on which a normal
    interpreter exit would wait forever."""
    if code in INTERRUPT_STATUSES:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    catch_stop_signals()  # remembers the interrupt whatever Optuna makes of it
    status = main()
    exit_now_if_interrupted(status)
    sys.exit(status)
