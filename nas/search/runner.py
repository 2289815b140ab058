"""One search, start to end: check the input, open the study, measure the baselines, start the
--workers, optimize, and write the results (also after Ctrl-C or SIGTERM)."""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch

from nas.arch import ArchError
from nas.cli import oserror_line
from nas.data import SPLIT_SEED, DataError, load_data, split_train_val
from nas.files import make_folders, remove_if_empty
from nas.host import failed_allocation, is_out_of_memory
from nas.interleaved import (
    REFERENCE,
    REFERENCE_ATTR,
    calibrated_ladder_ms,
    calibrated_reference_ms,
    protocol_name,
)
from nas.interrupts import INTERRUPTED, was_interrupted
from nas.latency import DEFAULT_THREADS, LatencyCache, LatencyError, latency_context
from nas.latency_client import connect
from nas.pareto import baselines_summary, target_drift_note
from nas.proxy import CandidateFailed
from nas.results import BaselinesError, load_baselines, write_results
from nas.run_folder import LATENCY_CACHE, STUDY_DB, write_run_meta
from nas.search.baselines import enqueue_baselines, run_baselines
from nas.search.callbacks import Progress, StopAtTrials, StopOnInterrupt
from nas.search.config import SearchConfig, UsageError, config_from_argv, resolve
from nas.search.core_gate import CoreGate
from nas.search.cpu_share import SHARED_NOTE, train_threads
from nas.search.front import remeasure_front
from nas.search.liveness import fail_dead_local_trials
from nas.search.objective import Context, make_objective
from nas.search.study import (
    database_failure,
    open_storage,
    open_study,
    quiet_storage_threads,
    release_connections,
    storage_name,
)
from nas.search.trial_end import finished_count
from nas.search.workers import Workers
from nas.space import SpaceError, load_space

USER_ERRORS = (UsageError, ArchError, SpaceError, DataError, LatencyError, BaselinesError)


def prepare(config: SearchConfig) -> tuple[Context, Path, dict[str, Any]]:
    """Everything that can fail on user input, before the run folder is touched: the space,
    the data and its split, the latency target; returns the trials' context, the run folder
    and the settings a resume must match."""
    alpha, beta = config.exponents
    remote = connect(config.latency_server, config.latency_token_file)
    if remote is not None:
        try:
            lat_ctx = remote.context(input_size=config.input_size, device=config.device,
                                     threads=config.threads, runtime=config.runtime,
                                     precision=config.precision,
                                     protocol=config.latency_protocol,
                                     warm_runs=config.latency_warm_runs)
        except LatencyError as e:
            raise UsageError(f"--latency-server {config.latency_server}: "
                             f"{str(e).removeprefix(f'latency server {remote.url}: ')}") from None
    else:
        lat_ctx = latency_context(config.input_size, device=config.device,
                                  threads=config.threads, runtime=config.runtime,
                                  precision=config.precision)
        if config.latency_protocol in ("interleaved", "ladder"):
            lat_ctx = dataclasses.replace(
                lat_ctx, protocol=protocol_name(ladder=config.latency_protocol == "ladder",
                                                warm_runs=config.latency_warm_runs))
    space = load_space(config.space)
    budget = config.budget()
    data = load_data(config.data, val_size=0)
    if config.val_size >= len(data.train):
        raise UsageError(f"--val-size {config.val_size}: must be from 1 to "
                         f"{len(data.train) - 1} (the data has {len(data.train)} training images)")
    fit, val = split_train_val(data.train, val_size=config.val_size, seed=SPLIT_SEED)
    data = dataclasses.replace(data, train=fit, val=val)
    if config.proxy_batch > len(data.train):
        raise UsageError(f"--proxy-batch {config.proxy_batch}: must be <= the {len(data.train)} "
                         f"training images left after --val-size {config.val_size}")
    run_dir = config.run_dir
    if config.storage:
        open_storage(config, run_dir)  # a bad URL fails before the run folder is made
    settings = {"target_ms": config.target_ms, "alpha": alpha, "beta": beta,
                "objective": config.objective, "space": space.to_dict(), "device": config.device,
                "input_size": config.input_size,
                "threads": DEFAULT_THREADS if config.threads is None else config.threads,
                "val_size": config.val_size, "data_fingerprint": data.fingerprint,
                "budget": dataclasses.asdict(budget), "data": data.source, "seed": config.seed,
                "sampler": config.sampler, "pruner": config.pruner,
                "latency_device": lat_ctx.device_name, "runtime": config.runtime,
                "precision": config.precision, "latency_protocol": lat_ctx.protocol}
    ctx = Context(config, space, data, budget, LatencyCache(run_dir / LATENCY_CACHE),
                  remote=remote,
                  latency_context=lat_ctx if remote or lat_ctx.protocol != "single" else None)
    return ctx, run_dir, settings


def reference_latency(study: optuna.Study, ctx: Context) -> float | dict[str, float] | None:
    """Interleaved: the reference's latency the study measures against, calibrated once and
    kept in the study, so every process and resume multiplies the same number (a latency
    server calibrates its own on the first measurement: then it is kept from there). Ladder:
    {rung: ms}, every rung calibrated and kept the same way."""
    if ctx.config.latency_protocol not in ("interleaved", "ladder"):
        return None
    saved = study.user_attrs.get(REFERENCE_ATTR)
    if saved is not None or ctx.remote is not None:
        return saved
    single = dataclasses.replace(ctx.latency_context, protocol="single")
    ms = (calibrated_ladder_ms(single, num_classes=ctx.data.num_classes)
          if ctx.config.latency_protocol == "ladder"
          else calibrated_reference_ms(single, num_classes=ctx.data.num_classes))
    study.set_user_attr(REFERENCE_ATTR, ms)
    return ms


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


def run(config: SearchConfig, write: bool = True, ready=None, stop=None) -> int:
    """The search, as `python -m nas.search` runs it; returns its exit status (0, or 130/143
    after an interrupt). Bad input raises UsageError (or the error of the file at fault).

    `write`: this is the first process, which writes run.json and the results (a --workers
    child does not). `ready` is set once the trials start; `stop` stops them."""
    config = resolve(config)
    ctx, run_dir, settings = prepare(config)
    load_baselines(run_dir)  # a damaged baselines.csv is refused before anything is written
    torch.set_num_threads(train_threads(config))
    try:
        created = make_folders(run_dir)
    except OSError as e:
        raise UsageError(f"--runs-dir {config.runs_dir}: cannot make the run folder {run_dir} "
                         f"({e.strerror or e})") from None
    ctx.gate = CoreGate(run_dir)
    try:
        storage = open_storage(config, run_dir)
        study = open_study(config, storage, settings, ctx.space, ctx.data.former_fingerprints)
    except BaseException as e:  # refused (another study's settings, a bad --storage): no trace
        remove_if_empty(created)
        if isinstance(e, optuna.exceptions.StorageInternalError):  # e.g. a read-only study.db
            cause = e.__cause__ or e
            raise UsageError(f"{storage_name(config, run_dir)}: cannot be written "
                             f"({str(cause).splitlines()[0]})") from None
        raise
    already = finished_count(study)
    try:
        ctx.reference_ms = reference_latency(study, ctx)
    except RuntimeError as e:  # e.g. --input-size 99999: the reference's first input
        if not is_out_of_memory(e):
            raise
        if write and not study.trials:  # nothing in it to keep, and kept it would refuse the
            optuna.delete_study(study_name=config.name, storage=storage)  # corrected rerun
            if created and not config.storage:
                (run_dir / STUDY_DB).unlink(missing_ok=True)
                remove_if_empty(created)
        raise UsageError(f"--input-size {config.input_size}: out of memory timing the "
                         f"reference network {REFERENCE} ({failed_allocation(e)})") from None
    if write:
        write_run_meta(run_dir, {
            "study_name": config.name, "storage": config.storage,
            "num_classes": ctx.data.num_classes, "classes": list(ctx.data.classes),
            "settings": settings, "environment": environment()})
        print(f"study {config.name!r} in {run_dir}: {already} finished trials, target "
              f"{config.trials}; space {config.space} ({ctx.space.size():,} architectures); "
              f"T = {config.target_ms:g} ms, alpha = {ctx.alpha:g}, beta = {ctx.beta:g}; "
              f"data {ctx.data.source}: {len(ctx.data.train)} train / {len(ctx.data.val)} "
              f"val; {config.workers} worker(s) x {train_threads(config)} training thread(s)"
              f"{'' if config.train_threads else SHARED_NOTE}", flush=True)
    if write and config.baselines and config.enqueue_baselines:
        queued = enqueue_baselines(study, ctx.space, config.baselines)
        if queued:
            print(f"in the space, so enqueued as trials too: {', '.join(queued)}", flush=True)
    interrupted, workers = False, None
    try:
        if config.baselines:
            run_baselines(config.baselines, ctx, run_dir, study)
        if ready is not None:
            ready.set()
        if already < config.trials:
            workers = Workers.start(config)
            study.optimize(
                make_objective(ctx), timeout=config.timeout, catch=(CandidateFailed,),
                callbacks=[StopAtTrials(config.trials), Progress(config.trials, already),
                           StopOnInterrupt(stop)])
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
    if not interrupted and finished_count(study):
        try:
            final = remeasure_front(study, ctx, run_dir)
            print(f"re-measured the front and the baselines together: {len(final)} networks",
                  flush=True)
        except BaseException as e:  # the results matter more than the re-measurement
            if was_interrupted(e):  # Ctrl-C here still writes the results
                interrupted = True
                print("interrupted: writing results without the re-measured front",
                      file=sys.stderr)
            elif isinstance(e, Exception):
                print(f"nas.search: the front could not be re-measured "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                      file=sys.stderr)
            else:
                raise
    files = write_results(study, run_dir, target_ms=config.target_ms)
    print_summary(files, target_ms=config.target_ms,
                  beta=config.exponents[1] if config.objective == "reward" else None,
                  baselines=load_baselines(run_dir))
    return INTERRUPTED.status() if interrupted else 0


def print_summary(files: dict[str, Path], *, target_ms: float | None = None,
                  beta: float | None = None, baselines: pd.DataFrame | None = None) -> None:
    df = pd.read_csv(files["trials"]) if "trials" in files else pd.DataFrame()
    done = df[df.state == "COMPLETE"] if len(df) else df
    if len(done):
        key = "reward" if "reward" in done and done.reward.notna().any() else "accuracy"
        # the architecture last: its 150-250 characters wrap, and the numbers stay aligned
        cols = [c for c in ("number", "latency_ms", "accuracy", "reward", "params", "macs",
                            "arch") if c in done]
        top = done.sort_values(key, ascending=False)[cols].head(10)
        if "arch" in top:  # left-aligned; a trial added by hand has none
            top = top.assign(arch=top["arch"].fillna("").astype(str))
        width = int(top["arch"].str.len().max()) if "arch" in top else 0
        print("\nBest trials:\n" + top.to_string(
            index=False, formatters={"arch": lambda a: a.ljust(width)},
            header=[c.ljust(width) if c == "arch" else c for c in cols]).rstrip())
        note = target_drift_note(df, target_ms, beta) if target_ms and beta is not None \
            else None
        if note:
            print("\n" + note)
        compared = baselines_summary(df, baselines) if baselines is not None else None
        if compared:
            print("\n" + compared)
    print("\nResults: " + ", ".join(str(p) for p in files.values()))


def main(argv: list[str] | None = None) -> int:
    """`python -m nas.search`; returns the exit status."""
    return guarded_run(config_from_argv(argv))


def guarded_run(config: SearchConfig, write: bool = True, ready=None, stop=None) -> int:
    """run() with user errors as one line and exit status 2, and an interrupt outside the
    search loop (loading data, opening the study, writing results) as one line too."""
    # Our progress line reports each trial, failures with their reason; Optuna's own per-trial
    # warnings would repeat them with tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not getattr(threading.excepthook, "quiet_storage_threads", False):
        threading.excepthook = quiet_storage_threads(threading.excepthook)
    try:
        return run(config, write, ready, stop)
    except BaseException as e:
        if was_interrupted(e):  # whatever error it surfaced as
            pass
        elif isinstance(e, USER_ERRORS):
            print(f"nas.search: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        elif isinstance(e, OSError):  # a read-only run folder, a full disk (not a trial's)
            print(f"nas.search: error: {oserror_line(e)}", file=sys.stderr)
            return 2
        elif (lost := database_failure(e)) is not None:  # e.g. the server restarted
            where = f"--storage {config.storage}" if config.storage else "the study's database"
            print(f"nas.search: error: {where}: {lost}; every finished trial is kept in the "
                  f"study, and the same command resumes it", file=sys.stderr)
            return 2
        else:
            raise
    if write:  # a worker's interrupt is reported by the first process
        print("nas.search: interrupted; the study keeps every finished trial, and the same "
              "command resumes it", file=sys.stderr)
    return INTERRUPTED.status()
