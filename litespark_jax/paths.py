"""Path settings read as a shell would: a YAML preset has no shell to expand a leading ``~``."""

from __future__ import annotations

import os


def expand_home(section, name: str) -> None:
    """A leading ~ in the path field ``name`` of a frozen config ``section`` means the home directory."""
    value = getattr(section, name)
    if isinstance(value, str) and value.startswith("~"):
        object.__setattr__(section, name, os.path.expanduser(value))
