"""The study a search writes to: its storage (SQLite in the run folder, or any database URL),
its sampler and seed, and the settings it was created with, which a resume must match."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc

from nas.interleaved import warm_runs_of
from nas.run_folder import STUDY_DB, study_url
from nas.samplers import RegularizedEvolutionSampler
from nas.search.config import SearchConfig, UsageError
from nas.search.liveness import (
    GRACE_S,
    HEARTBEAT_S,
    StampedStorage,
    fail_dead_local_trials,
    lower_dead_baselines_flags,
)
from nas.space import SearchSpace

SETTINGS_THAT_MUST_MATCH = ("target_ms", "alpha", "beta", "objective", "space", "device",
                            "input_size", "threads", "budget", "val_size", "data_fingerprint",
                            "latency_device", "runtime", "precision", "latency_protocol")
# the flag that sets each ProxyBudget field, for the refusal to resume with another budget
BUDGET_FLAGS = {"train_images": "--proxy-images", "epochs": "--proxy-epochs",
                "batch_size": "--proxy-batch", "ghost_batches": "--proxy-ghost-batches",
                "optimizer": "--proxy-optimizer", "lr": "--proxy-lr",
                "weight_decay": "--proxy-weight-decay", "final_map": "--proxy-final-map",
                "val_images": "--val-size", "clip_grad": "--proxy-clip-grad"}
# budget fields newer than some studies, with the value those studies were trained with
BUDGET_ADDED_LATER = {"ghost_batches": 1, "optimizer": "adamw", "clip_grad": None}
# latencies from another CPU or GPU model would mix two hardware targets in one reward;
# studies saved before a setting existed are not refused for lacking it
SETTINGS_ADDED_LATER = ("latency_device",)
# settings newer than some studies, with the value every such study was measured with: a study
# from before 2026-12-05 timed eager PyTorch in float32, and resumes only with those flags
# (CHANGELOG.md)
SETTINGS_OF_OLDER_STUDIES = {"runtime": "eager", "precision": "fp32", "latency_protocol": "single"}
SETTING_FLAGS = {"runtime": "--runtime", "precision": "--precision",
                 "latency_protocol": "--latency-protocol"}
# the install extra with the driver SQLAlchemy picks for each database's plain URL scheme
DRIVER_EXTRAS = {"postgresql": ("postgres", "psycopg 3"), "mysql": ("mysql", "PyMySQL"),
                 "mariadb": ("mysql", "PyMySQL")}


# --------------------------------------------------------------------------- storage


def storage_for(config: SearchConfig, run_dir: Path) -> optuna.storages.BaseStorage:
    """SQLite in runs/<name>/ by default (optuna-dashboard opens it); else any database URL
    SQLAlchemy takes, as Optuna does (which also refuses redis:// with its own message)."""
    url = config.storage or study_url(run_dir)
    if url.startswith("redis"):
        return optuna.storages.get_storage(url)
    return StampedStorage(
        url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)


def storage_name(config: SearchConfig, run_dir: Path) -> str:
    return f"--storage {config.storage}" if config.storage else f"{run_dir / STUDY_DB}"


def open_storage(config: SearchConfig, run_dir: Path, attempts: int = 5
                 ) -> optuna.storages.BaseStorage:
    """The storage; a schema another process is creating at the same moment is waited for."""
    for attempt in range(attempts):
        try:
            return storage_for(config, run_dir)
        except Exception as e:  # SQLAlchemy/driver errors: a bad URL is the user's, not a bug
            if attempt + 1 < attempts and created_concurrently(e):
                time.sleep(0.2 * (attempt + 1))
                continue
            if isinstance(e, ImportError):
                raise UsageError(f"{storage_name(config, run_dir)}: "
                                 f"{driver_hint(config.storage)}") from None
            raise UsageError(f"{storage_name(config, run_dir)}: cannot be opened "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    raise AssertionError("unreachable")


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


def release_connections(storage: optuna.storages.BaseStorage) -> None:
    """Close this process's database connections before it waits for the other workers.

    An interrupt that lands while a SQLite query is being read leaves that statement open, and
    with it a read lock: every other worker's commit then waits out the 60 s busy timeout, deaf
    to its own interrupt, while this process waits for it to stop. Later use reconnects.
    """
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()


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


def quiet_storage_threads(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """threading.excepthook, but a background thread that the database failed under (Optuna's
    heartbeat thread, while a PostgreSQL server restarts) gets one line, not a traceback: the
    main thread reports the failure itself, or carries on once the pool reconnects."""
    def excepthook(args: Any) -> None:
        lost = database_failure(args.exc_value) if args.exc_value is not None else None
        if lost is None:
            hook(args)
            return
        print(f"nas.search: warning: a background thread stopped: {lost}", file=sys.stderr,
              flush=True)

    excepthook.quiet_storage_threads = True  # type: ignore[attr-defined]
    return excepthook


# --------------------------------------------------------------------------- the study


TOURNAMENT = 5  # evolution's tournament size (Real et al. 2019 used 25 of 100; 5 of about 20)


def make_sampler(config: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=config.startup_trials)
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=config.population)
    if config.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=config.startup_trials,
                                         warn_independent_sampling=False)
    if config.sampler == "evolution":
        return RegularizedEvolutionSampler(population_size=config.population, seed=seed,
                                           tournament_size=min(TOURNAMENT, config.population))
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


def open_study(config: SearchConfig, storage: optuna.storages.BaseStorage,
               settings: dict[str, Any], space: SearchSpace,
               former_fingerprints: tuple[str, ...] = ()) -> optuna.Study:
    """Create or resume; refuse, before writing to it, a study made with other settings or
    whose trials asked the space's parameters from other choices."""
    directions = ["maximize", "minimize"] if config.objective == "pareto" else ["maximize"]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
              if config.pruner == "median" else optuna.pruners.NopPruner())
    try:
        study, created = optuna.create_study(
            study_name=config.name, storage=storage, sampler=make_sampler(config, config.seed),
            pruner=pruner, directions=directions), True
    except optuna.exceptions.DuplicatedStudyError:  # resumed, or made by another worker
        study, created = optuna.load_study(study_name=config.name, storage=storage,
                                           pruner=pruner), False
    study.sampler = make_sampler(config, sampler_seed(config.seed, len(study.trials),
                                                      config.worker_index, created))
    saved = study.user_attrs.get("settings")
    if saved is not None and isinstance(saved.get("budget"), dict):
        saved = {**saved, "budget": with_later_fields(saved["budget"])}
    if saved is not None:
        saved = {**SETTINGS_OF_OLDER_STUDIES, **saved}
    upgrade = saved is not None and saved.get("data_fingerprint") in former_fingerprints
    if upgrade:  # the same archive, recorded by its path and mtime before it was its content
        saved = {**saved, "data_fingerprint": settings["data_fingerprint"]}
    if saved is None:
        study.set_user_attr("settings", settings)
    else:
        diff = [k for k in SETTINGS_THAT_MUST_MATCH if saved.get(k) != settings.get(k)
                and (k in saved or k not in SETTINGS_ADDED_LATER)]
        if diff:
            raise UsageError(refusal(config.name, diff[0], saved.get(diff[0]),
                                     settings.get(diff[0])))
    check_stored_params(study, space, config.name)
    if upgrade:  # written only once nothing refuses the resume
        study.set_user_attr("settings", {**study.user_attrs["settings"],
                                         "data_fingerprint": settings["data_fingerprint"]})
    names = ["accuracy", "latency_ms"] if config.objective == "pareto" else ["reward"]
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


def protocol_kind(protocol: Any) -> str:
    """The --latency-protocol value of a recorded protocol name: interleaved[-warm<k>]:<ref> is
    interleaved, interleaved-ladder[-warm<k>]:... ladder, single single."""
    kind = str(protocol).split(":")[0]
    return ("ladder" if kind.startswith("interleaved-ladder")
            else "interleaved" if kind.startswith("interleaved") else kind)


def refusal(name: str, key: str, was: Any, now: Any) -> str:
    """Why a resume is refused, naming the proxy flag that restores the study's budget."""
    if key == "budget" and isinstance(was, dict) and isinstance(now, dict):
        fields = [f for f in dict.fromkeys([*now, *was]) if was.get(f) != now.get(f)]
        differ = ", ".join(f"{f}={was.get(f)!r}, not {now.get(f)!r}" for f in fields)
        if all(f in BUDGET_FLAGS and f in was for f in fields):
            flags = " ".join(f"{BUDGET_FLAGS[f]} {0 if was[f] is None else was[f]}"
                             for f in fields)  # only clip_grad can be None: its flag's 0
            return (f"study {name!r} was created with the proxy's {differ}; resume with "
                    f"{flags} or pick a new --name")
        return (f"study {name!r} was created with the proxy's {differ} (not every one has a "
                f"flag: a default of another nas version); pick a new --name")
    if key == "latency_protocol" and protocol_kind(was) == protocol_kind(now):  # warm runs
        return (f"study {name!r} measured latency with latency_protocol {was!r}, not {now!r}; "
                f"resume with --latency-warm-runs {warm_runs_of(str(was))} or pick a new "
                f"--name")
    if key in SETTING_FLAGS:
        flag_value = protocol_kind(was) if key == "latency_protocol" else was
        return (f"study {name!r} measured latency with {key} {was!r}, not {now!r}; resume with "
                f"{SETTING_FLAGS[key]} {flag_value} or pick a new --name")
    detail = f"{key}={was!r}, not {now!r}" if len(repr(was)) < 80 else f"another {key}"
    return (f"study {name!r} was created with {detail}; resume with the same settings or pick "
            f"a new --name")
