"""Run a launch plan on this machine and return its exit status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from sala_train.atomic import write_text_atomic
from sala_train.console import leave_the_terminal
from sala_train.launch.plan import STOP_FILE_ENV, LaunchPlan

# Stop requests the runner turns into "checkpoint at the next step, then exit" (a second: exit now).
# SIGHUP: the terminal or SSH session the launcher ran in is gone (unless ignored, as under nohup).
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def _forwarded_here() -> tuple[signal.Signals, ...]:
    """``FORWARDED`` less a signal this process was started ignoring (``nohup`` ignores SIGHUP: the
    run must go on after the terminal closes, as the user asked)."""
    return tuple(sig for sig in FORWARDED if signal.getsignal(sig) is not signal.SIG_IGN)


def write_files(plan: LaunchPlan) -> None:
    for name, text in plan.files.items():
        write_text_atomic(Path(name), text)


def _stop_with_parent() -> None:
    """In the child: if the launcher dies (even by SIGKILL), the runner gets SIGTERM, checkpoints, exits.

    Stop signals are held (blocked: the mask survives exec) until the runner has its handler for
    them (``sala_train.runner.main`` unblocks them): one forwarded while the interpreter starts
    killed it, and the run was recorded as failed instead of stopping at its first step.
    """
    import contextlib
    import ctypes

    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    with contextlib.suppress(OSError):  # not Linux: the runner outlives a killed launcher
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1

# Whether this process was asked to stop (while ``run_local`` waited on a child, or, in a sweep
# that runs its jobs here, at any time since ``keep_stop_requests``): the sweep then ends instead
# of starting its next job (the request was for the whole command).
_stop_requested = False


def stop_requested() -> bool:
    return _stop_requested


def runs_jobs_here(launcher: Any) -> bool:
    """Whether Hydra's launcher (its config) runs a sweep's jobs in this process, one after another."""
    return str(launcher.get("_target_", "")).endswith(".BasicLauncher")


def keep_stop_requests() -> None:
    """From now on a stop signal to this process (a sweep that runs its jobs here) is recorded,
    not fatal, also between jobs: the sweep then ends before its next job starts."""

    def note(signum: int, frame: FrameType | None) -> None:
        global _stop_requested
        _stop_requested = True
        if signum == signal.SIGHUP:  # (the sweep's end is said after it: not to the gone terminal)
            leave_the_terminal()

    if threading.current_thread() is threading.main_thread():
        for sig in _forwarded_here():
            signal.signal(sig, note)


# submitit's requeue, held back until the job's training has stopped at a checkpoint.
_held_requeue: list[Callable[[], None]] = []


@contextmanager
def submitits_requeue_held(request_file: Path) -> Iterator[None]:
    """In a sweep job of ``hydra/launcher=submitit_slurm``, submitit's SIGUSR2 handler (its warning
    before the time limit) requeues the SLURM job at once, which ends the job's processes: the
    training was killed before its checkpoint was written. While the training runs, the warning
    asks it to checkpoint instead (through ``request_file``, which every runner looks for, besides
    the signal it gets from SLURM itself); ``requeue_if_held`` then lets submitit requeue."""
    held = signal.getsignal(signal.SIGUSR2)
    if not callable(held) or threading.current_thread() is not threading.main_thread():
        yield  # (no submitit here: SIGUSR2 keeps its default)
        return
    warned = False

    def ask(signum: int, frame: FrameType | None) -> None:
        nonlocal warned
        warned = True
        request_file.touch()

    signal.signal(signal.SIGUSR2, ask)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR2, held)
        if warned:
            _held_requeue.append(lambda: held(signal.SIGUSR2, None))


def drop_held_requeue() -> None:
    """The training ended otherwise than stopped at a checkpoint (finished, failed): a requeue
    would only run it again."""
    _held_requeue.clear()


def requeue_if_held() -> None:
    """Run submitit's handler held back by ``submitits_requeue_held``, now that the run has saved
    its checkpoint and its status: it requeues the job and exits. When it will not (the job timed
    out more than ``hydra.launcher.max_num_timeout`` times) it raises, which ended the whole sweep
    in a traceback; the job ends as the run did instead (preempted: the sweep's summary says so, and
    the same command again resumes it)."""
    while _held_requeue:
        try:
            _held_requeue.pop()()
        except Exception as exc:  # (submitit's UncompletedJobError)
            print(f"sala-train: submitit did not requeue this SLURM job ({exc})", file=sys.stderr, flush=True)


def run_local(plan: LaunchPlan) -> int:
    """Run the command in a child process (memory is freed between sweep jobs) and wait for it.

    The child has its own process group, so a signal to ours (Ctrl-C, ``kill -TERM -PGID``,
    a scheduler stopping the job) reaches it exactly once: forwarded from here as SIGTERM
    (whichever it was); to torchrun, the first one is the plan's stop file instead (every rank checkpoints
    and stops) and a second one SIGTERM. The launcher itself keeps waiting and returns the
    child's status.
    """
    write_files(plan)
    env = {**os.environ, **plan.env}
    if plan.stop_file is not None:
        # torchrun would stop its workers on the parent-death SIGTERM without a checkpoint: it
        # watches for this launcher to go and then asks the ranks through the stop file instead.
        env[STOP_FILE_ENV] = plan.stop_file
    death_signal = None if plan.stop_file is not None else _stop_with_parent
    if threading.current_thread() is not threading.main_thread():
        return subprocess.Popen(list(plan.argv), env=env, start_new_session=True, preexec_fn=death_signal).wait()

    stops = 0
    child: subprocess.Popen[bytes] | None = None
    early: list[int] = []  # requests that came while the child was being started

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stops
        global _stop_requested
        _stop_requested = True
        if signum == signal.SIGHUP:
            # (the child checkpoints and says so, and this process records the outcome, after the
            # terminal is gone: their writes to it failed, EIO, and the run with them)
            leave_the_terminal()
        if child is None:
            early.append(signum)
            return
        if child.poll() is not None:
            return
        stops += 1
        if plan.stop_file is not None and stops == 1:
            Path(plan.stop_file).touch()
        else:  # as SIGTERM, whichever it was: a second one's exit is then 143 (128 + SIGTERM), as documented
            child.send_signal(signal.SIGTERM)

    # Taken over before the child starts: a Ctrl-C that came while it was being forked was a
    # KeyboardInterrupt that Python's fork hooks swallowed, and the run trained on to its end.
    previous = {sig: signal.signal(sig, forward) for sig in _forwarded_here()}
    try:
        child = subprocess.Popen(list(plan.argv), env=env, start_new_session=True, preexec_fn=death_signal)
        for signum in early:
            forward(signum, None)
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
