"""torchrun itself (``torch.distributed.run``, its parser and its elastic agent), with two changes.

- A failed worker is reported in one line and its own exit code (the agent's own log lines that
  repeat it are dropped); so is the agent being stopped by a signal. torchrun's ``main`` lets
  ``ChildFailedError`` escape, so every failed launch ended in a Python traceback of torchrun's
  internals and a table of every rank (the ones torchrun itself stopped included), after the failed
  rank had already printed its own message; and it exits 1 whatever the rank said.
- Its log folder is removed when it ends: without ``--log-dir`` torchrun makes a ``torchelastic_*``
  folder in the temporary directory for every launch (the workers' error files) and leaves it there,
  so a shared machine's ``/tmp`` fills with one per run.
- Each worker gets this node's CPUs shared out (``OMP_NUM_THREADS``) unless the user set it.
  torchrun sets 1 whenever it starts more than one worker, which starves CPU work in the ranks:
  DeepSpeed's CPU Adam under ``zero3_offload`` runs on OpenMP threads. (The guide's ``deepspeed``
  launcher leaves the variable alone; accelerate shares the cores out on CPU, as here.)

Usage is torchrun's: ``python -m sala_train.launch.torchrun [torchrun options] ...``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import determine_local_world_size, parse_args, run

from sala_train.cpus import usable_cpus
from sala_train.launch.plan import PREEMPTED_EXIT, STOP_FILE_ENV, how_it_ended, shell_exit_code


def describe(failed: ChildFailedError) -> tuple[list[str], int]:
    """One line per failed worker, torchrun's first observed failure first, and the code to exit
    with (that failure's). Every one is named: failures seen in the same poll share a timestamp
    in whole seconds, so the first may be a rank that only lost its peer."""
    first, _ = failed.get_first_failure()
    if all(f.exitcode == PREEMPTED_EXIT for f in failed.failures.values()):
        return [], PREEMPTED_EXIT  # every rank stopped at a checkpoint, as asked (rank 0 said so): no failure
    lines = []
    for rank in sorted(failed.failures, key=lambda r: r != first):
        failure = failed.failures[rank]
        where = f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid})"
        tail = "; its output is above" if rank == first else ""
        lines.append(f"sala-train: {where} {how_it_ended(failure.exitcode)}{tail}")
    return lines, shell_exit_code(failed.failures[first].exitcode)


def threads_per_worker(cpus: int, workers: int) -> int:
    return max(1, cpus // max(workers, 1))


def share_cpus(nproc_per_node: str) -> None:
    """Set ``OMP_NUM_THREADS`` for the workers to this node's usable cores divided among them,
    unless it is set already; say so when there are fewer cores than workers (a SLURM job that
    asked for no CPUs gets one per task by default, which all of a node's ranks then share)."""
    workers = determine_local_world_size(nproc_per_node)
    cpus = usable_cpus()
    if cpus < workers:
        print(f"sala-train: WARNING: {workers} workers share {cpus} usable CPU core(s) on this node, which will "
              "slow them; under SLURM set launcher.cpus_per_task", file=sys.stderr, flush=True)  # fmt: skip
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_worker(cpus, workers))


# The elastic agent's own lines for what ``describe`` says once per worker: the failure of the first
# worker, and the SIGTERM it then sends each other worker (which describe names as killed by it).
_SAID_BY_DESCRIBE = (
    "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s",
    "Sending process %s closing signal %s",
)


def _drop_agent_lines_describe_repeats() -> None:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: record.msg not in _SAID_BY_DESCRIBE
    )


def _stop_the_ranks_if_the_launcher_dies(stop_file: str) -> None:
    """The launcher that started this torchrun may be killed (even by SIGKILL): then the ranks are
    asked, through the stop file they check at every step, to checkpoint and exit, rather than
    train on unattended or be stopped without a checkpoint."""
    import threading
    import time

    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(0.5)
        Path(stop_file).touch()

    threading.Thread(target=watch, name="sala-train-launcher-watch", daemon=True).start()


def _has_workers() -> bool:
    """Whether this agent has started its worker processes (any child process at all). Where the
    kernel does not list children (no /proc/PID/task/TID/children), it may have: said yes."""
    tasks = Path("/proc/self/task")
    if not (tasks / str(os.getpid()) / "children").exists():
        return True
    for task in tasks.iterdir():
        try:
            if (task / "children").read_text().split():
                return True
        except FileNotFoundError:  # (a thread that has just ended)
            continue
    return False


def _stop_while_the_nodes_meet(stop_file: str) -> None:
    """A stop asked for (the launcher's first Ctrl-C or SIGTERM, through the stop file) while this
    node waits for the others at the rendezvous: no rank exists yet to read the request, and the
    wait lasts until the rendezvous times out (10 minutes by default), a second signal then ending it
    as a failure. Nothing has begun, so the node leaves at once as a stopped run (exit 75); once its
    workers exist, they read the request themselves."""
    import threading
    import time

    def watch() -> None:
        while not Path(stop_file).exists():
            time.sleep(0.25)
        time.sleep(0.25)  # (workers being started now are seen next)
        if not _has_workers():
            print("sala-train: stopped as asked while this node waited for the other nodes: nothing trained, no "
                  "checkpoint saved; the same command again starts it", file=sys.stderr, flush=True)  # fmt: skip
            os._exit(PREEMPTED_EXIT)

    threading.Thread(target=watch, name="sala-train-rendezvous-stop", daemon=True).start()


def _pass_submitits_warning_to_the_ranks(stop_file: str | None) -> None:
    """SIGUSR2, submitit's warning before a sweep job's time limit, reaches every process of the
    SLURM job: its default action killed this agent, whose workers then checkpointed for no one.
    The agent stays; the ranks stop at a checkpoint, asked by the signal or by the stop file."""
    import signal

    def ask(signum: int, frame: object) -> None:
        if stop_file:
            Path(stop_file).touch()

    signal.signal(signal.SIGUSR2, ask)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)  # type: ignore[no-untyped-call]
    _pass_submitits_warning_to_the_ranks(os.environ.get(STOP_FILE_ENV))
    if os.environ.get(STOP_FILE_ENV):
        _stop_the_ranks_if_the_launcher_dies(os.environ[STOP_FILE_ENV])
        if str(args.nnodes) != "1":  # (a single node's standalone rendezvous is immediate)
            _stop_while_the_nodes_meet(os.environ[STOP_FILE_ENV])
    if str(args.nnodes) != "1":  # (a node whose peers never come, or stopped on bad input, waits in silence)
        print(f"sala-train: node {args.node_rank} meets the other nodes of {args.nnodes} at {args.rdzv_endpoint} "
              "(torchrun waits up to 10 minutes for them)", file=sys.stderr, flush=True)  # fmt: skip
    share_cpus(args.nproc_per_node)
    _drop_agent_lines_describe_repeats()
    try:
        with tempfile.TemporaryDirectory(prefix="torchelastic_", ignore_cleanup_errors=True) as log_dir:
            args.log_dir = args.log_dir or log_dir
            run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as failed:
        lines, code = describe(failed)
        if lines:
            print("\n".join(lines), file=sys.stderr, flush=True)
        return code or 1
    except SignalException as exc:  # scancel, srun ending the other nodes, a second stop request
        print(f"sala-train: torchrun stopped its workers on {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + exc.sigval.value
    except RendezvousError as exc:  # e.g. the other nodes never came: say so, not torchrun's stack
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        line = (
            f"sala-train: the {args.nnodes} nodes did not meet at {args.rdzv_endpoint} ({detail}); every node "
            "must run the same command, with its own node_rank, and reach that address"
        )
        print(line, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    from sala_train.process_exit import exit_without_teardown

    exit_without_teardown(main())  # (its workers have ended; torch's module teardown is only time)
