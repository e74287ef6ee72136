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
    multiprocessing, ``weakref.finalize``'s temporary directories), then the streams are flushed.
    """
    status = exit_code(code)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=status)  # it takes the code from sys.exit, which this bypasses
    if threading.current_thread() is threading.main_thread():
        threading._shutdown()  # type: ignore[attr-defined]  # (what Py_FinalizeEx calls first)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(status)
