"""Console entry points: ``sala-train`` and ``sala-data``.

Each first checks the whole command line (every problem at once, exit 2), then hands it to Hydra,
whose task function runs in the launching process: it writes the resolved ``config.yaml`` and
starts the runner through the configured launcher.
"""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sala_train import provenance
from sala_train.assets import register_resolvers
from sala_train.config import io
from sala_train.config.compose import check_command_line
from sala_train.config.entries import USER_SOURCE_PROVIDERS, source_dir, use_user_config_dirs
from sala_train.config.resolve import resolve_config
from sala_train.config.schema import DataToolConfig, LocalLauncher, MultinodeLauncher, RunConfig, SlurmLauncher
from sala_train.config.typed import to_plain
from sala_train.errors import USER_ERROR_EXIT, exit_on_user_error
from sala_train.launch.plan import PREEMPTED_EXIT, LaunchPlan
from sala_train.report import write_status

register_resolvers()


def _use_hydra_config_sources() -> list[str]:
    """Use the user's config directories as Hydra recorded them (a sweep job may run in another
    process), and return them as the override that brings them back (for the recorded command)."""
    sources = [s for s in HydraConfig.get().runtime.config_sources if s.provider in USER_SOURCE_PROVIDERS]
    found = [source_dir(s.schema, s.path) for s in sources]
    use_user_config_dirs([d for d in found if d is not None])
    uris = [f"{s.schema}://{Path(s.path).resolve() if s.schema == 'file' else s.path}" for s in sources]
    return [f"hydra.searchpath=[{','.join(uris)}]"] if uris else []


def _is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def _train_task(cfg: DictConfig) -> float | None:
    from sala_train.backends import write_deepspeed_config
    from sala_train.checkpoints import complete_checkpoints, guard_run_dir
    from sala_train.launch.plan import plan_launch, resolve_processes
    from sala_train.metrics import best_eval_loss

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    job_num = int(hydra_cfg.job.num) if _is_multirun() else 0
    fresh = not (run_dir / io.CONFIG_FILE).exists()  # this command created the run directory
    user_sources = _use_hydra_config_sources()
    with exit_on_user_error():
        run = resolve_processes(resolve_config(cfg, RunConfig, Path.cwd()), job_num)
        run = _name_tracker_run(run, run_dir)
        guard_run_dir(run_dir, to_plain(run), run.train.resume)
    io.save(run, run_dir)
    # The job's own command (a sweep job's overrides), runnable on its own to reproduce it.
    command = ["sala-train", *user_sources, *hydra_cfg.overrides.task]
    sweep_dir = Path(hydra_cfg.sweep.dir).resolve() if _is_multirun() else None
    provenance.write(run_dir, command, Path.cwd(), sweep_dir)
    write_deepspeed_config(run.backend, run_dir)
    plans = plan_launch(run, run_dir)
    if run.launcher.dry_run:
        from sala_train.launch.dry_run import render

        print(render(run, plans))
        return None
    with exit_on_user_error():
        code = _launch(run, run_dir, plans)
    submitted = isinstance(run.launcher, SlurmLauncher) and not run.launcher.wait
    try:
        write_status(run_dir, "submitted" if submitted else _STATUS.get(code, "failed"), code)
    except OSError as exc:  # a full disk must not turn the runner's clear message into a traceback
        if exc.errno != errno.ENOSPC:
            raise
        print(f"sala-train: the disk is full; could not write {run_dir}/status.json", file=sys.stderr)
    if code != 0:
        if _is_multirun():
            # No value, no exception: the other jobs go on, Optuna records a failed trial, and
            # sala_train.sweep prints the one-line summary at the end.
            print(f"sala-train: job {job_num} failed with exit code {code}: {run_dir}", file=sys.stderr, flush=True)
            return None
        if code == USER_ERROR_EXIT and fresh and not complete_checkpoints(run_dir):
            # A problem with the input, found before training: leave no run directory that looks like a run.
            shutil.rmtree(run_dir, ignore_errors=True)
        sys.exit(code)
    return best_eval_loss(run_dir)


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
    run_name = logger.run_name or hydra_cfg.job.override_dirname or run_dir.name
    return dataclasses.replace(run, logger=dataclasses.replace(logger, group=group, run_name=run_name))


_STATUS = {0: "completed", PREEMPTED_EXIT: "preempted"}


def _launch(run: RunConfig, run_dir: Path, plans: list[LaunchPlan]) -> int:
    from sala_train.launch import slurm
    from sala_train.launch.local import run_local

    match run.launcher:
        case LocalLauncher():
            return run_local(plans[0])
        case MultinodeLauncher(node_rank=rank):
            return run_local(plans[rank])
        case SlurmLauncher(wait=wait):
            job_id = slurm.submit(plans[0], run_dir)
            return slurm.wait_for(job_id) if wait else 0
    raise AssertionError(run.launcher)


@hydra.main(config_path="conf", config_name="data", version_base="1.3")
def _data_task(cfg: DictConfig) -> None:
    from sala_train.data.report import show

    _use_hydra_config_sources()
    with exit_on_user_error("sala-data"):
        show(resolve_config(cfg, DataToolConfig, Path.cwd()))


def _checked(config_name: str, schema: type, prog: str) -> None:
    with exit_on_user_error(prog):
        check_command_line(sys.argv[1:], config_name, schema)


def train_main() -> None:
    from sala_train import sweep

    _checked("train", RunConfig, "sala-train")
    _train_task()
    if sweep.failed_jobs:
        sys.exit(1)


def data_main() -> None:
    _checked("data", DataToolConfig, "sala-data")
    _data_task()
