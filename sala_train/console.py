"""One-line messages that several ranks can print to the same pipe without mixing.

``print`` may issue the text and its newline as separate writes (unbuffered streams, as under
torchrun), so two ranks' lines can interleave mid-line. A single ``os.write`` of a whole line
shorter than PIPE_BUF is atomic on a pipe, so each message arrives intact.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from typing import TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """Write ``line`` and a newline to ``stream`` (stdout by default) as one write."""
    stream = sys.stdout if stream is None else stream
    data = line + "\n"
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # captured or in-memory streams
        stream.write(data)
        stream.flush()
        return
    encoded = data.encode(getattr(stream, "encoding", None) or "utf-8", errors="replace")
    try:
        stream.flush()  # anything already buffered goes first, keeping the order
        while encoded:
            encoded = encoded[os.write(fd, encoded) :]
    except OSError as exc:
        if not reader_gone(exc):
            raise
        _write_nowhere(fd)


def reader_gone(exc: OSError) -> bool:
    """Whether a write failed because nothing reads this output any more: a pipe's reader left
    (EPIPE), or the terminal hung up (EIO: its window closed, the SSH session dropped)."""
    return exc.errno in (errno.EPIPE, errno.EIO)


class QuietWhenGone:
    """A stream (a progress bar's) whose writes go nowhere once its reader is gone (``reader_gone``),
    instead of raising mid-training: a closed terminal failed the run at its next bar update."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._gone(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._gone(exc)

    def _gone(self, exc: OSError) -> None:
        if not reader_gone(exc):
            raise exc
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):  # (no descriptor: text dropped)
            _write_nowhere(self._stream.fileno())

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def leave_the_terminal() -> None:
    """The terminal hung up (SIGHUP): stdout and stderr that wrote to it go to /dev/null, so what
    is still to be said cannot fail on it (EIO); ones redirected to a file or pipe keep writing."""
    for fd in (1, 2):
        if _a_terminal_or_a_hung_up_one(fd):
            nowhere = os.open(os.devnull, os.O_WRONLY)
            os.dup2(nowhere, fd)
            os.close(nowhere)


def _a_terminal_or_a_hung_up_one(fd: int) -> bool:
    """``isatty``, and a terminal already hung up, for which ``isatty`` says False by the time the
    SIGHUP handler runs (its ``tcgetattr`` fails with EIO, as its writes do)."""
    import termios

    try:
        termios.tcgetattr(fd)
        return True
    except termios.error as exc:
        return bool(exc.args and exc.args[0] == errno.EIO)
    except (OSError, ValueError):
        return False


def _write_nowhere(fd: int) -> None:
    """The reader of this output has left (``sala-train ... | head``): what is still to be said
    goes to /dev/null, on this descriptor and on the other standard one if it is the same pipe
    (``2>&1``), and the work goes on. A training run died of it at its next progress line, exit 1
    and ``failed``, between two checkpoints."""
    same = os.fstat(fd)
    for other in {fd, 1, 2}:
        try:
            there = os.fstat(other)
        except OSError:
            continue
        if other == fd or (there.st_dev, there.st_ino) == (same.st_dev, same.st_ino):
            nowhere = os.open(os.devnull, os.O_WRONLY)
            os.dup2(nowhere, other)
            os.close(nowhere)


def draws_on_a_terminal(stream: TextIO) -> bool:
    """Whether a progress bar can be drawn on ``stream``: a terminal with a width and a height. One
    that reports 0 columns or 0 rows (``script`` run without a terminal, some CI consoles, ``stty
    cols 120`` there) made tqdm draw nothing at all, so plain lines go there instead."""
    try:
        size = os.get_terminal_size(stream.fileno()) if stream.isatty() else None
        return size is not None and size.columns > 0 and size.lines > 0
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
