"""The console scripts' entry points: each imports its command inside a Ctrl-C guard.

Importing a command (Hydra, transformers' configuration, the config schema) takes about a second;
a Ctrl-C in it was a KeyboardInterrupt traceback and death by SIGINT, since the command's own guard
(``errors.exit_quietly_on_interrupt``) is not in place until the import is done. This module
imports nothing heavy, so the window left is the interpreter's own start.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

INTERRUPTED_EXIT = 130  # (as errors.INTERRUPTED_EXIT: that module is one of the imports guarded here)


def _guarded(prog: str, load: Callable[[], Callable[[], None]]) -> None:
    try:
        main = load()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)
    main()


def train() -> None:
    def load() -> Callable[[], None]:
        from sala_train.cli import train_main

        return train_main

    _guarded("sala-train", load)


def data() -> None:
    def load() -> Callable[[], None]:
        from sala_train.cli import data_main

        return data_main

    _guarded("sala-data", load)


def report() -> None:
    def load() -> Callable[[], None]:
        from sala_train.report import main

        return main

    _guarded("sala-report", load)


def export() -> None:
    def load() -> Callable[[], None]:
        from sala_train.export import main

        return main

    _guarded("sala-export", load)
