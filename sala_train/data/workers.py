"""Converting and tokenizing records in several processes (``dataset.preprocessing_num_workers``,
LLaMA-Factory's key), through ``datasets``' own ``num_proc``: each process maps a contiguous shard
into its own cache file and the shards are read back in order, so the result is the one process's,
row for row.

What ``datasets`` leaves to its caller, written here: a worker takes no stop signal meant for the
command (a Ctrl-C reaches every process of the terminal's group: each worker printed a
KeyboardInterrupt traceback, and the command's own stop handling runs in the main process only)
and dies with it (a command stopped at once left its workers tokenizing on, and the pool's
manager process holding the command's output open, so whatever read it waited on); a Ctrl-C in
the main process is a KeyboardInterrupt again (datasets' clean-up replaced it with a TimeoutError).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from sala_train.cpus import usable_cpus
from sala_train.errors import DataError

# Fewer records a worker than this: one process is as fast (starting a worker, giving it the
# tokenizer and writing its shard cost about what a few hundred records take to tokenize).
MIN_RECORDS_PER_WORKER = 2_000
# Left to choose (null), at most this many: the guide's own preprocessing_num_workers; more adds
# cache files and little speed.
AUTO_WORKERS_AT_MOST = 16
# What the command handles itself (Ctrl-C, a hang-up, and sala_train.launch.plan.RUNNER_STOP_SIGNALS
# but SIGTERM: SLURM sends SIGUSR2 to every process of a submitit job). SIGTERM is how datasets'
# pool ends its workers, on an error or an interrupt: it ends a worker (``_end_worker``), whatever
# handler the command set (the runner's, copied into the worker, only said "stopping as asked" and
# the pool waited on it for good).
_LEFT_TO_THE_COMMAND = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def workers_for(wanted: int | None, records: int) -> int:
    """Processes to tokenize ``records`` records with: ``wanted`` as given (at most one a record),
    or, when null, one per usable core (``usable_cpus``: a SLURM job's or a taskset's share, capped by a
    container's quota, in physical cores) up to ``AUTO_WORKERS_AT_MOST`` while each gets
    ``MIN_RECORDS_PER_WORKER`` records."""
    if wanted is None:
        wanted = min(usable_cpus(), AUTO_WORKERS_AT_MOST, records // MIN_RECORDS_PER_WORKER)
    return max(1, min(wanted, records))


# The process whose map forks workers now: a process forked from it meanwhile (a worker, the
# pool's manager) is set up as it starts, by the hooks below; and whether the thread forking is
# the main one (Linux ends a child with the *thread* that forked it: the pool's own thread, which
# replaces a dead worker, ends at the pool's clean-up, and a replacement killed then, holding the
# pool's task-queue lock, hung the clean-up).
_mapping_in: list[int] = []
_forked_by_main_thread: list[bool] = [False]


def _before_fork() -> None:
    import threading

    _forked_by_main_thread[0] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if _mapping_in and _mapping_in[-1] == os.getppid():
        _mapping_in.clear()
        _leave_signals_to_the_command(end_with_parent=_forked_by_main_thread[0])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class _InWorker:
    """``fn``, which in a worker process first leaves the command's stop signals to the command:
    for workers started by spawn or forkserver (Python 3.14's default), which no fork hook of this
    process sees (their parent, a fork server or the pool's thread, is not this process's main
    thread, so they are not tied to it)."""

    def __init__(self, fn: Callable[..., Any], parent: int):
        self.fn = fn
        self.set_up_in = parent  # (a process id: this object is copied into each worker)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.set_up_in != os.getpid():
            self.set_up_in = os.getpid()
            _leave_signals_to_the_command(end_with_parent=False)
        _note_partial_cache_file()
        return self.fn(*args, **kwargs)


def _leave_signals_to_the_command(end_with_parent: bool) -> None:
    for sig in _LEFT_TO_THE_COMMAND:
        signal.signal(sig, signal.SIG_IGN)
    _end_on_sigterm()
    if end_with_parent and sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # (the parent ended before the request: nobody will read this worker's shard)
            os._exit(1)


# The process whose SIGTERM a thread of its own also waits for (a worker set up once, by whichever
# of the fork hook and ``_InWorker`` comes first).
_sigterm_waited_in: list[int] = []


def _end_on_sigterm() -> None:
    """SIGTERM (the pool ending its workers) ends this worker through ``_end_worker``: its Python
    handler, and a thread of the worker's own that Python's C-level handler wakes (through the
    wakeup file descriptor, in whichever thread the signal lands). The handler alone runs only
    between the main thread's bytecodes, and the pool sends SIGTERM while it holds the task queue's
    lock, on which a worker asking for its next task waits in C (``sem_wait``): a signal that arrived
    just before that wait began was never handled, and the pool waited for the worker for good (a
    CI run hung so). (Holding the signal blocked for a waiting thread closed that too, but the mask
    passed to every program a worker started, which then ignored SIGTERM.)"""
    signal.signal(signal.SIGTERM, _end_worker)
    if _sigterm_waited_in == [os.getpid()]:
        return
    _sigterm_waited_in[:] = [os.getpid()]
    import threading

    read, write = os.pipe()  # (neither is inherited by a program the worker starts)
    os.set_blocking(write, False)
    try:
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # (not the worker's main thread: the handler alone)
        os.close(read)
        os.close(write)
        return
    threading.Thread(target=_wait_for_sigterm, args=(read,), name="sala-worker-sigterm", daemon=True).start()


def _wait_for_sigterm(read: int) -> None:
    while True:
        if signal.SIGTERM in os.read(read, 64):  # (one byte per signal caught: its number)
            _end_worker(signal.SIGTERM, None)


# The partial Arrow file this worker writes (datasets creates it as the first record is mapped):
# noted while it is open, since the worker may have closed it by the time the pool ends it (the
# parent's interrupt shuts datasets' queue manager down first; a worker's next put fails, and
# datasets closes the writer, leaving the file, while the worker waits on for the pool's SIGTERM).
_partial_file: list[str] = []


def _note_partial_cache_file() -> None:
    if _partial_file and os.path.exists(_partial_file[0]):
        return  # (noted already: one stat a record)
    _partial_file[:] = _partial_cache_files()[:1]


def _end_worker(signum: int, frame: Any) -> None:
    """The pool ends this worker: the partial Arrow file it was writing goes too (datasets removes
    it only when the mapped function raises, and nothing else ever did: each Ctrl-C left up to a
    split's size in the cache), and the worker leaves without a traceback. (A file mapped to the
    end is renamed to its ``cache-*.arrow``: its partial name is gone, and so nothing is removed.)"""
    for path in {*_partial_cache_files(), *_partial_file}:
        with contextlib.suppress(OSError):
            os.unlink(path)
    os._exit(128 + signum)


def _partial_cache_files() -> list[str]:
    """This process's open files named ``tmp*`` in the datasets cache (the file a map writes, named
    by ``tempfile``, before it becomes its ``cache-*.arrow``); none where /proc cannot say."""
    datasets = sys.modules.get("datasets")
    if datasets is None or not os.path.isdir("/proc/self/fd"):
        return []
    cache = os.path.realpath(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)))
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.basename(target).startswith("tmp") and target.startswith(cache + os.sep):
            found.append(target)
    return found


def map_records(ds: Any, fn: Callable[..., Any], workers: int, **map_kwargs: Any) -> Any:
    """``ds.map(fn, **map_kwargs)`` in ``workers`` processes (1: this one). A worker's error is
    raised here as the worker raised it, once every worker has ended (datasets waits for them),
    which is never later than the one process would have reached it past the first shard."""
    if workers <= 1:
        return ds.map(fn, **map_kwargs)
    _mapping_in.append(os.getpid())
    try:
        return ds.map(_InWorker(fn, os.getpid()), num_proc=workers, **map_kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if _interrupted(exc):
            raise KeyboardInterrupt from None
        if isinstance(exc, RuntimeError) and "subprocesses has abruptly died" in str(exc):
            raise DataError(
                f"a process tokenizing the data ended abruptly (out of memory, or killed) while {workers} ran at "
                "once; set dataset.preprocessing_num_workers lower (1: tokenize in this process)"
            ) from None
        raise
    finally:
        _mapping_in.clear()


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a KeyboardInterrupt unwound (datasets' pool asks its
    workers for their results in a ``finally``, and their TimeoutError replaced the interrupt)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False
