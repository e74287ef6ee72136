"""Pure launch planning: resolved config + run directory -> argv lists, environment, files.

Commands are argv lists, never strings joined for a shell; ``shlex`` is used only to show them
(dry run) and to quote the lines of a generated sbatch script.
"""

from __future__ import annotations

import hashlib
import shlex
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from sala_train.config.schema import (
    LauncherConfig,
    LocalLauncher,
    MultinodeLauncher,
    RunConfig,
    SingleBackend,
    SlurmLauncher,
)
from sala_train.errors import USER_ERROR_EXIT
from sala_train.report import STATUS_FILE, RunStatus

RUNNER_MODULE = "sala_train.runner"
# torchrun, reporting a failed worker in one line and its exit code (see that module).
TORCHRUN_MODULE = "sala_train.launch.torchrun"
SLURM_DIR = "slurm"
SLURM_SCRIPT = "job.sbatch"
# A runner that saved a checkpoint after a preemption request exits with EX_TEMPFAIL and leaves
# PREEMPTED_MARKER in the run directory. torchrun reports only the first failed worker's code (and
# plain torchrun, 1), and the first to fail may be a rank whose peer left, so the batch script and
# the launcher look for the marker; PREEMPT_REQUEST is how the batch script asks for it.
PREEMPTED_EXIT = 75
PREEMPT_REQUEST = ".preempt-request"
PREEMPTED_MARKER = ".preempted"
# Likewise for a config or data problem found by the ranks (exit code 2 from each worker).
USER_ERROR_MARKER = ".user-error"  # a directory: one file per distinct problem the ranks met, holding its message
# Given to torchrun by a launcher on this machine: the stop file to create if that launcher dies.
STOP_FILE_ENV = "SALA_TRAIN_STOP_FILE"
# The config a node's command resolved (launcher.node_rank left out), as JSON: nodes started by hand
# share the run directory, so each one's config.yaml overwrote the other's, and nodes started with
# different overrides trained on whichever wrote last; the ranks compare these instead. Given as
# "NODE_RANK:JSON", the node's launcher.node_rank first.
NODE_CONFIG_ENV = "SALA_TRAIN_NODE_CONFIG"
# Set for the runner when a single process must record its problem there too (a SLURM job).
RECORD_PROBLEMS_ENV = "SALA_TRAIN_RECORD_PROBLEMS"


def status_for_exit(code: int) -> RunStatus:
    """How a run ended, from the runner's exit code."""
    return {0: RunStatus.COMPLETED, PREEMPTED_EXIT: RunStatus.PREEMPTED}.get(code, RunStatus.FAILED)


@dataclass(frozen=True)
class LaunchPlan:
    """One command to run (on one node), with files to write first."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    label: str = "this machine"
    files: dict[str, str] = field(default_factory=dict)
    # torchrun launches: the file that asks every rank to checkpoint at its next step and stop.
    # The launcher creates it on the first stop signal instead of signalling torchrun, which would
    # give its workers 30 s to finish before killing them (and dies of SIGUSR1, leaving them running).
    stop_file: str | None = None

    def display(self) -> str:
        # (not the node's config: the printed commands all read the one config.yaml)
        exports = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()) if k != NODE_CONFIG_ENV]
        return " ".join([*exports, shlex.join(self.argv)])


def nnodes(launcher: LauncherConfig) -> int:
    match launcher:
        case LocalLauncher():
            return 1
        case MultinodeLauncher() | SlurmLauncher():
            return launcher.nnodes
    raise AssertionError(launcher)


def nproc_per_node(launcher: LauncherConfig, local_gpus: int) -> int:
    """Worker processes per node: as configured, else one per GPU (one without GPUs)."""
    if launcher.nproc_per_node is not None:
        return launcher.nproc_per_node
    if isinstance(launcher, SlurmLauncher):
        return max(launcher.gpus_per_node, 1)
    return max(local_gpus, 1)


def world_size(cfg: RunConfig) -> int:
    assert cfg.launcher.nproc_per_node is not None, "resolve nproc_per_node first"
    return nnodes(cfg.launcher) * cfg.launcher.nproc_per_node


def shell_exit_code(code: int) -> int:
    """A process's status as a shell reports it: killed by signal N (reported -N) is 128+N."""
    return 128 - code if code < 0 else code


def how_it_ended(code: int) -> str:
    """A process's status in words: ``exited with code 3``, ``was killed by SIGKILL (out of memory?)``."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")


# What a runner takes as "checkpoint at the next step and exit" (a second one: exit now). SIGUSR2 is
# submitit's warning before a sweep job's time limit (hydra/launcher=submitit_slurm): SLURM sends it
# to every process of the job, and its default action killed the runner without a checkpoint.
RUNNER_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2)


def stop_at_once(signum: int) -> None:
    """A second stop signal to a runner: exit now, without a checkpoint, saying so once (rank 0)
    before the process ends with the shell's code for the signal (128 + N)."""
    import os
    import select

    if os.environ.get("RANK", "0") == "0":
        name = signal.Signals(signum).name
        line = f"sala-train: a second stop signal ({name}): stopped at once, without a checkpoint; rerun the "
        line += "same command to resume from the last one\n"
        try:  # only where it cannot block: "at once" holds with a full pipe nobody reads (a stalled tee)
            if select.select([], [2], [], 0)[1]:
                os.write(2, line.encode())
        except OSError:
            pass
    os._exit(128 + signum)


def runner_argv(run_dir: Path) -> tuple[str, ...]:
    return (sys.executable, "-m", RUNNER_MODULE, str(run_dir))


def _torchrun(nodes: int, procs: int, rendezvous: tuple[str, ...], run_dir: Path) -> tuple[str, ...]:
    return (
        sys.executable, "-m", TORCHRUN_MODULE,
        "--nnodes", str(nodes), "--nproc_per_node", str(procs), *rendezvous,
        "-m", RUNNER_MODULE, str(run_dir),
    )  # fmt: skip


def rendezvous_id(run_dir: Path) -> str:
    return "sala-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]


def node_config(cfg: RunConfig) -> str:
    """``cfg`` as JSON, less what differs from node to node (``launcher.node_rank``)."""
    import json

    from sala_train.config.typed import to_plain

    plain = to_plain(cfg)
    plain["launcher"] = {k: v for k, v in plain["launcher"].items() if k != "node_rank"}
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), default=str)


def plan_launch(cfg: RunConfig, run_dir: Path) -> list[LaunchPlan]:
    """Commands that train ``cfg`` in ``run_dir``: one per node (``nproc_per_node`` resolved)."""
    launcher = cfg.launcher
    procs = launcher.nproc_per_node
    assert procs is not None, "resolve nproc_per_node first"
    match launcher:
        case LocalLauncher():
            if isinstance(cfg.backend, SingleBackend):
                return [LaunchPlan(argv=runner_argv(run_dir))]
            argv = _torchrun(1, procs, ("--standalone",), run_dir)
            return [LaunchPlan(argv=argv, stop_file=str(run_dir / PREEMPT_REQUEST))]
        case MultinodeLauncher():
            endpoint = f"{launcher.master_addr}:{launcher.master_port}"
            c10d = ("--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", rendezvous_id(run_dir))
            plans = []
            for rank in range(launcher.nnodes):
                rendezvous = ("--node_rank", str(rank), *c10d)
                argv = _torchrun(launcher.nnodes, procs, rendezvous, run_dir)
                label = f"node {rank} of {launcher.nnodes}"
                env = {NODE_CONFIG_ENV: f"{rank}:{node_config(cfg)}"}  # (c10d numbers the nodes its own way)
                plans.append(LaunchPlan(argv=argv, env=env, label=label, stop_file=str(run_dir / PREEMPT_REQUEST)))
            return plans
        case SlurmLauncher():
            script = run_dir / SLURM_DIR / SLURM_SCRIPT
            single = isinstance(cfg.backend, SingleBackend)
            return [
                LaunchPlan(
                    argv=("sbatch", "--parsable", str(script)),
                    label="SLURM submission",
                    files={str(script): sbatch_script(launcher, procs, run_dir, torchrun=not single)},
                )
            ]
    raise AssertionError(launcher)


def sbatch_script(launcher: SlurmLauncher, procs: int, run_dir: Path, torchrun: bool = True) -> str:
    """The batch script: one torchrun per node via srun (``torchrun=False``, ``backend=single``:
    the runner itself, one process with no process group, as ``launcher=local`` runs it), requeue
    after a preemption warning."""
    logs = run_dir / SLURM_DIR
    directives = [
        f"--job-name={launcher.job_name}",
        f"--nodes={launcher.nnodes}",
        "--ntasks-per-node=1",
        f"--time={launcher.time}",
        f"--output={str(logs).replace('%', '%%')}/%j.out",  # (% starts SLURM's own patterns: %j, %u, ...)
        "--open-mode=append",
        f"--signal=B:USR1@{launcher.signal_seconds}",
    ]
    if launcher.gpus_per_node:
        directives.append(f"--gpus-per-node={launcher.gpus_per_node}")
    if launcher.cpus_per_task:
        directives.append(f"--cpus-per-task={launcher.cpus_per_task}")
    for key in ("mem", "partition", "account"):
        if getattr(launcher, key):
            directives.append(f"--{key}={getattr(launcher, key)}")
    directives.append("--requeue" if launcher.requeue else "--no-requeue")
    directives += launcher.extra_sbatch
    rendezvous = '--rdzv_id "sala-$SLURM_JOB_ID" --rdzv_endpoint "$head_node:$port"'
    elastic = shlex.join(
        [sys.executable, "-m", TORCHRUN_MODULE, "--nnodes", str(launcher.nnodes),
         "--nproc_per_node", str(procs), "--rdzv_backend", "c10d"]
    )  # fmt: skip
    runner = shlex.join(["-m", RUNNER_MODULE, str(run_dir)])
    # The rendezvous id and endpoint are the job's own, expanded by this shell at run time.
    command = f"{elastic} {rendezvous} {runner}" if torchrun else f"{shlex.quote(sys.executable)} {runner}"
    request = shlex.quote(str(run_dir / PREEMPT_REQUEST))
    marker = shlex.quote(str(run_dir / PREEMPTED_MARKER))
    user_error = shlex.quote(str(run_dir / USER_ERROR_MARKER))
    status = shlex.quote(str(run_dir / STATUS_FILE))
    # (srun no longer takes sbatch's --cpus-per-task since SLURM 22.05: torchrun and its ranks
    # would share one CPU)
    srun = "srun --kill-on-bad-exit=1" + (
        f" --cpus-per-task={launcher.cpus_per_task}" if launcher.cpus_per_task else ""
    )
    prepare = torchrun and launcher.nnodes * procs > 1
    lines = [
        "#!/bin/bash",
        "# Generated by sala-train; rerun with the same overrides to regenerate.",
        *(f"#SBATCH {shlex.quote(d)}" for d in directives),
        "set -uo pipefail",
        # The run's status.json says how the job ended (the submitting command returned long ago);
        # the same words (RunStatus) the launcher writes when it runs or waits for the ranks itself.
        f'finish() {{ printf \'{{"status": "%s", "exit_code": %d}}\\n\' "$1" "$2" > {status}.tmp && '
        f'mv {status}.tmp {status}; exit "$2"; }}',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "port=$((20000 + SLURM_JOB_ID % 20000))",
        # The newest checkpoint when this job (or its requeued run) started: a requeued job stopped
        # again before saving another makes no progress, and is not requeued once more.
        f"newest_checkpoint() {{ ls -d {shlex.quote(str(run_dir))}/checkpoint-* 2>/dev/null | "
        "sed -n 's|.*/checkpoint-\\([0-9]*\\)$|\\1|p' | sort -n | tail -n 1; }",
        "started_at=$(newest_checkpoint)",
        # A preemption/time-limit warning reaches this shell only (B:USR1): ask every rank, through
        # a file on the shared run directory, to checkpoint at the next step and exit, then requeue.
        # SIGTERM (scancel, or a preemption SLURM itself requeues or cancels) checkpoints too, but
        # does not requeue: a cancelled job must stay cancelled.
        "requeue_wanted=0",
        "trap " + shlex.quote(f'echo "sala-train: preemption warning"; requeue_wanted=1; touch {request}') + " USR1",
        "trap " + shlex.quote(f'echo "sala-train: stop signal"; touch {request}') + " TERM",
        f"rm -rf {request} {marker} {user_error}",
        # Every rank (a single process too) records a config or data problem under the marker,
        # which this script and a waiting launcher read.
        f"export {RECORD_PROBLEMS_ENV}=1",
        *(_data_step(srun, run_dir, request, user_error, launcher.requeue) if prepare else []),
        *_step(srun, command),
        # (the marker stays for a launcher that waits, which prints its messages; the next job clears it)
        f"if [ -e {user_error} ]; then finish {RunStatus.FAILED} {USER_ERROR_EXIT}; fi",
        f"if [ -f {marker} ]; then",
        f"  rm -f {request} {marker}",
        *_end_stopped("stopped as asked", launcher.requeue),
        "fi",
        f'if [ "$status" -eq 0 ]; then finish {RunStatus.COMPLETED} 0; else finish {RunStatus.FAILED} "$status"; fi',
    ]
    return "\n".join(lines) + "\n"


def _step(srun: str, command: str) -> list[str]:
    """Run ``command`` as a job step (one task per node) and wait for it, its exit in ``$status``."""
    return [
        f"{srun} {command} &",
        "srun_pid=$!",
        # wait returns early when a trapped signal arrives: keep waiting for srun itself.
        'while true; do wait "$srun_pid"; status=$?; kill -0 "$srun_pid" 2>/dev/null || break; done',
    ]


def _end_stopped(said: str, requeue: bool) -> list[str]:
    """End a job that stopped on request: requeued after SLURM's warning (when the job requeues),
    else preempted, to be submitted again."""
    requeued = [
        '  if [ "$requeue_wanted" -eq 1 ]; then',
        '    if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ "$(newest_checkpoint)" = "$started_at" ]; then',
        f'      echo "sala-train: {said} again with no checkpoint saved since job $SLURM_JOB_ID was requeued; not '
        "requeued again, as it would make no progress: give it more time (launcher.time) or more warning "
        '(launcher.signal_seconds), then submit again"',
        f"      finish {RunStatus.PREEMPTED} {PREEMPTED_EXIT}",
        "    fi",
        f'    echo "sala-train: {said}; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        f"    finish {RunStatus.SUBMITTED} 0",
        "  fi",
    ]
    # A stop signal from SLURM requeueing the job itself (scontrol requeue, a node failure, a
    # preemption that requeues): it counts the restart before the signal, and starts the job again.
    # (Said "submit again to resume" before: a second job then trained beside the requeued one.)
    restarts = 'scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | sed -n "s/.* Restarts=\\([0-9]*\\).*/\\1/p"'
    by_slurm = [
        f'  if [ "$({restarts})" -gt "${{SLURM_RESTART_COUNT:-0}}" ] 2>/dev/null; then',
        f'    echo "sala-train: {said}; SLURM requeued job $SLURM_JOB_ID, which resumes by itself"',
        f"    finish {RunStatus.SUBMITTED} 0",
        "  fi",
    ]
    return [
        *(requeued if requeue else []),
        *by_slurm,
        f'  echo "sala-train: {said}; submit again to resume"',
        f"  finish {RunStatus.PREEMPTED} {PREEMPTED_EXIT}",
    ]


def _data_step(srun: str, run_dir: Path, request: str, user_error: str, requeue: bool) -> list[str]:
    """Before torchrun, each node checks and tokenizes the data once into its ``datasets`` cache,
    as the launcher does on one machine: the ranks then read it instead of each tokenizing the same
    data at once, and a data problem ends the job (exit 2) before any rank loads a model. A stop
    asked for meanwhile (the step leaves at once, exit 75) ends it there too: nothing to save."""
    command = shlex.join([sys.executable, "-m", RUNNER_MODULE, "--data-only", str(run_dir)])
    return [
        *_step(srun, command),
        f"if [ -e {user_error} ]; then finish {RunStatus.FAILED} {USER_ERROR_EXIT}; fi",
        f"if [ -e {request} ]; then",
        f"  rm -f {request}",
        *_end_stopped("stopped before training", requeue),
        "fi",
        f'if [ "$status" -ne 0 ]; then finish {RunStatus.FAILED} "$status"; fi',
    ]


def count_local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def resolve_processes(cfg: RunConfig, job_num: int) -> RunConfig:
    """Fill in ``nproc_per_node`` and give each multirun job its own rendezvous port."""
    launcher = cfg.launcher
    if launcher.nproc_per_node is None and isinstance(cfg.backend, SingleBackend):
        # One process whatever GPUs the node has (SLURM's gpus_per_node made it one per GPU: the
        # job's runner then waited for a world of several, alone).
        launcher = replace(launcher, nproc_per_node=1)
    elif launcher.nproc_per_node is None:
        gpus = 0 if isinstance(launcher, SlurmLauncher) else count_local_gpus()
        launcher = replace(launcher, nproc_per_node=nproc_per_node(launcher, gpus))
    if isinstance(launcher, MultinodeLauncher) and job_num:
        launcher = replace(launcher, master_port=launcher.master_port + job_num)
    return replace(cfg, launcher=launcher)
