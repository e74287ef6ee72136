"""Whether the process a record names (its host and pid) has ended: a run's ``running`` status and a
run directory's claim are told from stale ones by it. Shared by sala-report and the run directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def this_process() -> dict[str, Any]:
    """The record naming this process: its host and pid, and (on Linux) the boot and the moment it
    started, which tell it from a later process given the same pid (after a reboot, or a
    container's restart, a killed run's pid is soon another process's)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), **_identity(os.getpid())}


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (the state first), or None where /proc does
    not tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _identity(pid: int, fields: list[str] | None = None) -> dict[str, Any]:
    """``boot`` (the kernel's boot id) and ``started`` (the process's start, in clock ticks since
    boot: /proc/PID/stat's 22nd field), or nothing where /proc does not tell."""
    fields = _stat_fields(pid) if fields is None else fields
    try:
        return {"boot": _BOOT_ID.read_text().strip(), "started": int(fields[19])} if fields else {}
    except (OSError, ValueError, IndexError):
        return {}


def process_ended(record: dict[str, Any]) -> bool:
    """A record (a ``running`` status, a claim) whose process is known to have ended (same host, no
    such pid, a zombie, or the pid now another process's: another boot, or a later start)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False  # another node's: it cannot be checked from here
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # (another user's process holds the pid: its identity still tells)
    fields = _stat_fields(record["pid"])
    now = _identity(record["pid"], fields) if "started" in record else {}  # (older records: by the pid alone)
    if now and (now["boot"], now["started"]) != (record.get("boot"), record["started"]):
        return True
    return fields is not None and fields[:1] == ["Z"]  # a zombie (ended, not yet reaped by its parent) is gone too
