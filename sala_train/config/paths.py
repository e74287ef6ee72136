"""How a data path a user writes names a file."""

from __future__ import annotations

from pathlib import Path


def home_expanded(path: str) -> Path:
    """``~`` and ``~/...`` under the home directory; any other name as it is (``~data.jsonl`` is a
    file's name: Path.expanduser reads it as user data's home, and raises where there is none)."""
    return Path(path).expanduser() if path == "~" or path.startswith("~/") else Path(path)
