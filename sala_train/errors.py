"""User-fixable errors. Entry points turn them into one message and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sala_train.config.typed import ConfigError

USER_ERROR_EXIT = 2


class DataError(Exception):
    """A problem with a data file or record that the user can fix (names file and line)."""


class ModelLoadError(Exception):
    """The configured model or tokenizer cannot be loaded as asked."""


class DistributedSetupError(Exception):
    """The processes or backend we got are not what the config asked for."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError, DistributedSetupError)


def resolved(path: Path, what: str) -> Path:
    """``path`` made absolute with its links followed, or ConfigError naming ``what`` (a command's
    argument) when a link in it loops (``Path.resolve`` raises RuntimeError: a traceback)."""
    try:
        return path.resolve()
    except RuntimeError as exc:
        raise ConfigError([f"{what} {path}: a symbolic link in it loops back to itself"]) from exc


def render(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return exc.render()
    return f"sala-train: {exc}"


# The last user error this process reported (``report``): a refused sweep job records it.
_reported: list[str] = []


def report(exc: BaseException, prog: str = "sala-train") -> int:
    """A user error as one message on stderr (one write, so ranks' messages never mix); exit code 2."""
    from sala_train.console import say

    text = render(exc).replace("sala-train:", f"{prog}:", 1)
    _reported[:] = [text]
    say(text, sys.stderr)
    return USER_ERROR_EXIT


def last_reported() -> str:
    """The message of the last user error ``report`` said in this process ("" when none)."""
    return _reported[-1] if _reported else ""


def forget_reported() -> None:
    """Start afresh (a sweep's next job): ``last_reported`` says "" until a new one is said."""
    _reported.clear()


@contextmanager
def exit_on_user_error(prog: str = "sala-train", cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn user errors into one message on stderr and exit code 2, with no traceback
    (``cleanup`` runs first: what the command wrote before the problem was found)."""
    try:
        yield
    except USER_ERRORS as exc:
        report(exc, prog)
        if cleanup is not None:
            cleanup()
        sys.exit(USER_ERROR_EXIT)


def os_error_in_chain(exc: BaseException, errnos: set[int]) -> OSError | None:
    """The OSError with one of ``errnos`` in ``exc``'s cause/context chain (libraries wrap it: a
    full or read-only disk reaches us inside their own errors), if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in errnos:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


INTERRUPTED_EXIT = 128 + 2  # as a shell reports a command Ctrl-C (SIGINT) ended


@contextmanager
def exit_quietly_on_interrupt(prog: str) -> Iterator[None]:
    """Ctrl-C in ``sala-data``, ``sala-export``, or ``sala-train`` before its training process
    starts: one line and the shell's 130, not a KeyboardInterrupt traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)


def first_line(exc: BaseException) -> str:
    """The line that says what is wrong (Hydra sometimes ends the first with a colon)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


# What transformers raises for a model it cannot load from what it was given: files missing or
# unreadable (OSError, ValueError), remote code needing a package not here (ImportError), a
# config.json whose values its config class refuses. (A config.json that is not an object is
# refused with the config: its TypeError here could as well be a bug.)
def unloadable() -> tuple[type[BaseException], ...]:
    """(A function: huggingface_hub's errors import httpx, 0.13 s the launcher need not spend.)"""
    from huggingface_hub.errors import StrictDataclassError

    return OSError, ValueError, ImportError, StrictDataclassError
