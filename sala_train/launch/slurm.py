"""Submit the generated batch script with the real ``sbatch``; optionally follow the job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from sala_train.console import say
from sala_train.errors import DistributedSetupError
from sala_train.launch.local import write_files
from sala_train.launch.plan import PREEMPTED_EXIT, SLURM_DIR, SLURM_SCRIPT, LaunchPlan
from sala_train.report import STATUS_FILE

# (PREEMPTED is final where the cluster cancels preempted jobs; one it requeues reads PENDING again)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}  # fmt: skip
POLL_SECONDS = 1.0
# How long scontrol may fail to answer (a busy controller times out) before the job is reported lost.
UNANSWERED_SECONDS = 600.0
NO_SBATCH = "sbatch is not on PATH (is this a SLURM login node?)"


def submit(plan: LaunchPlan, run_dir: Path) -> str:
    """Submit and return the job id; print where its log goes."""
    write_files(plan)
    try:
        proc = subprocess.run(list(plan.argv), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DistributedSetupError(f"launcher=slurm: {NO_SBATCH}") from exc
    if proc.returncode != 0:
        raise DistributedSetupError(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    say(f"sala-train: submitted SLURM job {job_id}")
    say(f"sala-train: log {run_dir / SLURM_DIR / f'{job_id}.out'}")
    return job_id


def live_job(run_dir: Path) -> tuple[str, str] | None:
    """A job of this run that SLURM still holds (pending, running, requeued), found by its batch
    script's path, as (job id, state); None when there is none, or when squeue cannot tell (then
    sbatch itself reports an unreachable controller). A second job in the directory trained beside
    the first: both resumed from, and wrote, the same checkpoints, and metrics.jsonl interleaved."""
    script = run_dir / SLURM_DIR / SLURM_SCRIPT
    try:
        proc = subprocess.run(["squeue", "--noheader", f"--user={os.getuid()}", "--format=%i|%T|%o"],
                              capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        job_id, state, command = [*line.split("|", 2), "", ""][:3]
        if command and Path(command) == script:
            return job_id, state
    return None


def _job_fields(job_id: str) -> dict[str, str] | None:
    """The job's fields; {} when the controller no longer knows it; None when scontrol failed
    otherwise (a busy controller's timeout: asked again)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
    return {} if "Invalid job id" in proc.stderr else None


def wait_for(job_id: str, run_dir: Path) -> int:
    """Follow the job (through requeues) and return its exit status."""
    submitted = time.time()
    unanswered_since: float | None = None
    while True:
        fields = _job_fields(job_id)
        if fields is None:
            unanswered_since = unanswered_since or time.monotonic()
            if time.monotonic() - unanswered_since > UNANSWERED_SECONDS:
                say(f"sala-train: scontrol has not answered about SLURM job {job_id} for "
                    f"{UNANSWERED_SECONDS / 60:g} minutes; the job may still run: squeue -j {job_id}")  # fmt: skip
                return 1
            time.sleep(POLL_SECONDS)
            continue
        unanswered_since = None
        state = fields.get("JobState", "")
        if state in FINAL_STATES:
            code = int(fields.get("ExitCode", "1:0").split(":")[0])
            if state == "CANCELLED" and code == 0:  # (before it started, or past the batch script's trap)
                say(f"sala-train: SLURM job {job_id} CANCELLED; submit the same command again to continue")
                return PREEMPTED_EXIT
            say(f"sala-train: SLURM job {job_id} {state} (exit {code})")
            return code if state == "COMPLETED" or code else 1
        if not fields:  # ended and already purged by the controller: the job wrote how it ended
            return _ended_as_recorded(job_id, run_dir, submitted)
        time.sleep(POLL_SECONDS)


def _ended_as_recorded(job_id: str, run_dir: Path, submitted: float) -> int:
    """How the job ended by its run's status.json: only an ending it wrote since ``submitted``
    (an earlier job's record, or a requeue's ``submitted``, says nothing about this job's end)."""
    path = run_dir / STATUS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        status, code = str(record["status"]), int(record["exit_code"])
        written = path.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        status, code, written = "", 1, 0.0
    if status not in ("completed", "failed", "preempted") or written < submitted - 1:
        raise DistributedSetupError(f"SLURM job {job_id} vanished from scontrol before finishing")
    say(f"sala-train: SLURM job {job_id} ended ({run_dir / STATUS_FILE}: {status}, exit {code})")
    return code


def sweep_jobs_refused(launcher: Any) -> str | None:
    """Why SLURM would refuse the jobs of a sweep that Hydra's submitit launcher submits
    (``hydra/launcher=submitit_slurm``), or None. Asked of the real controller, with a test job of the
    same partition, account, QOS and time limit (``sbatch --test-only``: checked, not queued):
    submitit's own refusal came as a traceback of its internals, exit 1, with the sweep's directory
    begun (``.submitit/``, ``multirun.yaml``)."""
    options = {"time": launcher.get("timeout_min")} | {
        key: launcher.get(key) for key in ("partition", "account", "qos")
    }
    argv = ["sbatch", "--test-only", "--wrap=true", *(f"--{key}={value}" for key, value in options.items() if value)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError:
        return NO_SBATCH
    except subprocess.TimeoutExpired:
        return "sbatch did not answer within 60 s (is the SLURM controller up?)"
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return f"sbatch refuses its jobs: {'; '.join(lines) or proc.stdout.strip() or f'exit {proc.returncode}'}"
