"""Atomic, durable files: an interrupted, concurrent or power-cut write never leaves half a file;
run folders that a refused or failed start leaves behind no trace of; the URL of a run
folder's SQLite study, whatever its path holds; a benchmark's table kept as its results file;
where nas keeps its per-user cache."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write beside the target under a per-process name, fsync, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def save_table(text: str, out: str | os.PathLike | None) -> Path | None:
    """Print a benchmark's table and keep it as its results file, if `out` names one (its
    folder made if missing)."""
    print(text)
    if out is None:
        return None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, text + "\n")


def make_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; returns those this call made, deepest first."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return created


def remove_if_empty(created: list[Path]) -> None:
    """A run that wrote nothing leaves no folder behind; one with a file in it stays."""
    for folder in created:
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            return


def sqlite_url(path: str | os.PathLike) -> str:
    """SQLAlchemy's URL of this SQLite file, escaped: in a plain f'sqlite:///{path}' a '?' or '#'
    in the path starts the URL's query (the study went to another file) and '%41' is decoded."""
    from sqlalchemy.engine import URL

    url = URL.create("sqlite", database=str(Path(path).resolve()))
    return url.render_as_string(hide_password=False)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """nas's cache (decoded datasets, the machine's latency calibration): the argument, else
    $NAS_CACHE, else ~/.cache/nas."""
    if cache_dir is None:
        cache_dir = os.environ.get("NAS_CACHE") or Path.home() / ".cache" / "nas"
    return Path(os.path.abspath(Path(cache_dir).expanduser()))
