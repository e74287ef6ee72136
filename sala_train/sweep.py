"""End-of-sweep summary, registered as a Hydra callback in ``conf/train.yaml``.

A failed job returns no value instead of raising, so Hydra neither prints a traceback nor stops
the other jobs (and Optuna records it as a failed trial). This callback then reads every job's
``status.json`` and prints one line; ``sala-train`` exits 1 when any job failed.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from sala_train.atomic import write_bytes_atomic
from sala_train.checkpoints import SWEEP_RECORD, SWEEP_STARTED
from sala_train.console import say
from sala_train.report import STATUS_FILE, RunStatus, job_name, job_order, read_status, sweep_jobs

failed_jobs: list[str] = []
preempted_jobs: list[str] = []  # (with no failed job, the command exits 75, as a preempted run does)
# Jobs this process ran (Hydra's basic launcher runs them here): job number -> run directory. A
# launcher that runs them elsewhere (submitit) leaves it empty; their Hydra records tell then.
ran_jobs: dict[str, Path] = {}
# Jobs refused before they started (bad input for that job): they write no status of their own.
# Filled in the launching process, so seen for jobs Hydra runs there (its basic launcher).
refused_jobs: list[str] = []
# A refused job's summary word (its directory keeps another run's status): it fails the command too.
REFUSED = "refused"
# A job refused in another process (a submitit job) tells the launching one with a file in the
# sweep directory: its own directory holds another run, which it must leave as it was.
REFUSED_MARK = ".refused-"


def mark_refused(sweep_dir: Path, job: str) -> None:
    refused_jobs.append(job)
    (sweep_dir / f"{REFUSED_MARK}{job}").touch()


def _refused_elsewhere(sweep_dir: Path, since: float | None) -> list[str]:
    """Jobs of this sweep refused in other processes; their marks are read once, then removed."""
    jobs = []
    for mark in sweep_dir.glob(f"{REFUSED_MARK}*"):
        if since is None or mark.stat().st_mtime >= since:
            jobs.append(mark.name.removeprefix(REFUSED_MARK))
        mark.unlink(missing_ok=True)
    return jobs


# The sweep directory's record of an earlier sweep there, as it was before Hydra's sweeper rewrote
# it for this one: put back when every job of this sweep is refused, so that a command that ran
# nothing leaves the record describing the jobs that are actually there.
_earlier_record: bytes | None = None


def job_statuses(sweep_dir: Path, since: float | None = None, records: str | None = ".hydra") -> dict[str, str]:
    """Job directory name -> status, in job order, for every job that wrote a status (and, with
    ``since``, whose Hydra record, or without records its status, was written since then)."""

    def this_sweep(job: Path) -> bool:
        record = job / records / "overrides.yaml" if records is not None else job / STATUS_FILE
        return since is None or (record.is_file() and record.stat().st_mtime >= since)

    # (a job refused before it started is counted by its mark, under its number: its own record of
    # the refusal, under its directory's name, would count it twice)
    statuses = {job_name(sweep_dir, job): read_status(job) for job in sweep_jobs(sweep_dir)
                if (job / STATUS_FILE).is_file() and this_sweep(job)}  # fmt: skip
    return {job: status for job, status in statuses.items() if status != RunStatus.REFUSED}


class SweepSummary(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from sala_train.config.compose import runs_jobs_on_slurm
        from sala_train.launch.local import keep_stop_requests, runs_jobs_here

        if runs_jobs_here(config.hydra.launcher):
            keep_stop_requests()  # the jobs run in this process: a signal between two ends the sweep
        elif runs_jobs_on_slurm(config.hydra.launcher.get("_target_")):
            _refuse_what_slurm_would(config.hydra.launcher)
            _requeue_jobs_at_their_time_limit(config)
        global _earlier_record
        sweep_dir = Path(config.hydra.sweep.dir)
        record = sweep_dir / SWEEP_RECORD
        _earlier_record = record.read_bytes() if record.is_file() else None  # (Hydra's sweeper writes it next)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_STARTED).touch()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        summarize(config)


# How many times a sweep job on SLURM that reaches hydra.launcher.timeout_min is requeued, resuming
# from the checkpoint it saved on submitit's warning (unless the command or a config file sets max_num_timeout).
REQUEUES_AT_THE_TIME_LIMIT = 3


def _requeue_jobs_at_their_time_limit(config: Any) -> None:
    """Hydra's submitit launcher requeues a job that reaches its time limit ``max_num_timeout``
    times, 0 by default: the job saved a checkpoint on the warning, then ended with submitit's
    UncompletedJobError ("timed-out too many times") as a traceback of the whole sweep."""
    from omegaconf import open_dict, read_write

    if config.hydra.launcher.get("max_num_timeout") != 0 or any(
        item.lstrip("+").startswith("hydra.launcher.max_num_timeout=") for item in config.hydra.overrides.hydra
    ):
        return  # (chosen: on the command line, or in a config file)
    with read_write(config.hydra), open_dict(config.hydra.launcher):
        config.hydra.launcher.max_num_timeout = REQUEUES_AT_THE_TIME_LIMIT


def _refuse_what_slurm_would(launcher: Any) -> None:
    """Before the sweep's directory is begun: one line and exit 2 (as ``launcher=slurm`` says
    sbatch's refusal), not submitit's traceback."""
    from sala_train.launch.slurm import sweep_jobs_refused

    if (why := sweep_jobs_refused(launcher)) is not None:
        say(f"sala-train: hydra/launcher=submitit_slurm: {why}; nothing was submitted", sys.stderr)
        raise SystemExit(2)


def summarize(config: Any) -> None:
    """Print the sweep's one line (and note its failed jobs, for the exit code): at the end of the
    sweep, and from the Optuna sweeper when no trial completed (Hydra then runs no end callback)."""
    sweep_dir = Path(config.hydra.sweep.dir)
    started = sweep_dir / SWEEP_STARTED
    since = started.stat().st_mtime if started.is_file() else None
    if ran_jobs:
        # The jobs ran here, and so were refused here: the marks in the directory are another
        # command's (two sweeps started in the same second share a clock-named directory).
        statuses = {job: read_status(path) for job, path in ran_jobs.items() if (path / STATUS_FILE).is_file()}
        for job in refused_jobs:
            (sweep_dir / f"{REFUSED_MARK}{job}").unlink(missing_ok=True)
        refused = set(refused_jobs)
    else:
        statuses = job_statuses(sweep_dir, since, config.hydra.output_subdir)
        refused = {*refused_jobs, *_refused_elsewhere(sweep_dir, since)}
    statuses.update((job, REFUSED) for job in refused)
    statuses = dict(sorted(statuses.items(), key=lambda item: job_order(item[0])))
    if not statuses:
        return
    if set(statuses.values()) == {REFUSED}:
        _restore_earlier_record(sweep_dir)
    counts = Counter(statuses.values())
    failed_jobs[:] = [job for job, status in statuses.items() if status in (RunStatus.FAILED, REFUSED)]
    preempted_jobs[:] = [job for job, status in statuses.items() if status == RunStatus.PREEMPTED]
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    for outcome in (RunStatus.FAILED, REFUSED, RunStatus.PREEMPTED):
        jobs = [job for job, status in statuses.items() if status == outcome]
        summary += f"; {outcome}: job {', '.join(jobs)}" if jobs else ""
    if preempted_jobs:
        summary += (
            " (stopped on request; the same command again resumes them, from their last checkpoint if they saved one)"
        )
    say(f"sala-train: sweep {sweep_dir}: {summary}. Table: sala-report {sweep_dir}")


def _restore_earlier_record(sweep_dir: Path) -> None:
    """Every job was refused (each directory holds another run): the sweep's record goes back to
    the earlier sweep's, whose jobs those are, instead of naming values no job ran with."""
    record = sweep_dir / SWEEP_RECORD
    if _earlier_record is not None and (not record.is_file() or record.read_bytes() != _earlier_record):
        write_bytes_atomic(record, _earlier_record)
