"""The CPU cores this process may use: for torchrun's threads per worker and for the data's
worker processes alike."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus() -> int:
    """Cores this process may use: its CPU affinity (under SLURM, the job's allocation), capped by a
    cgroup CPU quota (containers), counted in physical cores where the machine has hyperthreads
    (as torch's own default thread count is)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        logical = min(logical, max(1, math.ceil(quota)))
    import psutil

    physical, total = psutil.cpu_count(logical=False), psutil.cpu_count(logical=True)
    per_core = total // physical if physical and total and total >= physical else 1
    return max(1, logical // per_core)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        fields = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
