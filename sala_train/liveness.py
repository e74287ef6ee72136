"""Whether the process a record names (its host and pid) has ended: a run's ``running`` status and a
run directory's claim are told from stale ones by it. Shared by sala-report and the run directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def process_ended(record: dict[str, Any]) -> bool:
    """A record (a ``running`` status, a claim) whose process is known to have ended (same host, no
    such pid, or a zombie)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False  # another node's: it cannot be checked from here
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (ended, not yet reaped by its parent) is gone too
        return Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
