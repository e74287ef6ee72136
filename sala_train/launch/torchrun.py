"""torchrun itself (``torch.distributed.run``, its parser and its elastic agent), with two changes.

- A failed worker is reported in one line and its own exit code. torchrun's ``main`` lets
  ``ChildFailedError`` escape, so every failed launch ended in a Python traceback of torchrun's
  internals and a table of every rank (the ones torchrun itself stopped included), after the failed
  rank had already printed its own message; and it exits 1 whatever the rank said.
- Each worker gets this node's CPUs shared out (``OMP_NUM_THREADS``) unless the user set it.
  torchrun sets 1 whenever it starts more than one worker, which starves CPU work in the ranks:
  DeepSpeed's CPU Adam under ``zero3_offload`` runs on OpenMP threads. (The guide's ``deepspeed``
  launcher leaves the variable alone; accelerate shares the cores out on CPU, as here.)

Usage is torchrun's: ``python -m sala_train.launch.torchrun [torchrun options] ...``.
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import determine_local_world_size, parse_args, run


def exit_code(code: int) -> int:
    """A worker's code as a shell would report it: killed by signal N (reported -N) is 128+N."""
    return 128 - code if code < 0 else code


def describe(failed: ChildFailedError) -> tuple[str, int]:
    """The line for the first worker that failed, and the code to exit with."""
    rank, failure = failed.get_first_failure()
    where = f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid})"
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        how = f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        how = f"exited with code {failure.exitcode}"
    return f"sala-train: {where} {how}; its output is above", exit_code(failure.exitcode)


def threads_per_worker(cpus: int, workers: int) -> int:
    return max(1, cpus // max(workers, 1))


def share_cpus(nproc_per_node: str) -> None:
    """Set ``OMP_NUM_THREADS`` for the workers to this node's usable CPUs (under SLURM, the job's
    allocation) divided among them, unless it is set already."""
    if "OMP_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = determine_local_world_size(nproc_per_node)
        os.environ["OMP_NUM_THREADS"] = str(threads_per_worker(cpus, workers))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)  # type: ignore[no-untyped-call]
    share_cpus(args.nproc_per_node)
    try:
        run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as failed:
        line, code = describe(failed)
        print(line, file=sys.stderr, flush=True)
        return code or 1
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
    sys.exit(main())
