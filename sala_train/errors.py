"""User-fixable errors. Entry points turn them into one message and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sala_train.config.typed import ConfigError

USER_ERROR_EXIT = 2


class DataError(Exception):
    """A problem with a data file or record that the user can fix (names file and line)."""


class ModelLoadError(Exception):
    """The configured model or tokenizer cannot be loaded as asked."""


class DistributedSetupError(Exception):
    """The processes or backend we got are not what the config asked for."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError, DistributedSetupError)


def render(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return exc.render()
    return f"sala-train: {exc}"


@contextmanager
def exit_on_user_error(prog: str = "sala-train") -> Iterator[None]:
    """Turn user errors into one message on stderr and exit code 2, with no traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        print(render(exc).replace("sala-train:", f"{prog}:", 1), file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
