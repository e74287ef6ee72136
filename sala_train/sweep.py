"""End-of-sweep summary, registered as a Hydra callback in ``conf/train.yaml``.

A failed job returns no value instead of raising, so Hydra neither prints a traceback nor stops
the other jobs (and Optuna records it as a failed trial). This callback then reads every job's
``status.json`` and prints one line; ``sala-train`` exits 1 when any job failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from sala_train.console import say
from sala_train.report import STATUS_FILE

failed_jobs: list[str] = []


def job_statuses(sweep_dir: Path) -> dict[str, str]:
    """Job directory name -> status, in job order, for every job that wrote a status."""
    found = {}
    for path in sweep_dir.glob(f"*/{STATUS_FILE}"):
        found[path.parent.name] = json.loads(path.read_text(encoding="utf-8")).get("status", "unknown")
    by_job_number = sorted(found.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0))
    return dict(by_job_number)


class SweepSummary(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        statuses = job_statuses(sweep_dir)
        if not statuses:
            return
        counts: dict[str, int] = {}
        for status in statuses.values():
            counts[status] = counts.get(status, 0) + 1
        failed_jobs[:] = [job for job, status in statuses.items() if status == "failed"]
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        failed = f"; failed: job {', '.join(failed_jobs)}" if failed_jobs else ""
        say(f"sala-train: sweep {sweep_dir}: {summary}{failed}. Table: sala-report {sweep_dir}")
