"""The console scripts' entry points: each imports its command inside a Ctrl-C guard.

Importing a command (Hydra, transformers' configuration, the config schema) takes about a second;
a Ctrl-C in it was a KeyboardInterrupt traceback and death by SIGINT, since the command's own guard
(``errors.exit_quietly_on_interrupt``) is not in place until the import is done. This module
imports nothing heavy, so the window left is the interpreter's own start.

A command ends without the interpreter's module teardown (``sala_train.process_exit``): after
torch and transformers that teardown took up to 2 s, with nothing left to do.
"""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Callable

from sala_train.process_exit import exit_without_teardown

INTERRUPTED_EXIT = 130  # (as errors.INTERRUPTED_EXIT: that module is one of the imports guarded here)


def _writable_whatever_it_prints() -> None:
    """stdout in an ASCII locale (``PYTHONUTF8=0 LC_ALL=C``, some containers) raised
    UnicodeEncodeError mid-output for a Chinese sample or a model name: what it cannot encode is
    written escaped instead, as Python already does for stderr. (A UTF encoding writes everything.)"""
    stdout = sys.stdout
    if isinstance(stdout, io.TextIOWrapper) and not stdout.encoding.lower().replace("-", "").startswith("utf"):
        stdout.reconfigure(errors="backslashreplace")


def _guarded(prog: str, load: Callable[[], Callable[[], None]]) -> None:
    _writable_whatever_it_prints()
    try:
        main = load()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)
    try:
        main()
    except SystemExit as stop:  # (an exception other than this one ends with its traceback, as before)
        exit_without_teardown(stop.code)
    exit_without_teardown(0)


def _command(prog: str, module: str, name: str) -> Callable[[], None]:
    """The console script that runs ``module.name``, imported under the guard."""

    def run() -> None:
        _guarded(prog, lambda: getattr(importlib.import_module(module), name))

    return run


train = _command("sala-train", "sala_train.cli", "train_main")
data = _command("sala-data", "sala_train.cli", "data_main")
report = _command("sala-report", "sala_train.report", "main")
export = _command("sala-export", "sala_train.export", "main")
