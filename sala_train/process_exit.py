"""Ending a command's process without the interpreter's module teardown.

Once a command has done its work, Python tears down every module it imported. With torch,
transformers, datasets and peft loaded, that took 1.5 to 2.2 s a process on a 2-core machine: a
one-step run ended 2.2 s after it said it had saved ``final/``, and a two-process run paid it in
its launcher, torchrun and each rank. On a rank that held a gloo group it was worse than slow (see
``exit_without_teardown``). What a normal exit does that matters is kept, in the interpreter's
order; only the teardown is skipped. This module imports nothing heavy: ``sala_train.entry`` uses it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import NoReturn


def exit_code(code: object) -> int:
    """The status ``sys.exit(code)`` would end with (a message is printed, and is status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_without_teardown(code: object = 0) -> NoReturn:
    """End this process as ``sys.exit(code)`` would, less the module teardown.

    Besides the time, a rank that held a process group needs this: ``destroy_process_group`` shuts
    the groups down, but the gloo groups DeepSpeed and ZeRO keep references to live on until the
    interpreter tears its modules down. Their C++ worker threads then free tensors whose Python
    objects need the GIL, which a finalizing interpreter no longer gives: ``terminate called
    without an active exception``, SIGABRT, after a run that had finished and saved everything, and
    torchrun reports the job failed (seen once in CI on ZeRO-3 x2; torch has no fix,
    pytorch/pytorch#179291).

    Kept, as Python's own exit does them and while everything is alive: the non-daemon threads are
    joined (with ``concurrent.futures``' hooks), then the atexit handlers run (logging, W&B,
    multiprocessing, ``weakref.finalize``'s temporary directories), then the streams are flushed,
    and output they could not write changes a success into a failure (``_flushed``).
    """
    status = exit_code(code)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=status)  # it takes the code from sys.exit, which this bypasses
    if threading.current_thread() is threading.main_thread():
        threading._shutdown()  # type: ignore[attr-defined]  # (what Py_FinalizeEx calls first)
    atexit._run_exitfuncs()
    os._exit(_flushed(status))


SIGPIPE_EXIT = 128 + signal.SIGPIPE  # as a shell reports `cat` ended by its reader leaving
FLUSH_FAILED_EXIT = 120  # what Python exits with when it cannot flush its standard streams


def _flushed(status: int) -> int:
    """Flush stdout and stderr; the status to exit with. Output still buffered that cannot be
    written must not end in a success: a reader that left (``| head``) is 141, quietly, as for
    ``cat``; any other failure (a full disk under ``> file``) is said, and 120, as Python does."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            status = status or SIGPIPE_EXIT
        except ValueError:  # (closed by the command: nothing left in it)
            pass
        except OSError as exc:
            status = status or FLUSH_FAILED_EXIT
            with contextlib.suppress(OSError):  # (stderr itself may be what failed)
                os.write(2, f"{os.path.basename(sys.argv[0])}: output lost: {exc}\n".encode())
    return status
