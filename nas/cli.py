"""What every `python -m nas.<tool>` shares in its command line."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None, required options and switches: their help says what applies
    (a switch's default is its opposite, so `--no-latency (default: True)` read as on)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error: argparse's default prints the
    whole usage first (a dozen lines for nas.search) and buries the error under it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer >= low (and <= high), else argparse's one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer from {low} to "
                                             f"{high}")
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; expected an integer "
                                             f">= {low}")
        return value
    return parse


MAX_SEED = 2**32 - 1  # numpy's and Optuna's samplers take 32-bit seeds


MAX_NAME_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems


def is_plain_folder_name(name: str) -> bool:
    """A run name that stays one folder inside --runs-dir, and that file systems accept."""
    return (bool(name) and not any(c in name for c in "/\\\0") and not name.startswith(".")
            and len(name.encode(errors="surrogateescape")) <= MAX_NAME_BYTES)


def folder_name(text: str, max_length: int = 120) -> str:
    """A run folder's name made from free text (an architecture's `name:`), kept to one plain
    folder: '../x' must not climb out of --runs-dir, nor a long name pass the file system's."""
    name = re.sub(r"[^\w.+=-]+", "-", text).lstrip(".-")[:max_length]
    return name or "run"


def oserror_line(e: OSError) -> str:
    """'<path>: <reason>', as the shell says it (permission denied, no space left, ...)."""
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"{where}{e.strerror or e}"


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing part of `folder` if it is not a folder: nothing can be made there."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    return None if existing.is_dir() else existing
