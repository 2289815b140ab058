"""What every `python -m nas.<tool>` shares in its command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None and required options: their help says what applies."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error: argparse's default prints the
    whole usage first (a dozen lines for nas.search) and buries the error under it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


MAX_SEED = 2**32 - 1  # numpy's and Optuna's samplers take 32-bit seeds


def is_plain_folder_name(name: str) -> bool:
    """A run name that stays one folder inside --runs-dir."""
    return bool(name) and not any(c in name for c in "/\\") and not name.startswith(".")


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing part of `folder` if it is not a folder: nothing can be made there."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    return None if existing.is_dir() else existing
