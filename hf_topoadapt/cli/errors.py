"""The one error type of the command line, and the wording shared by every loader that reports one."""

from __future__ import annotations

import os


class CLIError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (loaders wrap long, multi-line explanations)."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(" :") if text else type(error).__name__


def hub_offline_note() -> str:
    """', hub access is off: HF_HUB_OFFLINE=1' when a Hub lookup could not even be tried."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f", hub access is off: {variable}=1"
    return ""


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is 'name' or 'org/name')."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
