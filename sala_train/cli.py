"""Console entry points: ``sala-train`` and ``sala-data``.

Each first checks the whole command line (every problem at once, exit 2), then hands it to Hydra,
whose task function runs in the launching process: it writes the resolved ``config.yaml`` and
starts the runner through the configured launcher.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sala_train import provenance
from sala_train.assets import register_resolvers
from sala_train.config import io
from sala_train.config.compose import check_command_line
from sala_train.config.entries import USER_SOURCE_PROVIDERS, mixed_settings_warning, source_dir, use_user_config_dirs
from sala_train.config.resolve import resolve_config
from sala_train.config.schema import DataToolConfig, LocalLauncher, MultinodeLauncher, RunConfig, SlurmLauncher
from sala_train.config.typed import ConfigError, to_plain
from sala_train.console import say
from sala_train.errors import (
    USER_ERROR_EXIT,
    USER_ERRORS,
    exit_on_user_error,
    exit_quietly_on_interrupt,
    forget_reported,
    last_reported,
    report,
)
from sala_train.launch.plan import (
    PREEMPT_REQUEST,
    PREEMPTED_EXIT,
    PREEMPTED_MARKER,
    SLURM_DIR,
    USER_ERROR_MARKER,
    LaunchPlan,
    how_it_ended,
    shell_exit_code,
    status_for_exit,
    world_size,
)
from sala_train.process_exit import SIGPIPE_EXIT
from sala_train.provenance import one_trial, override_key, without_dry_run
from sala_train.report import RunStatus, write_status
from sala_train.run_dir import (
    Records,
    held_before,
    named_by_the_clock,
    put_back,
    records_before,
    remove_what_this_command_wrote,
    restore_hydra_records,
    undo_this_command,
)
from sala_train.runner import FINAL_DIR

register_resolvers()


def _use_hydra_config_sources() -> list[str]:
    """Use the user's config directories as Hydra recorded them (a sweep job may run in another
    process), and return them as the override that brings them back (for the recorded command)."""
    sources = [s for s in HydraConfig.get().runtime.config_sources if s.provider in USER_SOURCE_PROVIDERS]
    paths = [str((_launch_dir() / s.path).resolve()) if s.schema == "file" else s.path for s in sources]
    found = [source_dir(s.schema, path) for s, path in zip(sources, paths, strict=True)]
    use_user_config_dirs([d for d in found if d is not None])
    uris = [f"{s.schema}://{path}" for s, path in zip(sources, paths, strict=True)]
    return [f"hydra.searchpath=[{','.join(uris)}]"] if uris else []


def _launch_dir() -> Path:
    """Where the command was run: relative paths on its command line mean from there, also when
    ``hydra.job.chdir=true`` has made the run directory the current one."""
    return Path(HydraConfig.get().runtime.cwd)


def _dir_key() -> str:
    """The key a user changes to train in another directory."""
    return "hydra.sweep.dir" if _is_multirun() else "hydra.run.dir"


def _is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def _train_task(cfg: DictConfig) -> float | None:
    from sala_train.launch.local import requeue_if_held
    from sala_train.run_dir import DirectoryTaken, claimed

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    if OmegaConf.select(cfg, "launcher.name") == "multinode":  # every node's command uses it, on purpose
        return _set_up_and_train(cfg)
    try:
        with claimed(run_dir):
            value = _set_up_and_train(cfg)
        requeue_if_held()  # (a submitit sweep job warned of its time limit: checkpointed, now requeued)
        return value
    except DirectoryTaken as taken:
        restore_hydra_records(run_dir, another_command_runs_there=True)  # (Hydra wrote this command's over its)
        print(f"sala-train: {_in_use(run_dir, taken.pid)}", file=sys.stderr, flush=True)
        if not _is_multirun():
            sys.exit(USER_ERROR_EXIT)  # (nothing removed: the directory is the other command's)
        _refuse_the_job(run_dir, None)  # (nothing written there either)
        return None


def _refuse_the_job(run_dir: Path, reason: str | None) -> None:
    """One sweep job's problem must not end the sweep: the others run, and the summary counts this
    one refused. A directory that holds a run keeps its own run and status; one that holds none
    records the refusal (``reason``; None: another command holds the directory, which is left to
    it), so that the sweep's report lists the job (``write_refused``)."""
    from sala_train import sweep
    from sala_train.report import read_status, write_refused

    hydra_cfg = HydraConfig.get()
    holds_no_run = not (run_dir / io.CONFIG_FILE).exists() and read_status(run_dir) in (RunStatus.NOT_STARTED,
                                                                                        RunStatus.REFUSED)  # fmt: skip
    if reason is not None and holds_no_run:
        with contextlib.suppress(OSError):  # (a disk that cannot take it: the summary still counts the job)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_refused(run_dir, reason)
    sweep.mark_refused(Path(hydra_cfg.sweep.dir).resolve(), str(hydra_cfg.job.num))
    print(f"sala-train: job {hydra_cfg.job.num} refused (exit code {USER_ERROR_EXIT}): {run_dir}", file=sys.stderr,
          flush=True)  # fmt: skip


def _in_use(run_dir: Path, holder: int) -> str:
    """Why another command's run directory is refused: a runner training there now, or a command
    (``holder``: its pid, 0 unknown) setting it up."""
    from sala_train.report import running_here

    if (pid := running_here(run_dir)) is not None:
        return (
            f"{_dir_key()}: {run_dir} is being trained now by process {pid} on this machine; wait for it "
            f"to end, or stop it (kill -TERM {pid} saves a checkpoint) and run this command again to resume"
        )
    # Held, yet no runner trains there: the holder sets up its run, or its runner has ended and it
    # writes the run's last records.
    by = f"process {holder} on this machine" if holder else "another sala-train command"
    return (
        f"{_dir_key()}: {run_dir} is in use by {by}, which is setting up or finishing a run there (two "
        f"commands started in the same second get the same directory named by the clock); choose another "
        f"{_dir_key()}, or wait for it to end"
    )


def _set_up_and_train(cfg: DictConfig) -> float | None:
    from sala_train.backends import write_deepspeed_config
    from sala_train.checkpoints import complete_checkpoints, effective_resume, guard_run_dir, started_from
    from sala_train.launch.plan import plan_launch, resolve_processes
    from sala_train.memory import counts_or_why_not
    from sala_train.metrics import best_eval_loss, read_metrics

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    job_num = int(hydra_cfg.job.num) if _is_multirun() else 0
    forget_reported()  # (a sweep's jobs run in one process: a refusal's words are this job's own)
    fresh = not held_before(run_dir, io.CONFIG_FILE)  # this command starts the run
    user_sources = _use_hydra_config_sources()
    if _is_multirun():
        from sala_train import sweep

        _end_the_sweep_if_stopped(f"before job {job_num}")  # signalled between two jobs
        sweep.ran_jobs[str(job_num)] = run_dir
    records: Records | None = None  # an existing directory's, put back if this command stops before training
    shared_dir = False  # nodes started by hand share the run directory: one node's Ctrl-C leaves it alone
    try:
        # Bad input found before the run started: remove what this command wrote into its directory.
        try:
            with exit_on_user_error(cleanup=lambda: undo_this_command(run_dir, fresh)):
                run = resolve_processes(resolve_config(cfg, RunConfig, _launch_dir(), run_dir), job_num)
                run = _name_tracker_run(run, run_dir)
                shared_dir = _shared_by_nodes(run)
                _refuse_a_clock_named_dir_across_nodes(run, run_dir)
                _check_trackers_here(run, run_dir)
                _check_the_rendezvous_endpoint(run)
                _refuse_what_this_machine_cannot_run(run)
                guard_run_dir(run_dir, to_plain(run), run.train.resume, _dir_key())
                _refuse_a_run_in_progress(run, run_dir)
                _refuse_a_checkpoint_this_world_cannot_resume(run, run_dir)
                read_metrics(run_dir)  # damaged: said now (a rerun reads it, and a resume trims it, after loading)
                # A dry run's estimate adapts the model on the meta device: LoRA targets it lacks stop it here.
                counts = counts_or_why_not(run) if run.launcher.dry_run else None
        except SystemExit:
            if not _is_multirun():
                raise
            _refuse_the_job(run_dir, last_reported() or "(see the sweep's output)")
            return None
        resume = effective_resume(run.train.resume, run_dir)
        continued = resume == "auto" or started_from(run_dir, resume)  # (not a new start)
        if not fresh and continued and not run.launcher.dry_run and _already_complete(run_dir):
            # Rerunning a finished command must not train on (the Trainer would take a step past max_steps).
            print(f"sala-train: {run_dir} is already complete ({FINAL_DIR}/ saved); nothing to do. "
                  f"Choose a new {_dir_key()} to train again.")  # fmt: skip
            restore_hydra_records(run_dir)  # nothing ran: the run's records stay those of the command that made it
            return best_eval_loss(run_dir)
        records = records_before(run_dir)  # (also if the runner finds bad input before training)
        if not (run.launcher.dry_run and _holds_this_config(run_dir, run)):
            io.save(run, run_dir)
            # The job's own command (a sweep job's overrides), runnable on its own to reproduce it.
            # (less launcher.dry_run: a dry run records the command its printed command then trains)
            command = ["sala-train", *user_sources, *one_trial(without_dry_run(list(hydra_cfg.overrides.task)))]
            sweep_dir = Path(hydra_cfg.sweep.dir).resolve() if _is_multirun() else None
            provenance.write(run_dir, command, _launch_dir(), sweep_dir)
        else:  # a dry run of an existing run prints how it continues and changes none of its records
            restore_hydra_records(run_dir)  # (deepspeed.json and the sbatch script are written again, the same)
        # (here, where the user's config directories are known: the runner does not search them)
        if (warning := mixed_settings_warning(run.dataset)) is not None:
            say(f"sala-train: {warning}", sys.stderr)  # (not into a dry run's command, to be pasted)
        write_deepspeed_config(run.backend, run_dir)
        plans = plan_launch(run, run_dir)
        if run.launcher.dry_run:
            from sala_train.launch.dry_run import render
            from sala_train.launch.local import write_files

            for plan in plans:
                write_files(plan)  # the sbatch script the printed command submits, so it can be pasted
            assert counts is not None  # (taken above, for a dry run)
            with _quiet_when_the_reader_leaves():  # (what it wrote stays: the printed command needs it)
                print(render(run, plans, run_dir, counts, _gpus_counted_here(cfg, run)), flush=True)
                if (outlook := _what_the_command_does_there(run, run_dir, continued)) is not None:
                    print(outlook, flush=True)
            return None
        code = _check_before_ranks(run)
    except KeyboardInterrupt:  # (train_main says `interrupted`, exit 130)
        # Ctrl-C before the training process started: the directory as it was.
        if shared_dir:
            pass  # (the other nodes' commands may be writing there, or training)
        elif fresh:
            undo_this_command(run_dir, fresh)
        elif records is not None:
            put_back(run_dir, records)
        else:
            restore_hydra_records(run_dir)
        raise
    if code == 0:  # signalled while the data was checked
        _end_the_sweep_if_stopped(f"before job {job_num} started training")
    if code == 0:
        with exit_on_user_error():
            code = _launch(run, run_dir, plans)
    submitted = isinstance(run.launcher, SlurmLauncher) and not run.launcher.wait and code == 0
    try:
        write_status(run_dir, RunStatus.SUBMITTED if submitted else status_for_exit(code), code)
    except OSError as exc:  # a full or read-only disk must not turn the runner's clear message into a traceback
        print(f"sala-train: could not write {run_dir}/status.json ({exc.strerror or exc})", file=sys.stderr)
    # A stop signal is for the whole command, not for this job only: end the sweep here (the next
    # job would start otherwise). Rerunning the command resumes it: finished jobs are skipped and
    # this one continues from its checkpoint.
    where = f"after job {job_num} finished ({run_dir})" if code == 0 else f"at job {job_num} ({run_dir})"
    _end_the_sweep_if_stopped(where, code if code not in (0, PREEMPTED_EXIT) else None)
    # A problem with the input, found before training: the directory as it was. (Not a sweep job's, whose
    # status the sweep's summary counts: it stays failed.)
    if code == USER_ERROR_EXIT and not (
        fresh or _is_multirun() or _shared_by_nodes(run) or _slurm_job_ran(run, run_dir)
    ):
        put_back(run_dir, records)
    if code != 0:
        if _is_multirun():
            # No value, no exception: the other jobs go on, Optuna records a failed trial, and
            # sala_train.sweep prints the one-line summary at the end.
            outcome = "preempted (stopped on request; rerun to resume)" if code == PREEMPTED_EXIT else "failed"
            print(f"sala-train: job {job_num} {outcome} with exit code {code}: {run_dir}", file=sys.stderr, flush=True)
            return None
        if (
            code == USER_ERROR_EXIT
            and fresh
            and not complete_checkpoints(run_dir)
            and not _shared_by_nodes(run)
            and not _slurm_job_ran(run, run_dir)
        ):
            # A problem with the input, found before training: leave no run directory that looks like a run.
            remove_what_this_command_wrote(run_dir)
        sys.exit(code)
    return best_eval_loss(run_dir)


def _end_the_sweep_if_stopped(where: str, code: int | None = None) -> None:
    """In a sweep whose process was signalled: say so and exit (75, or a job's own failure code)."""
    if _is_multirun() and _stopped_in_this_process():
        print(f"sala-train: sweep stopped on a signal {where}; {_how_to_resume_the_sweep()}", file=sys.stderr,
              flush=True)  # fmt: skip
        sys.exit(PREEMPTED_EXIT if code is None else code)


def _how_to_resume_the_sweep() -> str:
    """The same command resumes a sweep only in the same sweep directory: a default one is named by
    the clock, so the rerun must name it."""
    hydra_cfg = HydraConfig.get()
    if (storage := hydra_cfg.sweeper.get("storage")) is not None:
        # The stored study keeps its trials: the same command would ask it for new ones, which the
        # same sampler seed draws as the first ones again (their jobs then reported twice).
        return (f"the study in {storage} keeps its completed trials (the stopped one is marked failed); continue "
                "it with a new hydra.sweep.dir and another hydra.sweeper.sampler.seed")  # fmt: skip
    if any(override_key(o) == "hydra.sweep.dir" for o in hydra_cfg.overrides.hydra):
        return "rerun the same command to resume it"
    return f"rerun the same command with hydra.sweep.dir={Path(hydra_cfg.sweep.dir).resolve()} to resume it"


def _stopped_in_this_process() -> bool:
    """Whether this process, which runs the sweep's jobs one after another (Hydra's basic
    launcher), was signalled during this job. A job another launcher runs elsewhere (a submitit
    SLURM job) is not the sweep's launching process: its stop ends only that job."""
    from sala_train.launch.local import runs_jobs_here, stop_requested

    return stop_requested() and runs_jobs_here(HydraConfig.get().launcher)


def _gpus_counted_here(cfg: DictConfig, run: RunConfig) -> int | None:
    """The GPUs of this machine ``launcher.nproc_per_node=null`` was resolved from; None when the
    command set it, or when nothing was counted (SLURM's ``gpus_per_node``, one process for ``single``)."""
    from sala_train.config.schema import SingleBackend
    from sala_train.launch.plan import count_local_gpus

    counted = not isinstance(run.launcher, SlurmLauncher) and not isinstance(run.backend, SingleBackend)
    return count_local_gpus() if counted and cfg.launcher.get("nproc_per_node") is None else None


def _holds_this_config(run_dir: Path, run: RunConfig) -> bool:
    """Whether ``run_dir/config.yaml`` is this config already, apart from ``launcher.dry_run`` (then
    a dry run's printed command, which reads that file, runs exactly what was asked)."""
    path = run_dir / io.CONFIG_FILE
    if not path.is_file():
        return False
    held, asked = yaml.safe_load(path.read_text(encoding="utf-8")), to_plain(run)
    for config in (held, asked):
        if isinstance(config, dict) and isinstance(config.get("launcher"), dict):
            config["launcher"].pop("dry_run", None)
    return bool(held == asked)


def _shared_by_nodes(run: RunConfig) -> bool:
    """Nodes started by hand share the run directory: one node's failure must not remove it under the others."""
    return isinstance(run.launcher, MultinodeLauncher) and run.launcher.nnodes > 1


def _slurm_job_ran(run: RunConfig, run_dir: Path) -> bool:
    """A SLURM job started (its log is there): the cluster has a record of it, so its files stay."""
    return isinstance(run.launcher, SlurmLauncher) and any((run_dir / SLURM_DIR).glob("*.out"))


def _what_the_command_does_there(run: RunConfig, run_dir: Path, continued: bool) -> str | None:
    """For a dry run: what the printed command will do in a directory that holds a run (nothing,
    as the run is complete; or resume, from which checkpoint), or None for a start."""
    from sala_train.checkpoints import checkpoint_step
    from sala_train.runner import resume_checkpoint

    if continued and _already_complete(run_dir):
        return (f"# {run_dir} is complete ({FINAL_DIR}/ saved): the command above does nothing; choose a new "
                f"{_dir_key()} to train again")  # fmt: skip
    checkpoint = resume_checkpoint(run, run_dir)
    if checkpoint is None:
        return None
    of = f" of {run.train.max_steps}" if run.train.max_steps > 0 else ""
    return f"# the command above resumes from {checkpoint} (step {checkpoint_step(checkpoint)}{of})"


def _already_complete(run_dir: Path) -> bool:
    from sala_train.report import STATUS_FILE, read_status

    return (
        (run_dir / STATUS_FILE).is_file()
        and read_status(run_dir) == RunStatus.COMPLETED
        and (run_dir / FINAL_DIR).is_dir()
    )


def _refuse_a_clock_named_dir_across_nodes(run: RunConfig, run_dir: Path) -> None:
    """Nodes started by hand read the clock at different moments: each would get its own run
    directory and rendezvous id (derived from it), and the nodes would never meet."""
    if _shared_by_nodes(run) and not run.launcher.dry_run and named_by_the_clock(run_dir):
        key, what = ("hydra.sweep.dir", "sweep") if _is_multirun() else ("hydra.run.dir", "run")
        raise ConfigError(
            [
                f"{key}: launcher=multinode needs the same {what} directory on every node, not one named by "
                f"the time each node started; add {key}=PATH (a shared file system, or the same path on "
                "each node) to the command on every node"
            ]
        )


def _refuse_a_run_in_progress(run: RunConfig, run_dir: Path) -> None:
    """Two runners in one run directory would resume from each other's checkpoints and interleave
    metrics.jsonl. The runner's ``running`` record names its host and pid; a live one on this
    host refuses the second command (nodes started by hand share the directory on purpose); a
    SLURM job, whose runner is on another host, is asked of SLURM."""
    from sala_train.launch.slurm import live_job
    from sala_train.report import running_here

    if run.launcher.dry_run or _shared_by_nodes(run):
        return
    if isinstance(run.launcher, SlurmLauncher):
        if (job := live_job(run_dir)) is not None:
            job_id, state = job
            stop = f"scancel {job_id}" + (" saves a checkpoint" if state == "RUNNING" else "")
            raise ConfigError([f"{_dir_key()}: {run_dir} is trained by SLURM job {job_id} ({state}); wait for it to "
                               f"end, or stop it ({stop}) and submit this command again to resume"])  # fmt: skip
        return
    if running_here(run_dir) is not None:
        raise ConfigError([_in_use(run_dir, 0)])


def _check_trackers_here(run: RunConfig, run_dir: Path) -> None:
    """W&B online without a key: refused in a second, before a process starts. Not for a SLURM
    job, which runs elsewhere (its ranks check it there, before loading the model), nor for a dry
    run, whose command may be pasted elsewhere."""
    from sala_train.trackers import check_tracker_folder, check_trackers

    if not run.launcher.dry_run and not isinstance(run.launcher, SlurmLauncher):
        check_trackers(run)
        check_tracker_folder(run, run_dir)


def _check_the_rendezvous_endpoint(run: RunConfig) -> None:
    """A node started by hand: ``master_addr`` resolves here, and ``master_port`` is free or a torch
    rendezvous (not for a dry run, whose commands are pasted on the other nodes)."""
    from sala_train.launch.endpoint import check_rendezvous_endpoint

    if isinstance(run.launcher, MultinodeLauncher) and not run.launcher.dry_run:
        check_rendezvous_endpoint(run.launcher.master_addr, run.launcher.master_port)


def _refuse_what_this_machine_cannot_run(run: RunConfig) -> None:
    """FSDP or fp16 without CUDA, refused here when this machine trains (``launcher=local``, its dry
    run's command too, or a node started by hand), not after torchrun has started ranks that each
    refuse it. A SLURM job's nodes, and the nodes a multinode dry run's commands are pasted on, are
    other machines: the runner checks there."""
    from sala_train.distributed import refuse_unsupported  # (imports torch only for what needs asking it)

    elsewhere = isinstance(run.launcher, SlurmLauncher) or (
        isinstance(run.launcher, MultinodeLauncher) and run.launcher.dry_run
    )
    if not elsewhere:
        refuse_unsupported(run)


def _refuse_a_checkpoint_this_world_cannot_resume(run: RunConfig, run_dir: Path) -> None:
    """The runner's refusals of a checkpoint saved by another backend or process count, made here
    too: before torchrun starts or SLURM queues the job, and in a dry run, which said the resume
    would work. (The runner still checks: a requeued SLURM job starts no launcher.)"""
    from sala_train.checkpoints import refuse_what_cannot_resume
    from sala_train.runner import resume_checkpoint

    checkpoint = resume_checkpoint(run, run_dir)
    if checkpoint is not None and checkpoint.is_dir():
        refuse_what_cannot_resume(checkpoint, run.backend, world_size(run))


def _check_before_ranks(run: RunConfig) -> int:
    """Several processes on this machine: check the data once here (one message, exit 2) before
    starting them. A SLURM job is only submitted from here: the login node may lack the model's
    files or the time to tokenize, so the job's ranks check it (the batch script exits 2)."""
    if world_size(run) == 1 or isinstance(run.launcher, SlurmLauncher):
        return 0  # the runner checks it itself, with the same single message
    from sala_train.preflight import check_and_build_data

    try:
        check_and_build_data(run, quiet=True)  # (rank 0 gives the warnings, once)
    except USER_ERRORS as exc:
        return report(exc)
    return 0


def _name_tracker_run(run: RunConfig, run_dir: Path) -> RunConfig:
    """Fill W&B group (the sweep) and run name (the overrides) left null in the config."""
    import dataclasses

    from sala_train.config.schema import WandbLogger

    logger = run.logger
    if not isinstance(logger, WandbLogger):
        return run
    hydra_cfg = HydraConfig.get()
    group = logger.group
    if group is None and _is_multirun():
        group = str(Path(hydra_cfg.sweep.dir))
    run_name = logger.run_name or _overrides_name(hydra_cfg.overrides.task) or run_dir.name
    return dataclasses.replace(run, logger=dataclasses.replace(logger, group=group, run_name=run_name))


def _overrides_name(task_overrides: list[str]) -> str:
    """Hydra's ``override_dirname`` less the keys a rerun may add without changing the run
    (``train.resume``, ``launcher.dry_run``): the name is part of the config a resumption compares."""
    from sala_train.checkpoints import RESUME_NEUTRAL

    kept = [item for item in task_overrides if override_key(item) not in RESUME_NEUTRAL]
    return ",".join(sorted(kept))


def _launch(run: RunConfig, run_dir: Path, plans: list[LaunchPlan]) -> int:
    from sala_train.launch import slurm

    match run.launcher:
        case LocalLauncher():
            return _run_here(run_dir, plans[0])
        case MultinodeLauncher(node_rank=rank):
            return _run_here(run_dir, plans[rank], other_nodes=True)
        case SlurmLauncher(wait=wait):
            try:
                job_id = slurm.submit(plans[0], run_dir)
            except USER_ERRORS as exc:  # nothing was submitted: bad input, undone like a config problem
                report(exc)
                return USER_ERROR_EXIT
            if not wait:
                return 0
            code = slurm.wait_for(job_id, run_dir)
            if code == USER_ERROR_EXIT:  # the ranks' messages went to the job's log: show them here too
                for problem in sorted((run_dir / USER_ERROR_MARKER).glob("*")):
                    say(problem.read_text(encoding="utf-8"), sys.stderr)
            return code
    raise AssertionError(run.launcher)


def _run_here(run_dir: Path, plan: LaunchPlan, other_nodes: bool = False) -> int:
    from sala_train.launch.local import drop_held_requeue, run_local, submitits_requeue_held

    shutil.rmtree(run_dir / USER_ERROR_MARKER, ignore_errors=True)  # left by an earlier launch
    for marker in (PREEMPTED_MARKER, PREEMPT_REQUEST):
        (run_dir / marker).unlink(missing_ok=True)
    with submitits_requeue_held(run_dir / PREEMPT_REQUEST):
        code = run_local(plan)
    outcome = _workers_outcome(run_dir, code, other_nodes)
    if outcome != PREEMPTED_EXIT:
        drop_held_requeue()  # (warned, but it finished or failed before stopping)
    return outcome


def _workers_outcome(run_dir: Path, code: int, other_nodes: bool = False) -> int:
    """The run's exit code from the workers': torchrun reports only the first worker that failed,
    which may be a rank whose peer had left, so the ranks leave a marker for a config or data
    problem (2) and for a checkpoint after a stop request (75); a process killed by a signal
    reports -N, which the shell convention writes 128+N. ``other_nodes``: nodes started by hand,
    where the rank that printed the problem may be on another node."""
    for marker, meaning in ((USER_ERROR_MARKER, USER_ERROR_EXIT), (PREEMPTED_MARKER, PREEMPTED_EXIT)):
        # Left in place: on a shared run directory every node's launcher reads it (the next launch clears it).
        if (run_dir / marker).exists() and code != 0:
            if meaning == USER_ERROR_EXIT and other_nodes:  # (printed once, by the first rank to meet it)
                for problem in sorted((run_dir / USER_ERROR_MARKER).glob("*")):
                    text = problem.read_text(encoding="utf-8").removeprefix("sala-train: ")
                    say(f"sala-train: the ranks stopped on: {text}", sys.stderr)
            elif meaning == USER_ERROR_EXIT:  # after the line naming the failed worker
                print("sala-train: a rank stopped on the config or data problem printed above", file=sys.stderr)
            return meaning
    if code < 0:  # killed (the kernel's OOM killer, a segfault): it could not say so itself
        print(f"sala-train: the training process {how_it_ended(code)}", file=sys.stderr, flush=True)
    return shell_exit_code(code)


@hydra.main(config_path="conf", config_name="data", version_base="1.3")
def _data_task(cfg: DictConfig) -> None:
    from sala_train.data.report import show

    _use_hydra_config_sources()
    with _quiet_when_the_reader_leaves(), exit_on_user_error("sala-data"):
        show(resolve_config(cfg, DataToolConfig, _launch_dir()))


@contextmanager
def _quiet_when_the_reader_leaves() -> Iterator[None]:
    """The reader stopped reading (`sala-data ... | head`, a dry run piped to `head -1`): end as
    `cat` does there, silently with 128 + SIGPIPE, not with a traceback; stdout then goes nowhere
    so exiting flushes nothing."""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(SIGPIPE_EXIT)


def _checked(config_name: str, schema: type, prog: str) -> list[Any]:
    """The command line's overrides, parsed, once every check has passed (exit 2 otherwise)."""
    overrides: list[Any] = []
    with exit_on_user_error(prog):
        overrides = check_command_line(sys.argv[1:], config_name, schema)
    return overrides


# Hydra's flags that only print (help, the composed config, its own info). Hydra's error handler
# turns a write to a reader that has left (`sala-train --cfg job | head -1`) into a traceback and
# exit 1; these commands end there as `cat` does instead, by SIGPIPE (141). (Not a training command:
# its launcher must outlive a reader that left, to stop the run properly.)
PRINT_ONLY_FLAGS = frozenset({"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc",
                              "--shell-completion", "--version"})  # fmt: skip


def _end_as_cat_if_only_printing(argv: list[str]) -> None:
    if any(arg.split("=", 1)[0] in PRINT_ONLY_FLAGS for arg in argv):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _say_version_if_asked(prog: str, argv: list[str]) -> None:
    """``--version``: this program's version and the libraries it runs on (Hydra answered with
    only its own, ``Hydra 1.3.8``)."""
    if argv != ["--version"]:
        return
    from importlib.metadata import PackageNotFoundError, version

    from sala_train import __version__

    found = []
    for package in ("hydra-core", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    print(f"{prog} {__version__} ({', '.join(found)})")
    sys.exit(0)


def train_main() -> None:
    from sala_train import sweep

    _end_as_cat_if_only_printing(sys.argv[1:])
    _say_version_if_asked("sala-train", sys.argv[1:])

    # Ctrl-C before the training process starts (checks, composing, writing the run's records):
    # one line and 130; once it runs, the launcher forwards it as a stop request instead.
    with exit_quietly_on_interrupt("sala-train"):
        _checked("train", RunConfig, "sala-train")
        _train_task()
    if sweep.failed_jobs:
        sys.exit(1)
    if sweep.preempted_jobs:  # each kept a checkpoint: the same command again finishes them
        sys.exit(PREEMPTED_EXIT)


def data_main() -> None:
    _end_as_cat_if_only_printing(sys.argv[1:])
    _say_version_if_asked("sala-data", sys.argv[1:])
    made = None
    try:
        with exit_quietly_on_interrupt("sala-data"):
            made = _missing_run_dir(_checked("data", DataToolConfig, "sala-data"))
            _data_task()
    finally:
        _remove_if_empty(made)


def _missing_run_dir(overrides: list[Any]) -> tuple[Path, Path] | None:
    """(run directory, its first missing ancestor) when ``hydra.run.dir`` names one that does not
    exist yet: Hydra creates it, and sala-data, which writes nothing, removes it again if empty."""
    given = [o.value() for o in overrides if o.key_or_group == "hydra.run.dir"]
    if not given or not isinstance(given[-1], str) or "${" in given[-1]:
        return None
    run_dir = Path(given[-1]).expanduser().absolute()
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    return (run_dir, missing[-1]) if missing else None


def _remove_if_empty(made: tuple[Path, Path] | None) -> None:
    if made is None:
        return
    run_dir, top = made
    for directory in (run_dir, *run_dir.parents):
        try:
            directory.rmdir()  # only an empty one
        except OSError:
            return
        if directory == top:
            return


if __name__ == "__main__":
    train_main()
