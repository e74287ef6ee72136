"""Submit the generated batch script with the real ``sbatch``; optionally follow the job."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from sala_train.console import say
from sala_train.errors import DistributedSetupError
from sala_train.launch.local import write_files
from sala_train.launch.plan import SLURM_DIR, LaunchPlan

# (PREEMPTED is final where the cluster cancels preempted jobs; one it requeues reads PENDING again)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}  # fmt: skip
POLL_SECONDS = 1.0
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


def _job_fields(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def wait_for(job_id: str) -> int:
    """Follow the job (through requeues) and return its exit status."""
    while True:
        fields = _job_fields(job_id)
        state = fields.get("JobState", "")
        if state in FINAL_STATES:
            code = int(fields.get("ExitCode", "1:0").split(":")[0])
            say(f"sala-train: SLURM job {job_id} {state} (exit {code})")
            return code if state == "COMPLETED" or code else 1
        if not fields:
            raise DistributedSetupError(f"SLURM job {job_id} vanished from scontrol before finishing")
        time.sleep(POLL_SECONDS)


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
