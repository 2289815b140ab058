"""A run folder's contract, in one place: its file names, run.json (written by nas.search,
read and checked here for nas.export and nas.plot), and the study its storage holds.

    runs/<name>/run.json            settings, environment, storage URL (null: study.db)
    runs/<name>/study.db            the Optuna study (SQLite) unless --storage named another
    runs/<name>/latency_cache.json  measured latencies (nas.latency.LatencyCache)
    runs/<name>/baselines.csv       reference networks (nas.results)
    runs/<name>/trials.csv, pareto.csv, best.yaml, pareto.html, history.html   (nas.results)
    runs/<name>/front_latency.csv   the front and baselines re-measured together (nas.search)
    runs/<name>/confirm.csv, confirm.html, confirmed.yaml, confirm/   (nas.confirm)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from nas.files import sqlite_url, write_atomic
from nas.latency import MIN_INPUT_SIZE

RUN_JSON = "run.json"
STUDY_DB = "study.db"
LATENCY_CACHE = "latency_cache.json"
FRONT_LATENCY = "front_latency.csv"  # the front and baselines re-measured at the search's end
CONFIRM_DIR = "confirm"  # one folder per confirmed network, recipe and seed (nas.train's)
CONFIRM_CSV = "confirm.csv"
CONFIRM_HTML = "confirm.html"
CONFIRMED_YAML = "confirmed.yaml"


class RunFolderError(ValueError):
    """A run folder that cannot be read: one line naming the file, field or URL."""


def study_url(run_dir: Path) -> str:
    """The SQLite URL of the run folder's own study."""
    return sqlite_url(run_dir / STUDY_DB)


def write_run_meta(run_dir: Path, meta: dict[str, Any]) -> Path:
    """run.json, atomically; `default=str` keeps paths and dates readable."""
    return write_atomic(run_dir / RUN_JSON, json.dumps(meta, indent=2, default=str))


def load_run_study(run_dir: Path, storage: str | None = None) -> tuple[optuna.Study, dict]:
    """The study behind a run folder, from the storage named in its run.json."""
    meta_path = run_dir / RUN_JSON
    meta = read_run_meta(meta_path)
    own = run_dir / STUDY_DB
    if not (storage or meta.get("storage") or own.is_file()):
        raise RunFolderError(f"{run_dir}: no study.db; pass --storage URL if the run used another "
                          f"storage")
    url = storage or meta.get("storage") or sqlite_url(own)
    where = f"--storage {url}" if storage else f"{meta_path}: storage {url}"
    name = meta.get("study_name", run_dir.name)
    try:
        study = optuna.load_study(study_name=name, storage=open_existing_storage(url, where))
    except KeyError:
        raise RunFolderError(f"{run_dir}: storage {url} holds no study {name!r}") from None
    return study, meta


def read_run_meta(meta_path: Path) -> dict:
    """run.json as a dict, checked so a damaged file is named instead of failing later."""
    if not meta_path.is_file():
        raise RunFolderError(f"{meta_path.parent}: not a run folder (no run.json); "
                             f"pass runs/<name>")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise RunFolderError(f"{meta_path}: expected a JSON object, not {type(meta).__name__}")
    for field, allowed, ok in RUN_FIELDS:
        *outer, key = field.split(".")
        where = meta
        for name in outer:  # an absent settings has no fields to check
            where = where.get(name, {})
        if key in where and not ok(where[key]):
            raise RunFolderError(f"{meta_path}: {field} must be {allowed}, not "
                              f"{_shown(where[key])}")
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value) -> str:
    """A field's value as the error shows it: JSON's null, else Python's repr, kept short."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


# The run.json fields nas.export and nas.plot use, with what nas.search writes there (its own
# checks for --target-ms and --input-size). An absent field takes the tools' default; a present
# one, null included, must be valid: only storage is null when the run used its own study.db.
RUN_FIELDS = (
    ("storage", "a storage URL (a string) or null",
     lambda v: v is None or isinstance(v, str)),
    ("study_name", "a string", lambda v: isinstance(v, str)),
    ("num_classes", "an integer >= 1", lambda v: _is_int(v) and v >= 1),
    ("settings", "an object", lambda v: isinstance(v, dict)),
    ("settings.input_size", f"an integer >= {MIN_INPUT_SIZE}",
     lambda v: _is_int(v) and v >= MIN_INPUT_SIZE),
    ("settings.target_ms", "a finite number > 0",
     lambda v: _is_number(v) and math.isfinite(v) and v > 0),
)


def open_existing_storage(url: str, where: str) -> optuna.storages.BaseStorage:
    """Open without creating: reading a run must not leave an empty database behind."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception as e:  # SQLAlchemy's own errors: a bad URL is the user's, not a bug
        raise RunFolderError(f"{where}: not a storage URL ({type(e).__name__})") from None
    db = parsed.database
    if (parsed.get_backend_name() == "sqlite" and db and db != ":memory:"
            and "uri" not in parsed.query and not Path(db).is_file()):
        raise RunFolderError(f"{where}: no such database file {db}")
    try:
        return optuna.storages.get_storage(url)
    except Exception as e:  # driver errors (unknown dialect, unreadable file) are the user's
        first = str(e).strip().splitlines()[:1]
        raise RunFolderError(f"{where}: cannot be opened ({': '.join([type(e).__name__, *first])})"
                          ) from None
